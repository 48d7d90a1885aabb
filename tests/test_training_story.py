"""The method end to end on the tiny folder: pairs -> reflow (2-RF) -> export -> pairs from the 2-RF -> distillation.

Measured, not assumed: reflow must lower val/mse@1 (one Euler step against the teacher's X1) far below the
teacher-initialised model and make the flow straighter than the teacher's own trajectories; the distilled student's
one step must beat the 2-RF's own one step on the distillation pairs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from instaflow_pl.cli import cli_main
from instaflow_pl.data import TriplesDataModule
from instaflow_pl.export import export_checkpoint
from instaflow_pl.metrics import straightness
from instaflow_pl.teachers import load_teacher

pytestmark = [pytest.mark.slow, pytest.mark.ci]  # the method end to end: worth its ~2 minutes in CI

PROMPTS = ["a photo of a cat", "a red car in the city", "a small bird sitting on a tree", "a blue flower"]
RESULTS: dict[str, float] = {}


def fit(config: str, base, data, root, steps: int, lr: float):
    cli = cli_main(
        ["--config", str(REPO / f"configs/tiny/{config}.yaml"), f"--model.init_args.base_model={base}",
         f"--data.init_args.path={data}", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
         f"--model.init_args.optimizer.init_args.lr={lr}", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.val_check_interval=1000", "--trainer.limit_val_batches=2",
         "--trainer.logger=false"],
        run=False,
    )  # fmt: skip
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.save_checkpoint(root / "final.ckpt")
    return before, after, root / "final.ckpt"


def pairs(config: str, teacher, out, prompts_file, *extra: str) -> None:
    cli_main(["predict", "--config", str(REPO / f"configs/tiny/{config}.yaml"), f"--model.init_args.teacher={teacher}",
              f"--model.init_args.output_dir={out}", f"--data.init_args.prompts={prompts_file}",
              "--data.init_args.repeats=32", *extra])  # fmt: skip


def teacher_straightness(teacher_folder, data_path) -> float:
    data = TriplesDataModule(str(data_path), batch_size=16, val_fraction=0.25, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    teacher = load_teacher(teacher_folder, solver="dpm++", steps=8)
    return straightness(teacher.sample(batch.x0, batch.prompts, guidance=1.0, return_trajectory=True)).mean().item()


def test_reflow_then_distill_on_the_tiny_folder(tiny_sd, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")

    pairs("pairs", tiny_sd, tmp_path / "pairs", prompts_file, "--model.init_args.guidance=1.0")
    before, after, ckpt = fit("reflow", tiny_sd, tmp_path / "pairs", tmp_path / "reflow", steps=200, lr=1e-3)
    s_teacher = teacher_straightness(tiny_sd, tmp_path / "pairs")
    RESULTS.update(
        mse1_init=before["val/mse@1"], mse1_2rf=after["val/mse@1"], s_teacher=s_teacher, s_2rf=after["val/straightness"]
    )
    assert after["val/mse@1"] < 0.25 * before["val/mse@1"], RESULTS
    assert after["val/straightness"] < 0.25 * s_teacher, RESULTS

    export_checkpoint(ckpt, tmp_path / "2rf")
    assert load_teacher(tmp_path / "2rf").kind == "velocity"
    pairs("pairs_2rf", tmp_path / "2rf", tmp_path / "pairs-2rf", prompts_file)
    d_before, d_after, _ = fit("distill", tmp_path / "2rf", tmp_path / "pairs-2rf", tmp_path / "distill", 150, 1e-3)
    RESULTS.update(mse1_2rf_own=d_before["val/mse@1"], mse1_student=d_after["val/mse@1"])
    assert d_after["val/mse@1"] < 0.75 * d_before["val/mse@1"], RESULTS
    print("training story:", {k: round(v, 4) for k, v in RESULTS.items()})
    assert torch.isfinite(torch.tensor(list(RESULTS.values()))).all()
