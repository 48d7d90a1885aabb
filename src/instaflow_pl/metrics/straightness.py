"""Straightness of a flow along its own simulated trajectory (0 = straight), per sample and as a metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from instaflow_pl.errors import UserError
from instaflow_pl.solver import ODESolution
from instaflow_pl.solver.ode import uniform_grid


def straightness_gaps(solution: ODESolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step squared gap ``|| (Z1 - Z0) - v_k ||^2`` of an Euler trajectory, and the step sizes.

    On an Euler trajectory the velocity used on step k is ``v_k = (Z_{k+1} - Z_k) / dt_k``, evaluated at ``t_k``. The
    squared norm is averaged over the latent's elements (so it does not grow with image size).

    Args:
        solution: An Euler solve with ``return_trajectory=True``.

    Returns:
        The gaps, shape (K, B), and the step sizes ``dt``, shape (K,), both float32 on the states' device.
    """
    if solution.states is None or solution.times is None:
        raise ValueError("straightness needs the trajectory: solve with return_trajectory=True")
    states, times = solution.states.float(), solution.times.to(solution.states.device).float()
    dt = times[1:] - times[:-1]
    shape = (-1,) + (1,) * (states.dim() - 1)
    velocities = (states[1:] - states[:-1]) / dt.view(shape)
    chord = states[-1] - states[0]
    gaps = (chord.unsqueeze(0) - velocities).pow(2).flatten(2).mean(dim=2)
    return gaps, dt


def straightness(solution: ODESolution) -> torch.Tensor:
    """``S = int_0^1 E || (Z1 - Z0) - v(Z_t, t) ||^2 dt`` from an Euler trajectory, per sample.

    The integral is the dt-weighted sum over steps of :func:`straightness_gaps`.

    Args:
        solution: An Euler solve with ``return_trajectory=True``.

    Returns:
        S for each sample, shape (B,).
    """
    gaps, dt = straightness_gaps(solution)
    return (gaps * dt.view(-1, 1)).sum(dim=0)


@dataclass(frozen=True)
class StraightnessProfile:
    """Where a flow bends: the mean squared gap on each step of the Euler grid.

    Attributes:
        times: Start time ``t_k`` of each step (where ``v_k`` was evaluated), shape (K,).
        dt: Length of each step, shape (K,).
        values: Mean over samples of ``|| (Z1 - Z0) - v_k ||^2`` (per element), shape (K,); S = ``(dt * values).sum()``.
    """

    times: torch.Tensor
    dt: torch.Tensor
    values: torch.Tensor


class StraightnessMetric(Metric):
    """Mean straightness S of simulated flows, with its profile over t; reduces by sums under DDP.

    Every update must come from an Euler solve on the same time grid (given here, as for ``LatentODE``).

    Example:
        >>> metric = StraightnessMetric(steps=8)
        >>> metric.update(LatentODE("euler", 8).solve(field, x0, cond, return_trajectory=True))
        >>> metric.compute(), metric.profile().values

    Args:
        steps: Number of uniform Euler steps from 0 to 1 (ignored when ``time_grid`` is given).
        time_grid: The solver's time grid, when it is not uniform.
        kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: torch.Tensor
    profile_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, steps: int = 25, time_grid: Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        grid = [float(t) for t in time_grid] if time_grid is not None else uniform_grid(steps)
        if len(grid) < 2:
            raise UserError(f"a straightness time grid needs at least two times, got {grid}")
        self.register_buffer("grid", torch.tensor(grid, dtype=torch.float64), persistent=False)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("profile_sum", torch.zeros(len(grid) - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, solution: ODESolution) -> None:
        """Add the samples of one Euler solve with ``return_trajectory=True`` on this metric's grid."""
        if solution.times is None or solution.times.shape != self.grid.shape:
            got = None if solution.times is None else solution.times.numel()
            raise ValueError(f"straightness metric expects a trajectory on {self.grid.numel()} times, got {got}")
        if not torch.allclose(solution.times.to(self.grid), self.grid, atol=1e-6):
            raise ValueError("the solution's time grid differs from the straightness metric's time grid")
        gaps, _ = straightness_gaps(solution)
        self.total += straightness(solution).double().sum().to(self.total.device)
        self.profile_sum += gaps.double().sum(dim=1).to(self.profile_sum.device)
        self.count += gaps.shape[1]

    def compute(self) -> torch.Tensor:
        """Mean straightness S over every sample seen (float32 scalar; NaN before any update)."""
        return (self.total / self.count).float()

    def profile(self) -> StraightnessProfile:
        """The per-step mean gap over every sample seen, with the step times (synchronised across ranks)."""
        with self.sync_context(should_sync=self.sync_on_compute):
            values = (self.profile_sum / self.count).float()
        grid = self.grid.float()
        return StraightnessProfile(times=grid[:-1].cpu(), dt=(grid[1:] - grid[:-1]).cpu(), values=values.cpu())
