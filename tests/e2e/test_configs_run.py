"""Every YAML in configs/ runs with its own settings: 2 optimizer steps, 1 validation batch, a checkpoint and a 1-step
resume for training configs; a real (small) run for pair-generation and evaluation configs.

Each runs on the tiny folder of its family. What is changed from the file is listed in one place, :func:`runnable`:
the machine (accelerator, devices, strategy, nodes), the batch size, the step counts and the paths (model folders,
datasets and image folders, outputs, weight files not on test machines, a previous stage's checkpoint in
``init_from``, which is dropped), and the latent shape (image size) of the tiny folders. Everything else
(precision, clipping, the optimizer and its flags, EMA, gradient checkpointing, LoRA, lean LPIPS, loggers, callbacks)
runs as written, so a new setting in a YAML is exercised here by default.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, write_dataset

from instaflow_pl.cli import cli_main
from instaflow_pl.families import FAMILIES

RUN_SETTINGS = ("demo", "sweeps")
"""Config folders run elsewhere: the demo's stages by test_demo.py, sweeps by test_sweeps.py."""
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if p.relative_to(REPO / "configs").parts[0] not in RUN_SETTINGS
)
SLOW_CONFIGS = ("tiny/sdxl/", "tiny/sd3/", "tiny/flux/", "tiny/digits/", "eval/coco5k.yaml")
"""Run in make test-all only (make test's 10-minute budget): the other families' tiny configs (the real recipes of
every family, configs/sd15|sdxl|sd3|flux, and the tiny SD ones stay in make test) and the 5000-prompt evaluation."""
BATCH = 2
"""Per-device batch size of every run here (the recipes' own batch sizes are GPU-sized)."""


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def family_of_config(path: Path) -> str:
    """The model family a config is written for: a folder named after a family, else SD (configs/sd15, tiny/)."""
    return next((part for part in path.relative_to(REPO / "configs").parts if part in FAMILIES), "sd")


def kind_of_config(config: dict[str, Any]) -> str:
    class_path = config["model"]["class_path"].rsplit(".", 1)[-1]
    kinds = {"ReflowModule": "fit", "DistillModule": "fit", "DMDModule": "fit", "PairGenerator": "pairs"}
    return {**kinds, "Evaluation": "evaluate"}[class_path]


def _needs_velocity(config: dict[str, Any], path: Path) -> bool:
    """Whether the config's model folder is a k-RF export (distillation, pairs from a k-RF) or a released model."""
    init = config["model"]["init_args"]
    if config["model"]["class_path"].endswith(("DistillModule", "DMDModule")):
        return True
    if config["model"]["class_path"].endswith("PairGenerator"):
        return path.stem != "pairs"  # pairs.yaml: from the released teacher; pairs_2rf / pairs_distill: from a k-RF
    return bool(init.get("windows"))  # reflow starts from the released model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, inception_weights):
    """``get(name)``: tiny folders and files, each built once for this module: ``<family>`` (the released tiny folder),
    ``<family>-rf`` (a copy marked as a k-RF export), ``<family>-pairs`` (a finished triples dataset at the tiny
    latent shape), ``<family>-images`` (an image folder at the tiny latents' image size), ``clip``, ``reference``,
    ``inception``."""
    from instaflow_pl.model_folder import mark_velocity_folder
    from instaflow_pl.tiny import build_tiny_clip, build_tiny_images, build_tiny_reference

    built: dict[str, Path] = {"inception": inception_weights}
    root = tmp_path_factory.mktemp("config-runs")

    def get(name: str) -> Path:
        if name in built:
            return built[name]
        family, _, part = name.partition("-")
        if name == "clip":
            built[name] = build_tiny_clip(root / "clip")
        elif name == "reference":
            built[name] = build_tiny_reference(root / "reference", count=4)
        elif part == "":
            built[name] = FAMILIES[family].build_tiny(root / family)
        elif part == "rf":
            built[name] = root / name
            shutil.copytree(get(family), built[name])
            mark_velocity_folder(built[name], stage="test")
        elif part == "pairs":
            # 2000 samples: val_fraction 0.001 (the recipes' value) still holds out 2
            built[name] = write_dataset(root / name, count=2000, shard_size=500, shape=tiny_latent_shape(get(family)),
                                        family=family)  # fmt: skip
        elif part == "images":
            # 1000 images: val_fraction 0.001 (the recipes' value) still holds out 1
            built[name] = build_tiny_images(root / name, count=1000, size=tiny_image_size(get(family)))
        return built[name]

    return get


def tiny_latent_shape(folder: Path) -> list[int]:
    """Latent shape (C, H, W) of a tiny folder: its network's native shape, as its family reads it."""
    from instaflow_pl.model_folder import ModelFolder

    return list(ModelFolder.open(folder).geometry.shape)


def tiny_image_size(folder: Path) -> int:
    """Image side in pixels of a tiny folder: its latent side times its VAE's downsampling."""
    from instaflow_pl.model_folder import ModelFolder

    opened = ModelFolder.open(folder)
    return opened.geometry.size * opened.pixels_per_latent


