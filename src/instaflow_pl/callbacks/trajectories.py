"""Trajectory figure (like the InstaFlow paper's Fig. 6) and the straightness profile over t."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from instaflow_pl.callbacks.grid import latent_shape_of
from instaflow_pl.callbacks.images import figure_to_pil, log_image
from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.metrics import straightness, straightness_gaps
from instaflow_pl.solver import ODESolution


def gap_profile(solution: ODESolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval start times (K,) and the batch-mean straightness gap on each Euler interval (K,): where it bends."""
    gaps, _ = straightness_gaps(solution)
    return solution.times[:-1].float().cpu(), gaps.mean(dim=1).cpu()


def project_2d(*trajectories: torch.Tensor) -> list[torch.Tensor]:
    """Project trajectories (K+1, B, ...) onto the two principal directions of all their states together."""
    flat = [t.float().flatten(2) for t in trajectories]
    points = torch.cat([f.reshape(-1, f.shape[-1]) for f in flat])
    mean = points.mean(dim=0)
    _, _, v = torch.pca_lowrank(points - mean, q=2, center=False)
    return [(f - mean) @ v[:, :2] for f in flat]


class Trajectories(L.Callback):
    """After validation: a few trajectories projected to 2-D (the teacher's too, when given) and S over t.

    Args:
        prompts: Prompts of the trajectories (one each).
        steps: Euler steps of the model's trajectories.
        guidance: Classifier-free guidance.
        seed: Noise of trajectory i comes from ``seed + i``.
        teacher: Optional teacher folder (SD or k-RF) whose trajectories are drawn beside the model's.
        teacher_solver: The teacher's solver (``auto``: the folder's own scheduler for SD, Euler for a k-RF).
        teacher_steps: The teacher's steps.
        every_n_epochs: Draw after every n-th validation epoch.
    """

    def __init__(
        self,
        prompts: Sequence[str] = ("a photo of a cat", "a red car in the city", "a painting of a horse"),
        steps: int = 25,
        guidance: float = 1.0,
        seed: int = 0,
        teacher: str | None = None,
        teacher_solver: str = "auto",
        teacher_steps: int = 25,
        every_n_epochs: int = 1,
    ):
        self.prompts = list(prompts)
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.teacher_source = teacher
        self.teacher_solver = teacher_solver
        self.teacher_steps = teacher_steps
        self.every_n_epochs = every_n_epochs
        self._teacher = None

    def _teacher_solution(self, x0: torch.Tensor) -> ODESolution | None:
        if self.teacher_source is None:
            return None
        if self._teacher is None:
            from instaflow_pl.teachers import load_teacher

            self._teacher = load_teacher(self.teacher_source, self.teacher_solver, self.teacher_steps)
        return self._teacher.to(x0.device).sample(x0, self.prompts, self.guidance, return_trajectory=True)

    @torch.no_grad()
    def solutions(self, pl_module) -> dict[str, ODESolution]:
        """The model's (and the teacher's) trajectories from the fixed noises."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            x0 = noise_for_indices(self.seed, range(len(self.prompts)), latent_shape_of(pl_module)).to(pl_module.device)
            out = {"model": pl_module.sample(x0, self.prompts, self.steps, self.guidance, trajectory=True)}
            teacher = self._teacher_solution(x0)
            if teacher is not None:
                out["teacher"] = teacher
            return out
        finally:
            pl_module.train(was_training)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On rank zero: draw and log the figure, and log each drawn flow's straightness through the module."""
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs) or not trainer.is_global_zero:
            return
        solutions = self.solutions(pl_module)
        for name, solution in solutions.items():
            pl_module.log(f"val/straightness_{name}", straightness(solution).mean().item(), rank_zero_only=True)
        log_image(trainer, "val/trajectories", trajectory_figure(solutions))


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def trajectory_figure(solutions: dict[str, ODESolution]):
    """Two panels as a PIL image: the flows' trajectories in 2-D (one colour per flow), and their gap over t.

    Args:
        solutions: Euler solves with trajectories on the same noises, by name (e.g. ``1-RF``, ``2-RF``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(solutions)
    projected = dict(zip(names, project_2d(*(s.states.cpu() for s in solutions.values())), strict=True))
    figure, (paths, profile) = plt.subplots(1, 2, figsize=(9, 4), dpi=100)
    for (name, points), color in zip(projected.items(), COLORS, strict=False):
        for b in range(points.shape[1]):
            paths.plot(points[:, b, 0], points[:, b, 1], color=color, alpha=0.8, label=name if b == 0 else None)
            paths.scatter(points[-1, b, 0], points[-1, b, 1], color=color, s=12)
        start, gaps = gap_profile(solutions[name])
        label = f"{name}: S={straightness(solutions[name]).mean():.3g}"
        profile.plot(start, gaps, color=color, marker=".", label=label)
    paths.set(title="trajectories (2-D projection; dots: t = 1)")
    paths.legend()
    profile.set(xlabel="t (0 = noise, 1 = data)", ylabel="|(Z1 - Z0) - v|^2", title="straightness gap over t")
    profile.legend()
    figure.tight_layout()
    return figure_to_pil(figure)
