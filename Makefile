# instaflow-pl: `make help` lists the targets. Stage targets default to the tiny configs (seconds on a CPU) of
# FAMILY (a registered model family: sd, sdxl, sd3, flux or digits; default sd): configs/tiny/$(FAMILY)/*.yaml.
# Pass CONFIG=configs/sd15/pairs.yaml (or configs/sdxl/..., configs/sd3/..., configs/flux/...) for the real recipe.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG :=
FAMILY := sd
TINY_CONFIGS := configs/tiny/$(FAMILY)
TINY_RUNS := outputs/tiny/$(FAMILY)-
export WANDB_MODE ?= offline
DEMO_TARGETS := $(addprefix demo-,setup 1rf pairs-1rf 2rf pairs-2rf distill-2rf distill-1rf perflow dmd report)

.PHONY: help install test test-all lint format bench bench-scale bench-gpu bench-prompt bench-flux-memory bench-recipes demo $(DEMO_TARGETS) tiny pairs reflow distill export sample sweep evaluate clean

help: ## List the targets
	@grep -E '^[a-zA-Z_%$$()-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/^[$$](DEMO_TARGETS): demo-%/demo-STAGE/' | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps sweeps==0.3.0  # W&B's sweep engine; its numpy<2 pin is too strict
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with dev tools (once; redone when pyproject.toml changes)

TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
# The tests run in TEST_JOBS processes of one torch thread each (pytest-xdist; TEST_JOBS=0: all in this process).
TEST_RUN = $(BIN)/pytest -q -n $(TEST_JOBS) --dist worksteal

test: $(STAMP) ## Run the test suite CI runs (CPU, no network; under 10 min on 2 cores) [TEST_JOBS=N processes]
	$(TEST_RUN) -m "not slow or ci"

test-all: $(STAMP) ## Run every test, the slow ones too (~50 min on 2 cores: resume, DDP, notebook, family stories)
	$(BIN)/pytest -q  # one process: the multi-rank and demo tests have not been run beside each other

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## Benchmarks: ratios against baselines run in the same process [BENCH_ARGS=--quick: tiny sizes, < 1 min]
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-scale: $(STAMP) ## Memory and step time of every stage at SD 1.5 shapes (random weights; ~40 min on 2 cores with the DMD cases)
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

bench-recipes: $(STAMP) ## The shipped SD 1.5 recipes at real shapes on a CPU, as written (random weights; ~6 min)
	bash bench/sd15_recipes.sh

bench-prompt: $(STAMP) ## SD3 prompt-encoding cost vs the network step (T5-XXL at real width, few layers)
	$(BIN)/python -m bench.prompt_cost $(BENCH_ARGS)

bench-flux-memory: $(STAMP) ## FLUX.1 [dev] LoRA reflow step's peak memory at 512/1024 px on fake tensors; T5 vs a step (~6 min)
	$(BIN)/python -m bench.flux_memory $(BENCH_ARGS)

bench-gpu: $(STAMP) ## GPU benchmark (<= 8 min on one GPU): SD 1.5 pairs, training, a row per family, sharded (2+ GPUs), latency
	$(BIN)/python -m bench.gpu $(BENCH_ARGS)

demo: $(STAMP) ## The digits demo, every stage (finished ones are skipped; two at a time): outputs/demo/report.md [DEMO_ARGS="--force --jobs 1"]
	$(BIN)/instaflow-pl demo $(DEMO_ARGS)

# a static pattern rule: make skips implicit-rule search for .PHONY targets, so a plain `demo-%:` never ran
$(DEMO_TARGETS): demo-%: $(STAMP) ## One demo stage: demo-setup, demo-1rf, demo-pairs-1rf, demo-2rf, demo-pairs-2rf, demo-distill-2rf, demo-distill-1rf, demo-perflow, demo-dmd, demo-report
	$(BIN)/instaflow-pl demo --stage $* $(DEMO_ARGS)

tiny: $(STAMP) ## Write the tiny folder of FAMILY (outputs/tiny/FAMILY) the tiny configs use, a tiny CLIP and tiny captioned images
	$(BIN)/instaflow-pl tiny outputs/tiny/$(FAMILY) --family $(FAMILY) --clip outputs/tiny/clip --images outputs/tiny/images

