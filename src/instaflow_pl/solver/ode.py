"""LatentODE: the one solver that integrates a velocity field from t=0 (noise) to t=1 (data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instaflow_pl.errors import UserError

Field = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""A velocity field ``v(x, t, cond)``: ``x`` of shape (B, ...), ``t`` of shape (B,), any conditioning object."""


@dataclass
class ODESolution:
    """What a solve returns.

    Attributes:
        x: The end point (X1), shape (B, ...).
        nfe: Number of function evaluations (one batched call of the field counts once).
        states: The trajectory, shape (K+1, B, ...) with ``states[0] = x0``, when requested.
        times: The flow times of ``states``, shape (K+1,), from 0 to 1, when requested.
    """

    x: torch.Tensor
    nfe: int
    states: torch.Tensor | None = None
    times: torch.Tensor | None = None


class _CountedField:
    """Calls a field with per-sample times and counts the calls."""

    def __init__(self, field: Field, cond: Any):
        self.field = field
        self.cond = cond
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if isinstance(t, torch.Tensor):  # one time per sample, shaped to broadcast against x
            t_batch = t.reshape(-1).to(device=x.device, dtype=torch.float32)
        else:
            t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        return self.field(x, t_batch, self.cond).to(x.dtype)


def _euler(f: _CountedField, x: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    return x + dt * f(x, t)


def _midpoint(f: _CountedField, x: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    return x + dt * f(x + 0.5 * dt * f(x, t), t + 0.5 * dt)


def _heun(f: _CountedField, x: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + dt * k1, t + dt)
    return x + 0.5 * dt * (k1 + k2)


def _rk4(f: _CountedField, x: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + 0.5 * dt * k1, t + 0.5 * dt)
    k3 = f(x + 0.5 * dt * k2, t + 0.5 * dt)
    k4 = f(x + dt * k3, t + dt)
    return x + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


METHODS: dict[str, Callable[[_CountedField, torch.Tensor, float, float], torch.Tensor]] = {
    "euler": _euler,
    "midpoint": _midpoint,
    "heun": _heun,
    "rk4": _rk4,
}
"""Explicit one-step methods by name."""

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
"""Order of convergence of each method."""

EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
"""Function evaluations each method spends per step."""


def uniform_grid(steps: int) -> list[float]:
    """``steps + 1`` equally spaced times from 0 to 1."""
    return [k / steps for k in range(steps + 1)]


_SAME_TIME = 1e-7
"""Grid points closer than this to an interval's end are that end (no sliver steps from rounding)."""


def sub_grid(grid: Sequence[float], start: float, end: float) -> list[float]:
    """The part of ``grid`` inside ``[start, end]``, with both ends as grid points (the interval a window solve
    steps through; on a grid that holds both ends it is the grid's own points between them)."""
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"an interval of flow time must satisfy 0 <= start < end <= 1, got [{start}, {end}]")
    inside = [float(t) for t in grid if start + _SAME_TIME < t < end - _SAME_TIME]
    return [float(start), *inside, float(end)]


class UnequalIntervals(ValueError):
    """Per-sample intervals that span different numbers of grid steps (they cannot share one batched solve)."""


def per_sample_grid(grid: Sequence[float], start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Each sample's :func:`sub_grid` of ``grid`` inside its own ``[start_b, end_b]``, as a (steps + 1, B) float64
    tensor; the intervals must span the same number of grid steps (equal windows of a grid uniform inside each)."""
    bounds = torch.stack([start.double().cpu(), end.double().cpu()], dim=1)
    distinct, inverse = torch.unique(bounds, dim=0, return_inverse=True)
    grids = [sub_grid(grid, a, b) for a, b in distinct.tolist()]
    if len({len(g) for g in grids}) != 1:
        raise UnequalIntervals(
            f"per-sample intervals span {sorted({len(g) - 1 for g in grids})} grid steps, not one count"
        )
    return torch.tensor(grids, dtype=torch.float64)[inverse].T


class LatentODE:
    """Integrates ``dx/dt = v(x, t, cond)`` from t=0 (noise) to t=1 (data) with an explicit method.

    Args:
        method: One of ``euler``, ``midpoint``, ``heun``, ``rk4``.
        steps: Number of uniform steps from 0 to 1 (ignored when ``time_grid`` is given).
        time_grid: Increasing times to step through, e.g. ``[0, 0.5, 0.8, 1]``; the first is the start time.
    """

    def __init__(self, method: str = "euler", steps: int = 25, time_grid: Sequence[float] | None = None):
        if method not in METHODS:
            raise UserError(f"unknown ODE method {method!r}: choose one of {', '.join(METHODS)}")
        grid = list(time_grid) if time_grid is not None else None
        if grid is None:
            if steps < 1:
                raise UserError(f"steps must be >= 1, got {steps}")
            grid = uniform_grid(steps)
        if len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
            raise UserError(f"time_grid must hold at least two strictly increasing times, got {grid}")
        self.method = method
        self.time_grid = [float(t) for t in grid]

    can_solve_interval = True
    """Any sub-interval ``[t_s, t_e]`` of [0, 1] can be solved (on the grid's points inside it)."""

    solves_per_sample_intervals = True
    """One solve can take one interval per sample (``interval`` as two (B,) tensors)."""

    @staticmethod
    def marginal(x1: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """The state of the straight forward process at time ``t``, ``t X1 + (1 - t) X0`` (a rectified flow's and a
        flow-matching teacher's marginal, our convention): where a solve of ``[t, ...]`` starts from data ``x1``."""
        return t * x1 + (1.0 - t) * noise

    @property
    def steps(self) -> int:
        """Number of steps on the grid."""
        return len(self.time_grid) - 1

    @property
    def nfe(self) -> int:
        """Function evaluations one solve costs."""
        return self.steps * EVALS_PER_STEP[self.method]

    def _grid(self, interval: tuple[Any, Any] | None, x0: torch.Tensor) -> list[float] | list[torch.Tensor]:
        """The times a solve steps through: the grid, its part inside one interval, or per-sample times."""
        if interval is None:
            return self.time_grid
        start, end = interval
        if not isinstance(start, torch.Tensor):
            return sub_grid(self.time_grid, start, end)
        shape = (-1, *([1] * (x0.dim() - 1)))
        return [row.to(x0.device).view(shape) for row in per_sample_grid(self.time_grid, start, end)]

    def solve(
        self,
        field: Field,
        x0: torch.Tensor,
        cond: Any = None,
        *,
        return_trajectory: bool = False,
        enable_grad: bool = False,
        interval: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
    ) -> ODESolution:
        """Integrate ``field`` from ``x0`` along the time grid.

        Args:
            field: The velocity ``v(x, t, cond)``.
            x0: Start states at ``time_grid[0]`` (or at the interval's start), shape (B, ...).
            cond: Conditioning passed to every call of ``field``.
            return_trajectory: Also return every state on the grid and its time.
            enable_grad: Keep the autograd graph (for training through the solve).
            interval: Solve only ``[t_s, t_e]``, stepping through the grid's points inside it (:func:`sub_grid`):
                solving ``[t_s, t_m]`` and then ``[t_m, t_e]`` at a grid point ``t_m`` is one solve of ``[t_s, t_e]``.
                ``t_s`` and ``t_e`` may be (B,) tensors, one interval per sample, all spanning equally many grid
                steps (:func:`per_sample_grid`): one batched call per step instead of one solve per interval, each
                sample stepping through the same times as its own solve would.

        Returns:
            The end point, the number of evaluations and, on request, the trajectory.
        """
        grid = self._grid(interval, x0)
        f = _CountedField(field, cond)
        step = METHODS[self.method]
        x = x0
        states = [x0] if return_trajectory else None
        with torch.set_grad_enabled(enable_grad):
            for t, t_next in zip(grid, grid[1:], strict=False):
                dt = t_next - t
                x = step(f, x, t, dt.to(x.dtype) if isinstance(dt, torch.Tensor) else dt)
                if states is not None:
                    states.append(x)
        if states is None:
            return ODESolution(x=x, nfe=f.calls)
        if isinstance(grid[0], torch.Tensor):
            raise ValueError("return_trajectory needs one interval for the whole batch")
        times = torch.tensor(grid, dtype=torch.float32)
        return ODESolution(x=x, nfe=f.calls, states=torch.stack(states), times=times)
