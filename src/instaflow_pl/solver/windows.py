"""Time windows of piecewise rectified flow (PeRFlow, arXiv 2405.07510): K equal windows of t in [0, 1].

In our convention t = 0 is noise and t = 1 data, so window 0 is the one at the noise end. A piecewise flow is straight
inside each window; its sampler spends ``n >= K`` Euler steps, ``n // K`` in every window and the remainder in the
first windows (from noise), uniform inside a window, so every window boundary is a grid point (as PeRFlow's
``PeRFlowScheduler.set_timesteps`` allocates them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from instaflow_pl.errors import UserError
from instaflow_pl.solver.ode import UnequalIntervals


def check_windows(windows: int) -> int:
    """``windows`` as an int, or one line when it is below 1."""
    if int(windows) != windows or windows < 1:
        raise UserError(f"windows must be an integer >= 1, got {windows}")
    return int(windows)


def window_edges(windows: int) -> list[float]:
    """The ``windows + 1`` window boundaries ``k / K``, from 0 (noise) to 1 (data)."""
    windows = check_windows(windows)
    return [k / windows for k in range(windows + 1)]


def window_index(t: torch.Tensor, windows: int) -> torch.Tensor:
    """The window of each time in ``t`` (long, in ``[0, K - 1]``; a boundary belongs to the window it starts, t = 1
    to the last)."""
    windows = check_windows(windows)
    return (t * windows).floor().long().clamp(0, windows - 1)


def window_bounds(index: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end time of the windows ``index`` (float32 tensors of ``index``'s shape): ``k / K`` and
    ``(k + 1) / K``."""
    windows = check_windows(windows)
    start = index.to(torch.float32) / windows
    end = (index + 1).to(torch.float32) / windows
    return start, end


def window_steps(steps: int, windows: int) -> list[int]:
    """Sampling steps of each window: ``steps // K`` each, one more in the first ``steps % K`` windows."""
    windows = check_windows(windows)
    if steps < windows:
        raise UserError(
            f"{steps} sampling steps cannot cross {windows} windows of a piecewise flow: take at least {windows} "
            "steps (one per window)"
        )
    base, extra = divmod(int(steps), windows)
    return [base + (1 if k < extra else 0) for k in range(windows)]


def piecewise_grid(steps: int, windows: int = 1) -> list[float]:
    """The LatentODE time grid of ``steps`` Euler steps across ``windows`` windows (``windows = 1``: the uniform
    grid ``k / steps``). Every window boundary is a grid point."""
    edges = window_edges(windows)
    grid = [0.0]
    for k, n in enumerate(window_steps(steps, windows)):
        start, end = edges[k], edges[k + 1]
        grid += [start + (end - start) * j / n for j in range(1, n)] + [end]
    return grid


@dataclass
class WindowTargets:
    """What the teacher's window solves give a batch (see :func:`window_targets`).

    Attributes:
        start: ``z_s``, the forward marginal of each sample's data at its window's start, (B, ...).
        end: ``z_e``, where the teacher's solve of the window takes ``z_s``, (B, ...).
        target: The window's straight velocity ``(z_e - z_s) / (t_e - t_s)``, (B, ...).
        fraction: ``(t - t_s) / (t_e - t_s)``, how far into its window each sample's time is, (B,): the student's
            input is ``z_s + fraction (z_e - z_s)``.
        nfe: Solver evaluations per sample (a guided call counts once).
    """

    start: torch.Tensor
    end: torch.Tensor
    target: torch.Tensor
    fraction: torch.Tensor
    nfe: float


def window_targets(
    solver: Any,
    field: Any,
    x1: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    windows: int,
    cond: Any = None,
) -> WindowTargets:
    """PeRFlow's online targets: each sample's window ``[t_s, t_e]`` (from its time ``t``), ``z_s`` the solver's
    forward marginal of ``x1`` with ``noise`` at ``t_s`` (``solver.marginal``), ``z_e`` the solver's solve of the
    window from ``z_s`` (``solver.solve(..., interval=(t_s, t_e))``, one call per window present in the batch).

    With one window the solve is the full one from pure noise, so ``target = X1_teacher - X0``: InstaFlow's reflow
    target, computed online.

    Args:
        solver: A LatentODE or SchedulerODE (``can_solve_interval``) with the steps of all windows together.
        field: The teacher's model as the solver calls it (guidance wrapped around it if wanted).
        x1: Data (latents), (B, ...).
        noise: Standard normal noise of ``x1``'s shape.
        t: Training times in [0, 1], (B,).
        windows: Number of equal windows K.
        cond: The batch's condition (``rows(index)`` selects a window's samples), or None.
    """
    windows = check_windows(windows)
    index = window_index(t, windows)
    if getattr(solver, "solves_per_sample_intervals", False) and windows > 1:
        try:
            return _batched_window_targets(solver, field, x1, noise, t, index, windows, cond)
        except UnequalIntervals:  # e.g. a shifted grid: its windows hold different numbers of steps
            pass
    start, end = torch.empty_like(x1), torch.empty_like(x1)
    evaluations = 0
    with torch.no_grad():
        for k in index.unique().tolist():
            t_s, t_e = k / windows, (k + 1) / windows
            whole = bool((index == k).all())
            rows = slice(None) if whole else (index == k).nonzero().squeeze(1)
            sub_cond = cond if whole or cond is None else cond.rows(rows)
            z_s = solver.marginal(x1[rows], noise[rows], t_s)
            solution = solver.solve(field, z_s, sub_cond, interval=(t_s, t_e))
            start[rows], end[rows] = z_s, solution.x.to(x1.dtype)
            evaluations += solution.nfe * z_s.shape[0]
    return _targets(start, end, t, index, windows, evaluations / x1.shape[0])


def _batched_window_targets(
    solver: Any, field: Any, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, index: torch.Tensor,
    windows: int, cond: Any,
) -> WindowTargets:  # fmt: skip
    """Every window's solve in one batched solve, each sample on its own window's times (a LatentODE whose windows
    span equally many grid steps; one call of the field per step for the whole batch instead of one per window)."""
    t_s, t_e = index.double() / windows, (index + 1).double() / windows  # k / K as the per-window solves take it
    start = torch.empty_like(x1)
    with torch.no_grad():
        for k in index.unique().tolist():  # elementwise, at the window's start as a Python float (no network call)
            rows = index == k
            start[rows] = solver.marginal(x1[rows], noise[rows], k / windows)
        solution = solver.solve(field, start, cond, interval=(t_s, t_e))
    return _targets(start, solution.x.to(x1.dtype), t, index, windows, float(solution.nfe))


def _targets(
    start: torch.Tensor, end: torch.Tensor, t: torch.Tensor, index: torch.Tensor, windows: int, nfe: float
) -> WindowTargets:
    t_s, t_e = window_bounds(index, windows)
    span = (t_e - t_s).to(t.device)
    shape = (-1, *([1] * (start.dim() - 1)))
    target = (end - start) / span.view(shape).to(start.dtype)
    fraction = (t - t_s.to(t.device)) / span
    return WindowTargets(start, end, target, fraction, nfe)
