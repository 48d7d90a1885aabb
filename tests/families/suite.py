"""The generic family suite: what every registered family must do, on its own tiny folder, through the same code.

``pairs -> reflow -> export -> sample``: pair generation through the real ``predict`` command (the family's own
solver, ``auto``), three reflow steps, an export that reads back as a velocity folder of the same family, an
``InstaFlowPipeline`` and a velocity teacher that equal the module's own sampler exactly, ``instaflow-pl sample``
writing the pipeline's image, and, for families with a stock diffusers pipeline, that pipeline loading the export
with the family's classes. Bad inputs: a folder missing any part its family needs, latents of the wrong shape,
another family's data and checkpoints. Everything runs in this process, so a family registered by a test module
works here too (``test_new_family.py``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import write_dataset
from helpers import config, train
from PIL import Image

from instaflow_pl.cli import main
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

    def pipeline(self):
        """``InstaFlowPipeline.from_pretrained`` of the export, without progress bars."""
        from instaflow_pl.pipeline import InstaFlowPipeline

        pipe = InstaFlowPipeline.from_pretrained(self.export)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def run_family(name: str, root: Path) -> FamilyRun:
    """Build ``name``'s tiny folder under ``root``, generate pairs from it, reflow three steps and export."""
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.modules import ReflowModule

    family = FAMILIES[name]
    base = family.build_tiny(root / "base")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    main(
        [
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
    )
    module = ReflowModule(base_model=str(base), ema_decay=0.9, val_steps=[1])
    train(module, root / "pairs", root / "fit")
    export_checkpoint(root / "fit" / "checkpoints", root / "2rf")
    return FamilyRun(family, base, root / "pairs", module.eval(), root / "fit" / "checkpoints", root / "2rf")


def check_export(run: FamilyRun, tmp_path: Path) -> None:
    """The export is a velocity folder of the same family whose pipeline and teacher equal the module's sampler
    exactly (1 and 4 steps, guidance 0 and 3)."""
    from instaflow_pl.teachers import load_teacher

    folder = ModelFolder.open(run.export)
    assert folder.kind == VELOCITY_KIND and folder.family is run.family
    assert folder.geometry == ModelFolder.open(run.base).geometry
    pipe = run.pipeline()
    x0 = noise_for_indices(0, range(2), folder.geometry.shape)
    for steps in (1, 4):
        teacher = load_teacher(run.export, steps=steps)
        assert teacher.family is run.family and teacher.kind == VELOCITY_KIND
        for guidance in (0.0, 3.0):
            kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent"}
            ours = pipe(PROMPTS, latents=x0, **kwargs).images
            reference = run.module.sample(x0.clone(), PROMPTS, steps, guidance).x
            assert (ours - reference).abs().max().item() == 0.0, (steps, guidance)
            assert torch.equal(teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x, ours)


def check_sample_command(run: FamilyRun, tmp_path: Path) -> None:
    """``instaflow-pl sample`` writes the image the pipeline makes from the seed's noise."""
    png = tmp_path / "cat.png"
    main(["sample", "--model", str(run.export), "--prompt", PROMPTS[0], "--n", "1", "--seed", "5", "--out", str(png)]
         + ["--steps", "4", "--guidance", "3"])  # fmt: skip
    x0 = noise_for_indices(5, range(1), ModelFolder.open(run.export).geometry.shape)
    expected = run.pipeline()(PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, latents=x0).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected.convert("RGB")))  # a grid is RGB


def check_stock_pipeline(run: FamilyRun, tmp_path: Path) -> None:
    """Stock diffusers loads the export, with the EMA weights in the family's network class: through the shipped
    pipeline file when the model index names it (SD), else with the family's pipeline class (SDXL, SD3)."""
    family = run.family
    if not family.pipeline_classes:
        pytest.skip(f"{family.name} has no stock diffusers pipeline")
    if family.standalone_pipeline and family.pipeline_file_in_index:
        stock = diffusers.DiffusionPipeline.from_pretrained(run.export, trust_remote_code=True)
        assert type(stock).__module__.endswith("instaflow_pipeline"), "the folder's own pipeline file"
    else:
        stock = getattr(diffusers, family.pipeline_classes[0]).from_pretrained(run.export)
        assert type(stock).__name__ == family.pipeline_classes[0]
    network = getattr(stock, family.network_folder)
    assert type(network).__name__ == ModelFolder.open(run.export).network_config["_class_name"]
    with run.module.sampling_weights() as velocity:
        expected = velocity.network.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in network.state_dict().items()), "the EMA weights are exported"


def check_bad_inputs(run: FamilyRun, tmp_path: Path) -> None:
    """A missing part, a wrong latent shape, and another family's data or checkpoint are one clear error each."""
    import lightning as L

    from instaflow_pl.checkpoints import read_checkpoint
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
    other_base = other.build_tiny(tmp_path / "other-base")
    other_module = ReflowModule(base_model=str(other_base), ema_decay=0.0, val_steps=[1])
    checkpoint = read_checkpoint(next(run.checkpoints.glob("*.ckpt")))
    expected = f"the checkpoint holds an {run.family.name} model, but this run's base_model is an {other.name}"
    with pytest.raises(UserError, match=expected):
        other_module.on_load_checkpoint(checkpoint)


CHECKS = {
    "export": check_export,
    "stock_pipeline": check_stock_pipeline,
    "sample_command": check_sample_command,
    "bad_inputs": check_bad_inputs,
}
"""Every check of the suite, by name; each takes the family's run and a fresh folder."""
