"""LatentODE against analytic ODEs: accuracy, order of convergence, trajectories, NFE counts, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from instaflow_pl.errors import UserError
from instaflow_pl.solver import ORDERS, LatentODE


def rotation_field(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """dx/dt = (1 + t) A x with A a rotation generator: x(t) = R((t + t^2/2)) x0 (time-dependent, curved)."""
    scale = (1.0 + t).view(-1, 1)
    return scale * torch.stack([-x[:, 1], x[:, 0]], dim=1)


def rotation_exact(x0: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    angle = t + t * t / 2.0
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)


X0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)


@pytest.mark.parametrize("method", list(ORDERS))
def test_method_solves_analytic_ode(method):
    solution = LatentODE(method, steps=200).solve(rotation_field, X0)
    tolerance = {"euler": 2e-2, "midpoint": 1e-4, "heun": 1e-4, "rk4": 1e-9}[method]
    assert torch.allclose(solution.x, rotation_exact(X0), atol=tolerance)


@pytest.mark.parametrize("method", list(ORDERS))
def test_measured_order_of_convergence(method):
    errors = [
        (LatentODE(method, steps=n).solve(rotation_field, X0).x - rotation_exact(X0)).norm().item() for n in (16, 32)
    ]
    measured = math.log2(errors[0] / errors[1])
    assert abs(measured - ORDERS[method]) < 0.25, f"{method}: measured order {measured:.2f}"


@pytest.mark.parametrize("method", list(ORDERS))
def test_straight_line_is_exact_in_one_step(method):
    """A constant velocity (a straight flow, X1 - X0) is integrated exactly by every method in one step."""
    x1 = torch.randn(3, 4, 2, 2)
    x0 = torch.randn(3, 4, 2, 2)
    solution = LatentODE(method, steps=1).solve(lambda x, t, c: x1 - x0, x0)
    assert torch.allclose(solution.x, x1, atol=1e-6)


def test_trajectory_and_nfe():
    ode = LatentODE("heun", time_grid=[0.0, 0.25, 0.5, 1.0])
    solution = ode.solve(rotation_field, X0, return_trajectory=True)
    assert solution.nfe == ode.nfe == 6
    assert solution.states.shape == (4, 2, 2)
    assert torch.equal(solution.states[0], X0)
    assert torch.equal(solution.states[-1], solution.x)
    assert solution.times.tolist() == [0.0, 0.25, 0.5, 1.0]


def test_field_receives_per_sample_times_and_condition():
    seen = []

    def field(x, t, cond):
        seen.append((t.clone(), cond))
        return torch.zeros_like(x)

    LatentODE("euler", steps=2).solve(field, torch.zeros(3, 1), cond="prompt")
    assert [s[0].tolist() for s in seen] == [[0.0] * 3, [0.5] * 3]
    assert all(s[1] == "prompt" for s in seen)


def test_grad_on_and_off():
    weight = torch.tensor(0.5, requires_grad=True)

    def field(x, t, cond):
        return weight * x

    x0 = torch.ones(2, 3)
    with_grad = LatentODE("rk4", steps=4).solve(field, x0, enable_grad=True)
    with_grad.x.sum().backward()
    assert weight.grad is not None and weight.grad.item() > 0
    without = LatentODE("rk4", steps=4).solve(field, x0)
    assert not without.x.requires_grad
    assert torch.allclose(without.x, with_grad.x.detach())


def test_bad_solver_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown ODE method 'rk5'"):
        LatentODE("rk5")
    with pytest.raises(UserError, match="strictly increasing"):
        LatentODE("euler", time_grid=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(UserError, match="steps must be >= 1"):
        LatentODE("euler", steps=0)
