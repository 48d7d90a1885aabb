"""Export of training checkpoints, InstaFlowPipeline parity with the project's sampler, and the sample command."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import PROMPTS, write_dataset
from diffusers import UNet2DConditionModel
from helpers import assert_one_line_error, run_main, train
from PIL import Image

from instaflow_pl.checkpoints import checkpoint_safe_globals
from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.export import export_checkpoint
from instaflow_pl.modules import DistillModule, ReflowModule
from instaflow_pl.pipeline import InstaFlowPipeline
from instaflow_pl.sampling_cli import build_parser
from instaflow_pl.teachers import load_teacher

PARITY_PROMPTS = PROMPTS[:2]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("export") / "pairs", count=16, shard_size=8)


@pytest.fixture(scope="module")
def reflow_run(tiny_sd, data, tmp_path_factory) -> tuple[ReflowModule, Path]:
    """A ReflowModule trained 3 steps with an EMA, and the folder its ModelCheckpoint wrote to."""
    root = tmp_path_factory.mktemp("reflow")
    module = ReflowModule(base_model=str(tiny_sd), ema_decay=0.9, val_steps=[1])
    train(module, data, root)
    return module.eval(), root / "checkpoints"


@pytest.fixture(scope="module")
def exported(reflow_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "2rf"
    export_checkpoint(reflow_run[1], out)
    return out


@pytest.fixture(scope="module")
def pipe(exported) -> InstaFlowPipeline:
    pipeline = InstaFlowPipeline.from_pretrained(exported)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def loaded_module(reflow_run) -> ReflowModule:
    """The module loaded back from the checkpoint that was exported."""
    (ckpt,) = reflow_run[1].glob("*.ckpt")
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return ReflowModule.load_from_checkpoint(ckpt, map_location="cpu").eval()


# ---- the exported folder ------------------------------------------------------------------------------------------


def test_export_writes_a_diffusers_velocity_folder(exported, reflow_run, tiny_sd):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["instaflow_pipeline", "InstaFlowPipeline"]
    assert {k for k in index if not k.startswith("_")} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for part in ("vae", "text_encoder", "tokenizer"):
        assert sorted(p.name for p in (exported / part).iterdir()) == sorted(p.name for p in (tiny_sd / part).iterdir())
    info = json.loads((exported / "instaflow.json").read_text())
    assert info["kind"] == "velocity" and info["module"] == "ReflowModule" and info["stages"] == ["reflow"]
    assert info["base_model"] == str(tiny_sd) and info["training_steps"] == 3 and info["weights"] == "ema"
    card = (exported / "README.md").read_text()
    for fact in (str(tiny_sd), "reflow", "training steps: 3", "guidance", "pairs", "Metrics", "not recorded"):
        assert fact in card, fact
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "no temporary folder may remain"


def test_exported_unet_is_the_ema_unet_and_loads_with_stock_diffusers(exported, reflow_run):
    module = reflow_run[0]
    unet = UNet2DConditionModel.from_pretrained(exported, subfolder="unet")
    raw = module.velocity.network.state_dict()
    with module.sampling_weights():
        ema = {k: v.clone() for k, v in module.velocity.network.state_dict().items()}
    state = unet.state_dict()
    assert state.keys() == ema.keys()
    assert all(torch.equal(state[k], ema[k]) for k in state)
    assert not all(torch.equal(state[k], raw[k]) for k in state), "EMA and raw weights must differ after 3 steps"


def test_export_without_ema_exports_the_raw_weights(tiny_sd, data, tmp_path, capsys):
    module = ReflowModule(base_model=str(tiny_sd), ema_decay=0.0, val_steps=[1])
    train(module, data, tmp_path / "run", enable_checkpointing=False)
    ckpt = tmp_path / "raw.ckpt"
    module.trainer.save_checkpoint(ckpt)
    code, out, err = run_main(["export", "--ckpt", ckpt, "--out", tmp_path / "model"], capsys)
    assert code == 0, err
    assert f"to {tmp_path / 'model'}" in out and "raw weights" in out
    state = UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder="unet").state_dict()
    raw = module.velocity.network.state_dict()
    assert all(torch.equal(state[k], raw[k]) for k in raw)
    assert json.loads((tmp_path / "model" / "instaflow.json").read_text())["weights"] == "raw"


def test_distill_from_an_export_records_both_stages_and_metrics(exported, data, tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = DistillModule(base_model=str(exported), distance={"l2": 1.0}, ema_decay=0.9, val_steps=[1])
    watch = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="train/loss", every_n_train_steps=1)
    train(module, data, tmp_path / "run", callbacks=[watch])
    ckpt = tmp_path / "distill.ckpt"
    module.trainer.save_checkpoint(ckpt)
    code, _, err = run_main(["export", "--ckpt", ckpt, "--out", tmp_path / "student"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "student" / "instaflow.json").read_text())
    assert info["module"] == "DistillModule" and info["stages"] == ["reflow", "distill"]
    assert info["student_steps"] == 1 and info["base_kind"] == "velocity"
    card = (tmp_path / "student" / "README.md").read_text()
    best = float(watch.best_model_score)
    assert "reflow -> distill" in card and "train/loss (best)" in card and f"{best:.6g}" in card


# ---- checkpoints from before the network rename -------------------------------------------------------------------

OLD_CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "reflow_lora_d85363f.ckpt"
"""A LoRA reflow checkpoint written by commit d85363f (``velocity.unet.*`` keys, ``unet_config``; see
tests/fixtures/README.md)."""
OLD_PREFIXES = {"velocity.unet.": "velocity.network.", "ema.module.unet.": "ema.module.network."}


def _renamed(key: str) -> str:
    for old, new in OLD_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _moved(state, before: str, after: str):
    """``state`` (nested dicts and lists) with every string ``before`` replaced by ``after``."""
    if isinstance(state, dict):
        return {k: _moved(v, before, after) for k, v in state.items()}
    if isinstance(state, list):
        return [_moved(v, before, after) for v in state]
    return after if state == before else state


def _one_step_trainer(root: Path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=root,
    )


def test_a_checkpoint_from_before_the_network_rename_resumes_and_exports_the_same_weights(tiny_sd, tmp_path):
    from instaflow_pl.data import TriplesDataModule

    old = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=True)
    assert "unet_config" in old["instaflow_pl"] and "network_config" not in old["instaflow_pl"]
    assert any(k.startswith("velocity.unet.") for k in old["state_dict"])
    # The fixture was trained from the same seeded tiny SD and random triples, in other folders.
    data = write_dataset(tmp_path / "pairs", count=8, shard_size=8)
    old["hyper_parameters"]["base_model"] = str(tiny_sd)
    old["loops"] = _moved(old["loops"], "/tmp/oldck_run/pairs", str(data))
    ckpt = tmp_path / "old.ckpt"
    torch.save(old, ckpt)

    def module() -> ReflowModule:
        return ReflowModule(str(tiny_sd), ema_decay=0.9, val_steps=[1], lora=old["hyper_parameters"]["lora"])

    restored = module()  # a fit whose max_steps the checkpoint already reached: restores, takes no step
    trainer = _one_step_trainer(tmp_path / "restore", max_steps=1)
    trainer.fit(restored, TriplesDataModule(str(data), batch_size=4), ckpt_path=ckpt)
    state = restored.state_dict()
    assert all(torch.equal(state[_renamed(k)], v) for k, v in old["state_dict"].items()), "weights and EMA restored"
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    new = torch.load(tmp_path / "new.ckpt", map_location="cpu", weights_only=True)
    config = {k: v for k, v in old["instaflow_pl"]["unet_config"].items() if k != "_name_or_path"}
    assert config.items() <= new["instaflow_pl"]["network_config"].items(), "the record's network config, renamed"
    assert sorted(new["state_dict"]) == sorted(_renamed(k) for k in old["state_dict"])

    resumed = _one_step_trainer(tmp_path / "resume", max_steps=2)
    resumed.fit(module(), TriplesDataModule(str(data), batch_size=4), ckpt_path=ckpt)
    assert resumed.global_step == 2, "training goes on from the old checkpoint"

    export_checkpoint(ckpt, tmp_path / "old-export")
    export_checkpoint(tmp_path / "new.ckpt", tmp_path / "new-export")
    before = UNet2DConditionModel.from_pretrained(tmp_path / "old-export", subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "new-export", subfolder="unet").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with restored.sampling_weights() as velocity:
        ema = dict(velocity.network.named_parameters())
    key = next(k for k in ema if "lora_B" in k)  # the merged export holds the EMA adapters' update
    assert ema[key].abs().sum() > 0, "the adapters trained"


# ---- InstaFlowPipeline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_pipeline_equals_the_module_sampler(pipe, loaded_module, reflow_run, steps, guidance):
    x0 = noise_for_indices(0, range(len(PARITY_PROMPTS)), pipe.latent_shape())
    ours = pipe(PARITY_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x0, output_type="latent")
    for module in (loaded_module, reflow_run[0]):
        reference = module.sample(x0.clone(), PARITY_PROMPTS, steps, guidance).x
        diff = (ours.images - reference).abs().max().item()
        assert diff <= TOLERANCE, diff
    unguided = loaded_module.sample(x0.clone(), PARITY_PROMPTS, steps, 0.0 if guidance else 3.0).x
    assert (ours.images - unguided).abs().max().item() > 1e-3, "guidance must change the samples"


def test_pipeline_decodes_with_the_vae(pipe, loaded_module):
    x0 = noise_for_indices(3, range(2), pipe.latent_shape())
    images = pipe(PARITY_PROMPTS, num_inference_steps=2, latents=x0, output_type="pt").images
    latents = loaded_module.sample(x0.clone(), PARITY_PROMPTS, 2, 0.0).x
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert torch.allclose(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert images.shape == (2, 3, 16, 16)
    pil = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images
    again = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16) and np.array_equal(np.asarray(pil[0]), np.asarray(again[0]))
    assert pipe("a cat", output_type="np", num_images_per_prompt=3).images.shape == (3, 16, 16, 3)


def test_velocity_teacher_from_the_export_equals_the_pipeline(exported, pipe):
    x0 = noise_for_indices(7, range(2), pipe.latent_shape())
    for steps, guidance in ((1, 0.0), (4, 3.0)):
        teacher = load_teacher(exported, steps=steps)
        assert teacher.kind == "velocity"
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent"}
        ours = pipe(PARITY_PROMPTS, latents=x0, **kwargs).images
        reference = teacher.sample(x0.clone(), PARITY_PROMPTS, guidance=guidance).x
        assert (ours - reference).abs().max().item() <= TOLERANCE


_WITHOUT_INSTAFLOW_PL = """
import importlib.abc, json, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "instaflow_pl":
            raise ImportError("instaflow_pl is hidden")

