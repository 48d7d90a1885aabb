"""Piecewise rectified flow's maths: windows, step allocation, sub-interval solves and online window targets."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from instaflow_pl.errors import UserError
from instaflow_pl.solver import LatentODE, SchedulerODE, piecewise_grid, window_index, window_steps, window_targets
from instaflow_pl.solver.ode import sub_grid, uniform_grid

# Stable Diffusion 1.5's scheduler settings (its scheduler_config.json).
SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def curved_field(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """A time-dependent, non-linear velocity: Euler steps of it are anything but exact."""
    return torch.sin(3.0 * x) * (1.0 + t.view(-1, *([1] * (x.dim() - 1)))) - x


def predictor(x: torch.Tensor, timestep, cond=None) -> torch.Tensor:
    """A made-up epsilon predictor that depends on the state and the timestep."""
    return 0.3 * torch.tanh(x) + float(timestep) / 2000.0


# ---- windows and the sampling grid -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "windows", "expected"),
    [(4, 4, [1, 1, 1, 1]), (5, 4, [2, 1, 1, 1]), (7, 4, [2, 2, 2, 1]), (8, 4, [2, 2, 2, 2]), (7, 2, [4, 3])],
)
def test_step_allocation_gives_the_remainder_to_the_first_windows(steps, windows, expected):
    assert window_steps(steps, windows) == expected


def test_piecewise_grid_is_uniform_inside_windows_with_every_boundary_a_grid_point():
    grid = piecewise_grid(7, 4)  # 2, 2, 2, 1 steps
    assert grid == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0])
    for boundary in (0.25, 0.5, 0.75):
        assert boundary in grid  # exactly, not to rounding
    assert piecewise_grid(5, 1) == uniform_grid(5)  # one window: the uniform grid, bit for bit
    three = piecewise_grid(4, 3)  # 2, 1, 1 steps
    assert three == pytest.approx([0, 1 / 6, 1 / 3, 2 / 3, 1.0]) and 1 / 3 in three and 2 / 3 in three


def test_window_index_boundaries_belong_to_the_window_they_start():
    t = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.99, 1.0])
    assert window_index(t, 4).tolist() == [0, 0, 1, 2, 3, 3]


@pytest.mark.parametrize("bad", [0, -1])
def test_windows_below_one_are_one_line(bad):
    with pytest.raises(UserError, match="windows must be an integer >= 1"):
        piecewise_grid(4, bad)


def test_fewer_steps_than_windows_is_one_line():
    with pytest.raises(UserError, match="3 sampling steps cannot cross 4 windows"):
        piecewise_grid(3, 4)


# ---- sub-interval solves -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_latent_ode_intervals_chain_into_one_solve(method):
    x = torch.randn(3, 2, 4, 4)
    ode = LatentODE(method, steps=12)
    full = ode.solve(curved_field, x, interval=(0.25, 0.75))
    first = ode.solve(curved_field, x, interval=(0.25, 0.5))
    second = ode.solve(curved_field, first.x, interval=(0.5, 0.75))
    assert torch.equal(second.x, full.x)
    assert first.nfe + second.nfe == full.nfe == 6 * (2 if method == "heun" else 1)
    # and [0, 1] as two halves is the plain solve
    halves = ode.solve(curved_field, ode.solve(curved_field, x, interval=(0.0, 0.5)).x, interval=(0.5, 1.0))
    assert torch.equal(halves.x, ode.solve(curved_field, x).x)


def test_sub_grid_keeps_the_grid_inside_and_adds_the_ends():
    assert sub_grid(uniform_grid(8), 0.25, 0.5) == [0.25, 0.375, 0.5]
    assert sub_grid([0.0, 0.3, 0.6, 1.0], 0.25, 0.5) == [0.25, 0.3, 0.5]
    with pytest.raises(UserError, match="0 <= start < end <= 1"):
        sub_grid(uniform_grid(8), 0.5, 0.5)


def ddim(steps: int) -> SchedulerODE:
    return SchedulerODE(DDIMScheduler.from_config(SD15), steps)


def test_scheduler_interval_solve_is_the_full_solve_on_the_same_timesteps():
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    solver = ddim(32)
    full = solver.solve(predictor, noise, return_trajectory=True)
    # Start an interval from the full solve's state at a timestep inside it: it ends where the full solve is.
    times = full.times.tolist()
    k = next(i for i, t in enumerate(times) if t >= 0.25)
    m = next(i for i, t in enumerate(times) if t >= 0.5)
    middle = solver.solve(predictor, full.states[k], interval=(0.25, 0.5))
    assert torch.equal(middle.x, full.states[m])
    assert middle.nfe == m - k
    # Windows one after another make up the full solve exactly (DDIM keeps no history).
    x = noise
    for start, end in [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]:
        x = solver.solve(predictor, x, interval=(start, end)).x
    assert torch.equal(x, full.x)


def test_multistep_scheduler_first_window_is_the_full_solves_start():
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    solver = SchedulerODE(DPMSolverMultistepScheduler.from_config(SD15), 20)
    full = solver.solve(predictor, noise, return_trajectory=True)
    first = solver.solve(predictor, noise, interval=(0.0, 0.5), return_trajectory=True)
    assert torch.equal(first.x, full.states[len(first.times) - 1])
    later = solver.solve(predictor, first.x, interval=(0.5, 1.0))  # restarts its history: close, not equal
    assert torch.allclose(later.x, full.x, atol=0.05) and later.nfe + first.nfe == full.nfe


def test_scheduler_marginal_is_ddpm_at_the_windows_first_timestep_and_noise_at_the_start():
    solver = ddim(8)
    x1, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(solver.marginal(x1, noise, 0.0), noise)
    # 8 leading steps of SD 1.5: timesteps 876, 751, ... 1; the first at or after t = 0.25 is 751 (t = 0.249 < 0.25
    # belongs to the first window), then 626.
    alpha = solver.scheduler.alphas_cumprod[626].double()
    expected = (alpha.sqrt() * x1 + (1 - alpha).sqrt() * noise).float()
    assert torch.allclose(solver.marginal(x1, noise, 0.25), expected, atol=1e-6)


def test_a_scheduler_that_cannot_solve_a_sub_interval_is_one_line():
    solver = SchedulerODE(PNDMScheduler.from_config(SD15), 8)
    assert not solver.can_solve_interval and ddim(8).can_solve_interval and LatentODE().can_solve_interval
    with pytest.raises(UserError, match="PNDMScheduler solver cannot solve a sub-interval"):
        solver.solve(predictor, torch.randn(1, 4, 8, 8), interval=(0.25, 0.5))


# ---- online window targets -----------------------------------------------------------------------------------------


def test_one_window_target_is_the_stored_pair_reflow_target():
    """K = 1 and a full solve from pure noise: the online target is X1_teacher - X0 bit for bit."""
    x1, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    t = torch.rand(5)
    for solver in (LatentODE("euler", 6), ddim(6)):
        field = curved_field if isinstance(solver, LatentODE) else predictor
        pair_x1 = solver.solve(field, noise).x
        online = window_targets(solver, field, x1, noise, t, windows=1)
        assert torch.equal(online.target, pair_x1 - noise)
        assert torch.equal(online.start, noise) and torch.equal(online.fraction, t)


def test_a_straight_teacher_target_is_its_own_velocity():
    """A teacher whose flow is already straight (X1 = M X0 + b, the straight flow between them: a velocity linear
    in x) gives every window the same straight velocity, M X0 + b - X0."""
    torch.manual_seed(0)
    m = torch.eye(3) + 0.3 * torch.randn(3, 3)
    b = torch.randn(3)

    def straight(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        # x = X0 + t ((M - I) X0 + b)  =>  X0 = (I + t (M - I))^-1 (x - t b); v = (M - I) X0 + b.
        tt = t.view(-1, 1, 1)
        eye = torch.eye(3, dtype=x.dtype)
        x0 = torch.linalg.solve(eye + tt * (m.to(x.dtype) - eye), (x - tt.squeeze(-1) * b.to(x.dtype)).unsqueeze(-1))
        return (x0.squeeze(-1) @ (m.to(x.dtype) - eye).T) + b.to(x.dtype)

    noise = torch.randn(64, 3, dtype=torch.float64)
    x1 = noise @ m.double().T + b.double()  # data on the straight flow's end points
    t = torch.rand(64, dtype=torch.float64)
    out = window_targets(LatentODE("euler", 8), straight, x1, noise, t, windows=4)
    assert torch.allclose(out.target, x1 - noise, atol=1e-10)
    assert torch.allclose(out.target, straight(out.start + out.fraction.view(-1, 1) * (out.end - out.start), t))
    assert out.nfe == 2  # 8 steps over 4 windows: 2 per sample


def test_window_targets_solve_each_window_from_its_marginal():
    x1, noise = torch.randn(16, 2, 4, 4), torch.randn(16, 2, 4, 4)
    t = torch.linspace(0.01, 0.99, 16)
    solver = LatentODE("euler", 8)
    out = window_targets(solver, curved_field, x1, noise, t, windows=4)
    for i in (0, 7, 15):
        k = int(t[i] * 4)
        z_s = k / 4 * x1[i : i + 1] + (1 - k / 4) * noise[i : i + 1]
        z_e = solver.solve(curved_field, z_s, interval=(k / 4, (k + 1) / 4)).x
        assert torch.allclose(out.start[i : i + 1], z_s) and torch.allclose(out.end[i : i + 1], z_e, atol=1e-6)
        assert torch.allclose(out.target[i], (z_e[0] - z_s[0]) * 4, atol=1e-5)
        assert torch.isclose(out.fraction[i], t[i] * 4 - k, atol=1e-6)


@pytest.mark.parametrize("method, windows", [("euler", 4), ("heun", 4), ("euler", 3)])
def test_batched_window_solves_equal_one_solve_per_window_in_one_call_per_step(method, windows):
    x1, noise = torch.randn(32, 2, 4, 4), torch.randn(32, 2, 4, 4)
    t = torch.rand(32, generator=torch.Generator().manual_seed(0))
    solver = LatentODE(method, 2 * windows)
    calls = []

    def counted(x, tt, cond=None):
        calls.append(x.shape[0])
        return curved_field(x, tt, cond)

    out = window_targets(solver, counted, x1, noise, t, windows=windows)
    assert calls == [32] * (solver.nfe // windows)  # the whole batch in each call: 2 steps per window
    index = (t * windows).floor().long()
    for k in range(windows):
        rows = index == k
        z_s = k / windows * x1[rows] + (1 - k / windows) * noise[rows]
        z_e = solver.solve(curved_field, z_s, interval=(k / windows, (k + 1) / windows)).x
        assert torch.equal(out.start[rows], z_s) and torch.equal(out.end[rows], z_e)  # bit for bit
    assert out.nfe == solver.nfe // windows


def test_windows_of_unequal_step_counts_are_solved_one_by_one():
    grid = [0.0, 0.1, 0.2, 0.3, 0.5, 1.0]  # window [0, 0.5] holds 4 steps, [0.5, 1] one
    solver = LatentODE("euler", time_grid=grid)
    x1, noise, t = torch.randn(6, 3), torch.randn(6, 3), torch.tensor([0.1, 0.2, 0.4, 0.6, 0.7, 0.9])
    out = window_targets(solver, curved_field, x1, noise, t, windows=2)
    late = solver.solve(curved_field, 0.5 * x1[3:] + 0.5 * noise[3:], interval=(0.5, 1.0)).x
    assert torch.equal(out.end[3:], late) and out.nfe == (3 * 4 + 3 * 1) / 6