def runnable(config: dict[str, Any], path: Path, get, out: Path) -> dict[str, Any]:
    """The config with the machine, batch size, step counts and paths of a tiny CPU run: the only changes made."""
    family = family_of_config(path)
    trainer, init, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    folder = get(f"{family}-rf" if _needs_velocity(config, path) else family)
    # the machine
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    # batch sizes and step counts
    data["batch_size"] = BATCH
    kind = kind_of_config(config)
    if kind == "fit":
        accumulate = min(
            trainer.get("accumulate_grad_batches", 1), 2
        )  # part of the global batch size; 2 still accumulates
        trainer["accumulate_grad_batches"] = accumulate
        trainer.update(
            max_steps=2, val_check_interval=2 * accumulate, limit_val_batches=1, check_val_every_n_epoch=None
        )
        for callback in trainer.get("callbacks") or []:
            if callback["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in callback["init_args"]:
                callback["init_args"]["every_n_train_steps"] = 2
            if callback["class_path"].endswith("SampleQuality"):
                callback["init_args"]["num_samples"] = BATCH
        trainer["default_root_dir"] = str(out / "run")
        init["base_model"] = str(folder)
        if init.get("teacher"):  # a piecewise reflow's or DMD's teacher: the released tiny folder
            init["teacher"] = str(get(family))
        if config["data"]["class_path"].endswith("ImagePromptDataModule"):  # images + prompts (encode_images)
            data.update(folder=str(get(f"{family}-images")), resolution=tiny_image_size(folder))
        else:
            data["path"] = str(get(f"{family}-pairs"))
        if init.get("init_from"):  # a previous stage's checkpoint (not on test machines): start from base_model
            init["init_from"] = None
        if "expected_latent_shape" in data:
            data["expected_latent_shape"] = tiny_latent_shape(folder)
        if "lpips_pretrained" in init or any("lpips" in str(k) for k in (init.get("distance") or {})):
            init["lpips_pretrained"] = False  # random LPIPS weights: the VGG/AlexNet files are not on test machines
    elif kind == "pairs":
        init.update(teacher=str(folder), output_dir=str(out / "pairs"), latent_shape=tiny_latent_shape(folder))
        init["shard_size"] = min(init.get("shard_size", 4), 4)
        data.update(prompts=str(REPO / "configs/tiny/prompts.txt"))
        data.pop("column", None)
    else:  # evaluation
        for entry in init["models"]:
            entry["folder"] = str(get(family if entry.get("solver") not in (None, "euler") else f"{family}-rf"))
        init.update(output_dir=str(out / "eval"), cache_dir=str(out / "cache"), reference_folder=str(get("reference")))
        init["shard_size"] = min(init["shard_size"], BATCH)
        if init.get("clip_model"):
            init["clip_model"] = str(get("clip"))
        if init.get("inception_weights"):
            init["inception_weights"] = str(get("inception"))
        data.update(captions=str(REPO / "configs/tiny/prompts.txt"), num_samples=2 * BATCH)
    return config


def _write(config: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_every_config_is_run_here_or_elsewhere():
    assert len(CONFIGS) >= 25
    kinds = {_rel(p): kind_of_config(yaml.safe_load(p.read_text())) for p in CONFIGS}
    assert set(kinds.values()) == {"fit", "pairs", "evaluate"}, kinds


def _config_params() -> list:
    return [
        pytest.param(p, id=_rel(p), marks=[pytest.mark.slow] if _rel(p).startswith(SLOW_CONFIGS) else [])
        for p in CONFIGS
    ]


@pytest.mark.parametrize("path", _config_params())
def test_config_runs_with_its_own_settings(path, folders, tmp_path):
    config = yaml.safe_load(path.read_text())
    kind = kind_of_config(config)
    written = runnable(config, path, folders, tmp_path)
    config_file = _write(written, tmp_path / "config")
    if kind == "fit":
        _fit_then_resume(config_file, tmp_path, written, _rel(path))
    elif kind == "pairs":
        cli_main(["predict", "--config", str(config_file)])
        manifest = json.loads((tmp_path / "pairs/manifest.json").read_text())
        assert manifest["family"] == family_of_config(path) and (tmp_path / "pairs/index.json").is_file()
        assert manifest["count"] >= 10 and manifest["steps"] == config["model"]["init_args"]["steps"]
    else:
        cli_main(["evaluate", "--config", str(config_file)])
        report = json.loads((tmp_path / "eval/report.json").read_text())
        expected = sum(len(m["steps"]) * len(m.get("guidance", [1.0])) for m in config["model"]["init_args"]["models"])
        assert len(report["rows"]) == expected and all(math.isfinite(r["fid"]) for r in report["rows"])


def _fit_then_resume(config_file: Path, tmp_path: Path, config: dict[str, Any], name: str) -> None:
    cli = cli_main(["fit", "--config", str(config_file)])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert torch.isfinite(metrics["train/loss"]), metrics
    assert any(name.startswith("val/") for name in metrics), f"no validation ran: {sorted(metrics)}"
    clip = config["trainer"].get("gradient_clip_val")
    assert cli.trainer.gradient_clip_val == clip
    checkpoints = tmp_path / "run/checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else "none"
    resumed = cli_main(["fit", "--config", str(config_file), "--trainer.max_steps=3", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 3
    resumed_loss = resumed.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(resumed_loss)
    val = {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("val/")}
    print(f"\n[{name}] 2 steps: train/loss {float(metrics['train/loss']):.4g}, {val}; "
          f"resumed step 3: train/loss {float(resumed_loss):.4g}")  # fmt: skip