sys.meta_path.insert(0, Hide())
import torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x0 = torch.load(folder + "/../x0.pt")
cases = json.loads(sys.argv[3])
images = [pipe(PROMPTS, latents=x0, num_inference_steps=s, guidance_scale=g, output_type=o).images for s, g, o in cases]
torch.save({"class": type(pipe).__module__ + "." + type(pipe).__name__, "images": images,
            "loaded": [m for m in sys.modules if m.startswith("instaflow_pl")]}, out)
"""


def test_stock_diffusers_samples_the_export_exactly_without_instaflow_pl(exported, pipe, tmp_path):
    """The folder's own instaflow_pipeline.py, loaded by stock diffusers in a process that cannot import the
    package, samples exactly what InstaFlowPipeline samples (the file keeps the project's maths)."""
    import subprocess
    import sys

    folder = tmp_path / "received"
    shutil.copytree(exported, folder)  # as a user who was sent the folder
    x0 = noise_for_indices(5, range(len(PARITY_PROMPTS)), pipe.latent_shape())
    torch.save(x0, tmp_path / "x0.pt")
    cases = [(1, 0.0, "latent"), (1, 3.0, "latent"), (3, 2.0, "latent"), (1, 0.0, "pt")]
    script = _WITHOUT_INSTAFLOW_PL.replace("PROMPTS", repr(PARITY_PROMPTS))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "out.pt"), json.dumps(cases)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["loaded"] == [] and got["class"].endswith("instaflow_pipeline.InstaFlowPipeline"), got["class"]
    for (steps, guidance, output_type), image in zip(cases, got["images"], strict=True):
        ours = pipe(
            PARITY_PROMPTS, latents=x0, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type
        ).images
        assert (image - ours).abs().max().item() == 0.0, (steps, guidance, output_type)
    card = (exported / "README.md").read_text()
    use = card.split("## Use", 1)[1]
    stock = "DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)"
    assert use.index(stock) < use.index("instaflow-pl sample")


