"""The method end to end on the tiny folder: pairs -> reflow (2-RF) -> export -> pairs from the 2-RF -> distillation.

Measured, not assumed: reflow must lower val/mse@1 (one Euler step against the teacher's X1) far below the
teacher-initialised model and make the flow straighter than the teacher's own trajectories; the distilled student's
one step must beat the 2-RF's own one step on the distillation pairs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import STORY_PROMPTS as PROMPTS
from helpers import story_fit as fit
from helpers import story_pairs as pairs

from instaflow_pl.data import TriplesDataModule
from instaflow_pl.export import export_checkpoint
from instaflow_pl.metrics import straightness
from instaflow_pl.teachers import load_teacher

pytestmark = pytest.mark.slow

RESULTS: dict[str, float] = {}


def teacher_straightness(teacher_folder, data_path) -> float:
    data = TriplesDataModule(str(data_path), batch_size=16, val_fraction=0.25, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    teacher = load_teacher(teacher_folder, solver="dpm++", steps=8)
    return straightness(teacher.sample(batch.x0, batch.prompts, guidance=1.0, return_trajectory=True)).mean().item()


def test_reflow_then_distill_on_the_tiny_folder(tiny_sd, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")

    pairs("sd/pairs", tiny_sd, tmp_path / "pairs", prompts_file, "--model.init_args.guidance=1.0")
    before, after, ckpt = fit("sd/reflow", tiny_sd, tmp_path / "pairs", tmp_path / "reflow", steps=200, lr=1e-3)
    s_teacher = teacher_straightness(tiny_sd, tmp_path / "pairs")
    RESULTS.update(
        mse1_init=before["val/mse@1"], mse1_2rf=after["val/mse@1"], s_teacher=s_teacher, s_2rf=after["val/straightness"]
    )
    assert after["val/mse@1"] < 0.25 * before["val/mse@1"], RESULTS
    assert after["val/straightness"] < 0.25 * s_teacher, RESULTS

    export_checkpoint(ckpt, tmp_path / "2rf")
    assert load_teacher(tmp_path / "2rf").kind == "velocity"
    pairs("sd/pairs_2rf", tmp_path / "2rf", tmp_path / "pairs-2rf", prompts_file)
    d_before, d_after, _ = fit("sd/distill", tmp_path / "2rf", tmp_path / "pairs-2rf", tmp_path / "distill", 150, 1e-3)
    RESULTS.update(mse1_2rf_own=d_before["val/mse@1"], mse1_student=d_after["val/mse@1"])
    assert d_after["val/mse@1"] < 0.75 * d_before["val/mse@1"], RESULTS
    print("training story:", {k: round(v, 4) for k, v in RESULTS.items()})
    assert torch.isfinite(torch.tensor(list(RESULTS.values()))).all()


def test_piecewise_reflow_lowers_the_k_step_error_on_the_tiny_folder(tiny_sd, tmp_path):  # make test-all (and the
    # per-family piecewise story, tests/families/test_perflow_story.py)
    """PeRFlow on the tiny folder (4 windows of 2 DDIM steps, the teacher in the module, the pairs' X1 as data): its
    4-step error against the teacher's X1 falls well below the teacher-initialised model's. The pairs come from the
    teacher's own solver (DDIM, 8 steps): the random tiny UNet's PNDM and DDIM solutions are unrelated (measured:
    mse 68 between them, X1 variance 72), so only the same solver makes its X1 the windows' end points."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    ddim = ("--model.init_args.solver=ddim", "--model.init_args.steps=8")
    pairs("sd/pairs", tiny_sd, tmp_path / "pairs", prompts_file, "--model.init_args.guidance=1.0", *ddim)
    teacher = f"--model.init_args.teacher={tiny_sd}"
    before, after, _ = fit("sd/perflow", tiny_sd, tmp_path / "pairs", tmp_path / "perflow", 200, 1e-3, teacher)
    results = {"mse4_init": before["val/mse@4"], "mse4_perflow": after["val/mse@4"]}
    print("piecewise reflow story:", {k: round(v, 4) for k, v in results.items()})
    assert after["val/mse@4"] < 0.75 * before["val/mse@4"], results  # measured: 0.837 -> 0.430
