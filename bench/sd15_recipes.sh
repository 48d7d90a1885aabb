#!/usr/bin/env bash
# The shipped SD 1.5 recipes at Stable Diffusion 1.5's real shapes, on a CPU, as a user runs them:
#   bash bench/sd15_recipes.sh [NEW_WORKDIR]    (about 6 minutes on 2 idle cores; peak RSS about 7.7 GiB)
# The folder is SD 1.5's architecture with random weights (bench.scale builds it once in the cache). Each config runs
# unmodified except for the machine (cpu, 1 device), batch size 1, 2 steps, the paths, val_fraction (4 pairs) and,
# for reflow.yaml, freezing all but 92M of the UNet (full fine-tuning state does not fit 24 GB). Everything else is
# the file's: bf16-mixed, fused AdamW, clipping at 1.0, EMA, gradient checkpointing, tf32 (ignored on a CPU), workers.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d /tmp/sd15-recipes-XXXXXX)}
BIN=.venv/bin
export WANDB_MODE=${WANDB_MODE:-offline}
FREEZE=network.conv_in,network.down_blocks,network.mid_block,network.up_blocks.0,network.up_blocks.1
if [ -n "$(ls -A "$W" 2>/dev/null)" ]; then echo "$W is not empty; give a new folder" >&2; exit 2; fi
mkdir -p "$W"
echo "work folder: $W"
SD=$($BIN/python -c "from bench.scale import sd15_folder; print(sd15_folder())" | tail -1)
head -4 configs/tiny/prompts.txt > "$W/prompts.txt"
measure() { /usr/bin/time -f "%C: %e s, peak RSS %M kB" "$@" > "$W/$(date +%s%N).log" 2>&1 || { echo "FAILED: $*"; exit 1; }; }
echo "pairs (configs/sd15/pairs.yaml, 2 solver steps)"
measure $BIN/instaflow-pl pairs --config configs/sd15/pairs.yaml --trainer.accelerator=cpu --trainer.devices=1 \
  --model.init_args.teacher="$SD" --model.init_args.output_dir="$W/pairs" --model.init_args.steps=2 \
  --model.init_args.shard_size=2 --data.init_args.prompts="$W/prompts.txt" --data.init_args.batch_size=2
for cfg in reflow_lora reflow; do
  extra=()
  [ "$cfg" = reflow ] && extra=("--model.init_args.freeze=[$FREEZE]")
  echo "fit configs/sd15/$cfg.yaml: 2 steps, 1 validation batch, last.ckpt"
  measure $BIN/instaflow-pl fit --config "configs/sd15/$cfg.yaml" --trainer.accelerator=cpu --trainer.devices=1 \
    --trainer.strategy=auto --model.init_args.base_model="$SD" --data.init_args.path="$W/pairs" \
    --data.init_args.batch_size=1 --data.init_args.val_fraction=0.25 --trainer.max_steps=2 \
    --trainer.val_check_interval=2 --trainer.limit_val_batches=1 --trainer.default_root_dir="$W/$cfg" \
    --trainer.enable_progress_bar=false "${extra[@]}"
  test -f "$W/$cfg/checkpoints/last.ckpt"
done
grep -h "peak RSS" "$W"/*.log | sed 's/^.*instaflow-pl \([a-z]*\) --config \([^ ]*\).*: \(.*\)$/\1 \2: \3/'
