"""The generic family suite: what every registered family must do, on its own tiny folder, through the same code.

``pairs -> reflow -> export -> sample``: pair generation through the real ``predict`` command (the family's own
solver, ``auto``), three reflow steps, an export that reads back as a velocity folder of the same family, an
``InstaFlowPipeline`` and a velocity teacher that equal the module's own sampler exactly, and ``instaflow-pl sample``
writing the pipeline's image. Bad inputs: a folder missing any part its family needs, latents of the wrong shape,
another family's data. Everything runs in this process, so a family registered by a test module works here too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dataset
from helpers import config, run_main, train
from PIL import Image

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES, Family
from instaflow_pl.kinds import VELOCITY_KIND
from instaflow_pl.model_folder import ModelFolder

PROMPTS = ["a photo of a cat", "a red car in the city"]


@dataclass
class FamilyRun:
    """One family's trip through the suite.

    Attributes:
        family: The family.
        base: Its tiny folder.
        pairs: The pairs generated from it.
        module: The reflow module after three steps (eval mode).
        checkpoints: Where the fit wrote its checkpoints.
        export: The exported 2-RF folder.
    """

    family: Family
    base: Path
    pairs: Path
    module: object
    checkpoints: Path
    export: Path


def run_family(name: str, root: Path, capsys) -> FamilyRun:
    """Build ``name``'s tiny folder under ``root``, generate pairs from it, reflow three steps and export."""
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.modules import ReflowModule

    family = FAMILIES[name]
    base = family.build_tiny(root / "base")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [
        "predict",
        "--config",
        config("tiny/sd/pairs"),
        f"--model.init_args.teacher={base}",
        f"--model.init_args.output_dir={root / 'pairs'}",
        "--model.init_args.solver=auto",
        "--model.init_args.steps=2",
        "--model.init_args.guidance=2.0",
        f"--data.init_args.prompts={prompts}",
        "--data.init_args.repeats=6",
        "--data.init_args.batch_size=4",
    ]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    module = ReflowModule(base_model=str(base), ema_decay=0.9, val_steps=[1])
    train(module, root / "pairs", root / "fit")
    export_checkpoint(root / "fit" / "checkpoints", root / "2rf")
    return FamilyRun(family, base, root / "pairs", module.eval(), root / "fit" / "checkpoints", root / "2rf")


def check_export(run: FamilyRun) -> None:
    """The export is a velocity folder of the same family whose pipeline and teacher equal the module's sampler."""
    from instaflow_pl.pipeline import InstaFlowPipeline
    from instaflow_pl.teachers import load_teacher

    folder = ModelFolder.open(run.export)
    assert folder.kind == VELOCITY_KIND and folder.family is run.family
    assert folder.geometry == ModelFolder.open(run.base).geometry
    pipe = InstaFlowPipeline.from_pretrained(run.export)
    pipe.set_progress_bar_config(disable=True)
    x0 = noise_for_indices(0, range(2), folder.geometry.shape)
    for steps, guidance in ((1, 0.0), (2, 3.0)):
        ours = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x0, output_type="latent")
        reference = run.module.sample(x0.clone(), PROMPTS, steps, guidance).x
        assert (ours.images - reference).abs().max().item() == 0.0, (steps, guidance)
        teacher = load_teacher(run.export, steps=steps)
        assert teacher.family is run.family and teacher.kind == VELOCITY_KIND
        assert torch.equal(teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x, ours.images)


def check_sample_command(run: FamilyRun, tmp_path: Path, capsys) -> None:
    """``instaflow-pl sample`` writes the image the pipeline makes from the seed's noise."""
    from instaflow_pl.pipeline import InstaFlowPipeline

    png = tmp_path / "cat.png"
    args = ["sample", "--model", run.export, "--prompt", PROMPTS[0], "--n", "1", "--seed", "5", "--out", png]
    code, _, err = run_main([*args, "--steps", "2", "--guidance", "3"], capsys)
    assert code == 0, err
    pipe = InstaFlowPipeline.from_pretrained(run.export)
    pipe.set_progress_bar_config(disable=True)
    x0 = noise_for_indices(5, range(1), ModelFolder.open(run.export).geometry.shape)
    expected = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, latents=x0).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected.convert("RGB")))  # a grid is RGB


def check_bad_inputs(run: FamilyRun, tmp_path: Path) -> None:
    """A missing part, a wrong latent shape and another family's data are one clear error each."""
    import lightning as L

    from instaflow_pl.data import TriplesDataModule
    from instaflow_pl.modules import ReflowModule
    from instaflow_pl.teachers import load_teacher

    for part in run.family.required_parts():
        folder = tmp_path / f"no-{part}"
        shutil.copytree(run.base, folder)
        shutil.rmtree(folder / part)
        with pytest.raises(UserError, match=f"has no {part}/ subfolder; a {run.family.title} folder needs"):
            ModelFolder.open(folder)
    teacher = load_teacher(run.base, steps=1)
    channels, size, _ = teacher.latent_shape
    with pytest.raises(UserError, match="does not fit the teacher's network"):
        teacher.check_latent_shape((channels + 1, size, size))
    other = next(f for f in FAMILIES.values() if f is not run.family and not run.family.answers_to(f.name))
    data = write_dataset(tmp_path / "other", count=8, shard_size=8, shape=teacher.latent_shape, family=other.name)
    module = ReflowModule(base_model=str(run.base), ema_decay=0.0, val_steps=[1])
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    expected = f"come from an {other.name} teacher, but the model being trained is an {run.family.name} model"
    with pytest.raises(UserError, match=expected):
        trainer.fit(module, TriplesDataModule(str(data), batch_size=4, val_fraction=0.25))


def run_suite(name: str, tmp_path: Path, capsys) -> FamilyRun:
    """Every check of the suite on family ``name``."""
    run = run_family(name, tmp_path / "run", capsys)
    check_export(run)
    check_sample_command(run, tmp_path, capsys)
    check_bad_inputs(run, tmp_path)
    return run