pairs: tiny ## Generate (X0, X1, prompt) pairs: CONFIG=configs/tiny/$(FAMILY)/pairs.yaml by default
	$(BIN)/instaflow-pl pairs --config $(or $(CONFIG),$(TINY_CONFIGS)/pairs.yaml)

reflow: $(STAMP) ## Reflow (k-RF -> (k+1)-RF): CONFIG=configs/tiny/$(FAMILY)/reflow.yaml by default (needs make pairs)
	$(BIN)/instaflow-pl fit --config $(or $(CONFIG),$(TINY_CONFIGS)/reflow.yaml)

distill: $(STAMP) ## One-step distillation: CONFIG=configs/tiny/$(FAMILY)/distill.yaml by default (needs pairs from the 2-RF)
	$(BIN)/instaflow-pl fit --config $(or $(CONFIG),$(TINY_CONFIGS)/distill.yaml)

# export / sample: MODEL is the exported model folder (written by export, read by sample); FORCE=1 replaces outputs.
# Their defaults follow FAMILY: outputs/tiny/FAMILY-reflow/checkpoints, outputs/tiny/FAMILY-2rf.
CKPT := $(TINY_RUNS)reflow/checkpoints
MODEL := $(TINY_RUNS)2rf
PROMPT := a photo of a cat
STEPS := 1
GUIDANCE := 0
SEED := 0
N := 4
OUT := $(TINY_RUNS)samples.png
FORCE :=

export: $(STAMP) ## Export a checkpoint (or newest in a folder) to a model folder: CKPT=outputs/tiny/sd-reflow/checkpoints MODEL=outputs/tiny/sd-2rf [FORCE=1]
	$(BIN)/instaflow-pl export --ckpt "$(CKPT)" --out "$(MODEL)" $(if $(FORCE),--force)

sample: $(STAMP) ## Image grid from a model folder: MODEL=outputs/tiny/sd-2rf PROMPT=... STEPS=1 GUIDANCE=0 SEED=0 N=4 OUT=outputs/tiny/samples.png [FORCE=1]
	$(BIN)/instaflow-pl sample --model "$(MODEL)" --prompt "$(PROMPT)" --steps $(STEPS) --guidance $(GUIDANCE) \
		--seed $(SEED) --n $(N) --out "$(OUT)" $(if $(FORCE),--force)

# sweep: a W&B-format sweep file. With WANDB_MODE=online (and `wandb login`): wandb sweep + wandb agent on the server;
# otherwise (the default here) the trials run locally, each a fresh `instaflow-pl fit` in outputs/sweeps/NAME-TIME.
SWEEP := configs/sweeps/reflow_lr_tdist.yaml
TRIALS :=

sweep: $(STAMP) ## Hyperparameter sweep: SWEEP=configs/sweeps/reflow_lr_tdist.yaml [TRIALS=N]; W&B agent if WANDB_MODE=online, else local trials
	$(BIN)/instaflow-pl sweep $(if $(filter online,$(WANDB_MODE)),,--local) "$(SWEEP)" $(if $(TRIALS),--trials $(TRIALS))

# evaluate: the paper's protocol (FID, CLIP score, NFE, ms/img) -> <output_dir>/report.md, report.json, grid.png.
# The default runs on the tiny folders (make tiny, plus tiny reference images); CONFIG=configs/eval/coco5k.yaml for COCO.
TINY_REFERENCE := outputs/tiny/reference

evaluate: $(STAMP) ## Evaluate models like the paper: CONFIG=configs/eval/tiny.yaml by default (coco5k.yaml: FID-5k on COCO)
	$(if $(CONFIG),,$(MAKE) --no-print-directory tiny)
	$(if $(CONFIG),,test -d $(TINY_REFERENCE) || $(BIN)/python -c \
		'from instaflow_pl.tiny import build_tiny_reference as b; print("wrote", b("$(TINY_REFERENCE)"))')
	$(BIN)/instaflow-pl evaluate --config $(or $(CONFIG),configs/eval/tiny.yaml)

clean: ## Remove outputs/ (generated data) -- asks first
	@read -p "delete outputs/ (generated datasets and models)? [y/N] " ok && [ "$$ok" = y ] && rm -rf outputs/ || echo kept
