"""Straightness of a flow along its own simulated trajectory (0 = straight)."""

from __future__ import annotations

import torch

from instaflow_pl.solver import ODESolution


def straightness(solution: ODESolution) -> torch.Tensor:
    """``S = int_0^1 E || (Z1 - Z0) - v(Z_t, t) ||^2 dt`` from an Euler trajectory, per sample.

    On an Euler trajectory the velocity used on step k is ``(Z_{k+1} - Z_k) / dt_k``; the integral is the dt-weighted
    sum over steps. The squared norm is averaged over the latent's elements (so S does not grow with image size).

    Args:
        solution: An Euler solve with ``return_trajectory=True``.

    Returns:
        S for each sample, shape (B,).
    """
    if solution.states is None or solution.times is None:
        raise ValueError("straightness needs the trajectory: solve with return_trajectory=True")
    states, times = solution.states.float(), solution.times.to(solution.states.device).float()
    dt = times[1:] - times[:-1]
    shape = (-1,) + (1,) * (states.dim() - 1)
    velocities = (states[1:] - states[:-1]) / dt.view(shape)
    chord = states[-1] - states[0]
    gap = (chord.unsqueeze(0) - velocities).pow(2).flatten(2).mean(dim=2)  # (K, B)
    return (gap * dt.view(-1, 1)).sum(dim=0)