def test_export_ships_the_standalone_pipeline_without_project_imports(exported):
    from instaflow_pl import standalone_pipeline

    shipped = (exported / "instaflow_pipeline.py").read_text()
    assert shipped == Path(standalone_pipeline.__file__).read_text()
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(shipped))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {"__future__", "torch", "diffusers"}, imported
    assert InstaFlowPipeline.from_pretrained(exported).__class__ is InstaFlowPipeline


# ---- export errors ------------------------------------------------------------------------------------------------


class _Opens:
    """A pickle that would create a file when loaded with full pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_export_errors_are_one_line(reflow_run, tmp_path, capsys):
    (ckpt,) = reflow_run[1].glob("*.ckpt")
    out = tmp_path / "out"
    missing = run_main(["export", "--ckpt", tmp_path / "nope.ckpt", "--out", out], capsys)
    assert_one_line_error(missing, "checkpoint not found", "nope.ckpt")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_main(["export", "--ckpt", tmp_path / "empty", "--out", out], capsys), "no *.ckpt")

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1}, foreign)
    result = run_main(["export", "--ckpt", foreign, "--out", out], capsys)
    assert_one_line_error(result, "not written by an instaflow-pl training module")

    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["instaflow_pl"]["module"] = "PairGenerator"
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    assert_one_line_error(run_main(["export", "--ckpt", other, "--out", out], capsys), "written by PairGenerator")

    checkpoint["instaflow_pl"]["module"] = "ReflowModule"
    checkpoint["hyper_parameters"]["base_model"] = str(tmp_path / "moved-sd")
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    assert_one_line_error(run_main(["export", "--ckpt", moved, "--out", out], capsys), "base model", "moved-sd")

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"instaflow_pl": {"module": "ReflowModule"}, "payload": _Opens(marker)}, evil)
    result = run_main(["export", "--ckpt", evil, "--out", out], capsys)
    assert_one_line_error(result, "not plain data", "--trust-checkpoint")
    assert not marker.exists(), "nothing in a checkpoint may run by default"
    trusted = run_main(["export", "--ckpt", evil, "--out", out, "--trust-checkpoint"], capsys)
    assert_one_line_error(trusted, "does not record its base_model")
    assert marker.exists(), "--trust-checkpoint loads with full pickle"
    assert not out.exists()


def test_export_never_overwrites_other_files(reflow_run, exported, tmp_path, capsys):
    ckpt = reflow_run[1]
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert_one_line_error(run_main(["export", "--ckpt", ckpt, "--out", user, "--force"], capsys), "not empty")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep me")
    assert_one_line_error(run_main(["export", "--ckpt", ckpt, "--out", a_file], capsys), "is a file")
    assert a_file.read_text() == "keep me"

    previous = tmp_path / "previous"
    shutil.copytree(exported, previous)
    assert_one_line_error(run_main(["export", "--ckpt", ckpt, "--out", previous], capsys), "--force")
    (previous / "README.md").write_text("stale")
    code, _, err = run_main(["export", "--ckpt", ckpt, "--out", previous, "--force"], capsys)
    assert code == 0, err
    assert (previous / "README.md").read_text() == (exported / "README.md").read_text()
    (previous / "extra.txt").write_text("mine")
    result = run_main(["export", "--ckpt", ckpt, "--out", previous, "--force"], capsys)
    assert_one_line_error(result, "extra.txt")
    assert (previous / "extra.txt").read_text() == "mine"


# ---- instaflow-pl sample ------------------------------------------------------------------------------------------


def test_sample_writes_a_grid_with_the_seed_rule(exported, pipe, tmp_path, capsys):
    out = tmp_path / "grids" / "cat.png"
    args = ["sample", "--model", exported, "--prompt", "a photo of a cat", "--n", "3", "--seed", "5", "--out", out]
    code, stdout, err = run_main([*args, "--steps", "2", "--guidance", "3"], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (32, 32, 3)  # 3 images of 16 x 16 in a 2 x 2 grid
    x0 = noise_for_indices(5, range(3), pipe.latent_shape())
    expected = pipe(["a photo of a cat"] * 3, num_inference_steps=2, guidance_scale=3.0, latents=x0).images
    for i, image in enumerate(expected):
        row, col = divmod(i, 2)
        assert np.array_equal(grid[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16], np.asarray(image)), i

    before = out.read_bytes()
    assert_one_line_error(run_main([*args, "--seed", "6"], capsys), "already exists", "--force")
    assert out.read_bytes() == before
    code, _, err = run_main([*args, "--seed", "6", "--force"], capsys)
    assert code == 0, err
    assert out.read_bytes() != before


def test_sample_errors_are_one_line(exported, tiny_sd, tmp_path, capsys):
    def sample(model, *extra):
        return run_main(["sample", "--model", model, "--prompt", "a cat", "--out", tmp_path / "g.png", *extra], capsys)

    assert_one_line_error(sample(tmp_path / "no-model"), "model folder not found", "no-model")
    assert_one_line_error(sample(tiny_sd), "not a velocity model")
    assert_one_line_error(sample(exported, "--steps", "0"), "--steps must be >= 1")
    assert_one_line_error(sample(exported, "--guidance", "-1"), "--guidance must be >= 0")
    assert not (tmp_path / "g.png").exists()


def test_help_explains_every_option(capsys):
    code, text, _ = run_main(["sample", "--help"], capsys)
    assert code == 0
    for action in build_parser()._actions:
        assert action.help, action.dest
        assert action.option_strings[0] in text
    for word in ("seed + i", "Euler", "1 or less means none", "--force"):
        assert word in " ".join(text.split()), word
    code, text, _ = run_main(["export", "--help"], capsys)
    assert code == 0
    for option in ("--ckpt", "--out", "--force", "--trust-checkpoint", "EMA"):
        assert option in text, option


# ---- delta weights (PeRFlow's format) -----------------------------------------------------------------------------


def _unet_state(folder: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_delta_export_plus_its_base_is_the_export_bit_for_bit(reflow_run, exported, tiny_sd, tmp_path, capsys):
    from safetensors.torch import load_file

    from instaflow_pl.export import apply_delta

    out = tmp_path / "delta"
    args = ["export", "--ckpt", reflow_run[1], "--out", out, "--format", "delta", "--delta-dtype", "fp64"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "delta_weights.safetensors", "instaflow.json"]
    info = json.loads((out / "instaflow.json").read_text())
    assert info["kind"] == "delta" and info["stage"] == "reflow" and info["delta"]["base_model"] == str(tiny_sd)
    assert info["delta"]["round_trip_mismatches"] == 0 and info["delta"]["dtype"] == "fp64"
    delta, base, student = load_file(out / "delta_weights.safetensors"), _unet_state(tiny_sd), _unet_state(exported)
    assert delta.keys() == student.keys() and all(v.dtype == torch.float64 for v in delta.values())
    assert all(torch.equal((base[k].double() + delta[k]).float(), student[k]) for k in student)
    assert any(delta[k].abs().max() > 0 for k in delta), "3 training steps moved the weights"

    applied = apply_delta(out, tiny_sd, tmp_path / "applied")
    again = _unet_state(tmp_path / "applied")
    assert all(torch.equal(again[k], student[k]) for k in student)
    assert applied["delta_applied"]["same_base"] and applied["stages"] == ["reflow"]
    assert load_teacher(tmp_path / "applied").solver_name == "euler", "the sum is a velocity model"


def test_delta_applied_to_another_fine_tune_is_that_model_plus_the_delta(reflow_run, tiny_sd, tmp_path, capsys):
    """Another fine-tune of the base (its UNet perturbed): the applied network is other + delta, element by element,
    in float32 (the fp32 delta's default), and the record says the bases differ."""
    from safetensors.torch import load_file

    out = tmp_path / "delta"
    code, _, err = run_main(["export", "--ckpt", reflow_run[1], "--out", out, "--format", "delta"], capsys)
    assert code == 0, err
    info = json.loads((out / "instaflow.json").read_text())
    delta = load_file(out / "delta_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in delta.values())
    base = _unet_state(tiny_sd)
    mismatches = info["delta"]["round_trip_mismatches"]
    assert 0 <= mismatches < sum(v.numel() for v in base.values()) // 100, mismatches

    other = tmp_path / "other-fine-tune"
    shutil.copytree(tiny_sd, other)
    unet = UNet2DConditionModel.from_pretrained(other, subfolder="unet")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(other / "unet")
    other_state = unet.state_dict()

    code, stdout, err = run_main(["export", "--apply-delta", out, "--to", other, "--out", tmp_path / "new"], capsys)
    assert code == 0, err
    assert "added the delta" in stdout
    new = _unet_state(tmp_path / "new")
    for k, v in other_state.items():
        assert torch.equal(new[k], (v.double() + delta[k].double()).float()), k
    assert not all(torch.equal(new[k], other_state[k]) for k in new)
    record = json.loads((tmp_path / "new/instaflow.json").read_text())
    assert record["base_model"] == str(other) and not record["delta_applied"]["same_base"]
    assert "InstaFlow velocity model" in (tmp_path / "new/README.md").read_text()


def test_delta_errors_are_one_line(reflow_run, exported, tmp_path, capsys):
    out = tmp_path / "new"
    not_delta = run_main(["export", "--apply-delta", exported, "--to", exported, "--out", out], capsys)
    assert_one_line_error(not_delta, "is not a delta export", "--format delta")
    code, _, err = run_main(["export", "--apply-delta", exported, "--out", out], capsys)
    assert code == 2 and "--apply-delta DELTA needs --to MODEL" in err
    code, _, err = run_main(["export", "--out", out], capsys)
    assert code == 2 and "--ckpt is required" in err
    assert not out.exists()


def test_export_help_explains_the_delta_options(capsys):
    code, text, _ = run_main(["export", "--help"], capsys)
    text = " ".join(text.split())
    assert code == 0
    for fragment in ("--format {folder,delta}", "--delta-dtype {fp32,fp64}", "--apply-delta DELTA", "--to MODEL",
                     "minus the base model's network", "bit for bit", "another fine-tune"):  # fmt: skip
        assert fragment in text, fragment
