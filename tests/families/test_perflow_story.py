"""The piecewise-reflow story per family on its tiny folder: pairs from the teacher's own window solver -> a windowed
reflow (PeRFlow, configs/tiny/<family>/perflow.yaml) with that teacher in the module.

Measured as in the SD story (tests/e2e/test_training_story.py): the student's K-step error against the teacher's X1
(``val/mse@K``, K Euler steps on the piecewise grid from the pairs' X0) must fall well below the teacher-initialised
model's. The pairs come from the solver, steps and guidance the windows are solved with (the config's
``teacher_solver``, its ``windows x window_solver_steps`` steps over [0, 1], guidance 1 with ``cfg_sync``), so the
teacher's X1 is where its window solves, chained, lead.

Every family runs K = 2 windows of 4 solver steps (the configs' 8 steps over [0, 1]): the tiny SD3 and Flux teachers
are nearly straight at 4 steps (their random transformers have small outputs), so at the configs' K = 4 there is little
K-step error to remove, and on SD3's shifted grid the chained windows (window edges added to the grid) end 1.2e-4 from
the pairs' X1, a floor near the teacher-initialised model's 3.2e-4. At K = 2 (measured on 16 pairs): SD3 2.4e-3 against
a floor of 2.3e-5, Flux 3.8e-3 against 5e-8.

Measured (200 steps at lr 1e-3, val/mse@2 teacher-initialised -> windowed 2-RF): sd 0.8334 -> 0.3384, sdxl
0.8238 -> 0.3087, sd3 0.00245 -> 0.001417, flux 0.00403 -> 0.00255. The flow families' smaller gain is the second
window: the first (from pure noise, the states validation starts from) falls 7x for Flux (0.0019 -> 0.00027, the
student's one step against the teacher's window solve), the second's loss over its times 11x, but its error at the
window's start, the one time the 2-step sampler evaluates there, stays at 0.001: the tiny random teacher's data X1 and
fresh noise interpolate to states (mean square 0.59) off its own trajectories (1.08), which a real teacher's marginals
are not.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO
from helpers import STORY_PROMPTS as PROMPTS
from helpers import story_fit as fit
from helpers import story_pairs as pairs

from instaflow_pl.families import FAMILIES
from instaflow_pl.kinds import RELEASED_KIND
from instaflow_pl.model_folder import ModelFolder

pytestmark = pytest.mark.slow


def window_settings(family: str) -> dict:
    """The model options of ``configs/tiny/<family>/perflow.yaml``."""
    return yaml.safe_load((REPO / f"configs/tiny/{family}/perflow.yaml").read_text())["model"]["init_args"]


STORY_WINDOWS = 2
"""K of every family's story (see the module's docstring)."""


def teacher_steps(settings: dict) -> int:
    """The teacher's solver steps over [0, 1] in ``configs/tiny/<family>/perflow.yaml``."""
    return settings["windows"] * settings["window_solver_steps"]


def window_args(settings: dict) -> list[str]:
    """The config's teacher steps over [0, 1] in ``STORY_WINDOWS`` windows, validated at K and 2K steps."""
    steps = teacher_steps(settings) // STORY_WINDOWS
    k = STORY_WINDOWS
    return [f"--model.init_args.windows={k}", f"--model.init_args.window_solver_steps={steps}",
            f"--model.init_args.val_steps=[{k}, {2 * k}]"]  # fmt: skip


def teacher_pair_args(settings: dict) -> list[str]:
    """Pair-generation options that solve the whole of [0, 1] as the windowed teacher solves its windows."""
    steps = teacher_steps(settings)
    guidance = 1.0 if settings.get("cfg_sync") else settings.get("teacher_guidance", 1.0)
    solver = settings.get("teacher_solver", "auto")
    return [f"--model.init_args.solver={solver}", f"--model.init_args.steps={steps}",
            f"--model.init_args.guidance={guidance}"]  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_windowed_reflow_lowers_the_k_step_error_per_family(family, tmp_path):
    folder = FAMILIES[family].build_tiny(tmp_path / family)
    if ModelFolder.open(folder).kind != RELEASED_KIND:
        # as in test_story.py: a random velocity folder (the digits MLP) is nearly straight already; its piecewise
        # reflow is the demo's perflow stage (tests/e2e/test_demo.py)
        pytest.skip(f"{family}'s tiny folder is a velocity folder, not a released teacher")
    settings = window_settings(family)
    k = STORY_WINDOWS
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")

    pairs(f"{family}/pairs", folder, tmp_path / "pairs", prompts_file, *teacher_pair_args(settings))
    teacher = f"--model.init_args.teacher={folder}"
    windows = window_args(settings)
    before, after, _ = fit(
        f"{family}/perflow", folder, tmp_path / "pairs", tmp_path / "perflow", 200, 1e-3, teacher, *windows
    )
    results = {f"mse{k}_init": before[f"val/mse@{k}"], f"mse{k}_perflow": after[f"val/mse@{k}"]}
    print(f"{family} piecewise reflow story (K={k}):", {name: float(f"{v:.4g}") for name, v in results.items()})
    assert torch.isfinite(torch.tensor(list(results.values()))).all(), results
    assert after[f"val/mse@{k}"] < 0.75 * before[f"val/mse@{k}"], results
