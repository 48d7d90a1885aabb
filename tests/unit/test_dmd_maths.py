"""The maths of distribution-matching distillation (modules/dmd.py): the clean-sample predictions of each
parametrisation, the DMD gradient, the update-ratio schedule, and DMD on a Gaussian teacher with an analytic velocity.

For data N(m, s^2) (per coordinate) and noise N(0, 1) on the straight path x_t = t X1 + (1 - t) X0, x_t is Gaussian
with mean t m and variance V = t^2 s^2 + (1 - t)^2, and (X1, x_t) are jointly Gaussian, so
E[X1 | x_t] = m + t s^2 / V (x_t - t m) and E[X0 | x_t] = (1 - t) / V (x_t - t m); the velocity is their difference.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from instaflow_pl.modules.dmd import (
    DiffusionParametrisation,
    FlowParametrisation,
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    is_generator_step,
    predict_x1,
    uniform_t,
)

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def gaussian_velocity(m: float, s: float):
    """The exact velocity of data N(m, s^2) against unit noise on the straight path."""

    def velocity(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = tt**2 * s**2 + (1 - tt) ** 2
        centred = x - tt * m
        return m + tt * s**2 / var * centred - (1 - tt) / var * centred

    return velocity


def gaussian_posterior_mean(m: float, s: float, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """E[X1 | x] for x = sqrt(a) X1 + sqrt(1 - a) noise (a diffusion marginal)."""
    return m + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * m)


def ddim(prediction_type: str) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(50)
    return scheduler


# ---- clean-sample predictions --------------------------------------------------------------------------------------


def test_flow_x1_of_the_exact_velocity_is_x1_and_of_the_gaussian_velocity_the_posterior_mean():
    torch.manual_seed(0)
    param = FlowParametrisation()
    x1, x0, t = torch.randn(6, 3), torch.randn(6, 3), torch.rand(6)
    x_t = param.noised(x1, x0, t)
    assert torch.allclose(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0)
    assert torch.allclose(param.to_x1(x_t, t, param.target(x1, x0, t)), x1, atol=1e-6)
    m, s = 2.0, 0.5
    predicted = predict_x1(param, gaussian_velocity(m, s), x_t, t, None)
    var = (t**2 * s**2 + (1 - t) ** 2)[:, None]
    assert torch.allclose(predicted, m + t[:, None] * s**2 / var * (x_t - t[:, None] * m), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_x1_and_noising_match_diffusers(prediction_type):
    """to_x1 is DDIM's pred_original_sample, noised is add_noise, and the target is recovered exactly."""
    torch.manual_seed(0)
    scheduler = ddim(prediction_type)
    param = DiffusionParametrisation(scheduler.alphas_cumprod, prediction_type)
    x1, noise, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    for t in (0.02, 0.3, 0.71, 0.98):
        tt = torch.full((3,), t)
        timestep = int(param.model_time(tt)[0])
        assert timestep == round((1 - t) * 1000)
        x = param.noised(x1, noise, tt)
        assert torch.allclose(x, scheduler.add_noise(x1, noise, torch.full((3,), timestep)), atol=1e-6)
        expected = scheduler.step(out, timestep, x).pred_original_sample
        assert torch.allclose(param.to_x1(x, tt, out), expected, atol=1e-5), t
        assert torch.allclose(param.to_x1(x, tt, param.target(x1, noise, tt)), x1, atol=1e-4)
    assert param.model_time(torch.tensor([0.0, 1.0])).tolist() == [999.0, 0.0]


def test_velocity_epsilon_and_v_predictions_of_one_gaussian_model_agree():
    """The exact epsilon and v predictions of a Gaussian, and its exact velocity at the flow point of the same noise
    level (t / (1 - t) = sqrt(a / (1 - a)), x_flow = x / (sqrt(a) + sqrt(1 - a))), all give E[X1 | x]."""
    torch.manual_seed(0)
    m, s = 1.5, 0.7
    alphas = DDIMScheduler(**SD_SCHEDULE).alphas_cumprod
    eps_param = DiffusionParametrisation(alphas, "epsilon")
    v_param = DiffusionParametrisation(alphas, "v_prediction")
    flow = FlowParametrisation()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    a = alphas[eps_param.model_time(t).long()].double()[:, None]
    x = torch.randn(4, 5).double() * 1.3
    mean = gaussian_posterior_mean(m, s, x, a)
    eps = (x - a.sqrt() * mean) / (1 - a).sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * mean
    flow_t = (a.sqrt() / (a.sqrt() + (1 - a).sqrt()))[:, 0]
    flow_x = x / (a.sqrt() + (1 - a).sqrt())
    from_eps = eps_param.to_x1(x, t, eps)
    from_v = v_param.to_x1(x, t, v)
    from_flow = predict_x1(flow, gaussian_velocity(m, s), flow_x, flow_t, None)
    for other in (from_v, from_flow):
        assert torch.allclose(from_eps, other, atol=1e-9), (from_eps - other).abs().max()
    assert torch.allclose(from_eps, mean, atol=1e-9)


def test_denoising_loss_is_zero_for_the_exact_prediction():
    torch.manual_seed(0)
    x1, noise, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    flow = FlowParametrisation()
    exact = lambda x, tt, cond: x1 - noise  # noqa: E731
    assert denoising_loss(flow, exact, x1, noise, t, None).abs().max() == 0
    assert denoising_loss(flow, lambda x, tt, c: torch.zeros_like(x), x1, noise, t, None).allclose(
        (x1 - noise).pow(2).mean(1)
    )


# ---- the generator's gradient and the update schedule ---------------------------------------------------------------


def test_generator_gradient_is_zero_when_the_fake_score_equals_the_real_one():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    real = torch.randn(3, 4, 2, 2)
    assert dmd_gradient(x.detach(), real, real).abs().max() == 0
    dmd_loss(x, real, real.clone()).sum().backward()
    assert x.grad.abs().max() == 0


def test_generator_gradient_is_the_normalised_score_difference():
    """d/dx of 0.5 mean((x - sg(x - g))^2) is g / numel per sample, g = (fake - real) / mean|x - real|."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, requires_grad=True)
    real, fake = torch.randn(2, 6), torch.randn(2, 6)
    dmd_loss(x, real, fake).sum().backward()
    g = (fake - real) / (x.detach() - real).abs().mean(1, keepdim=True)
    assert torch.allclose(x.grad, g / 6, atol=1e-6)
    assert torch.allclose(dmd_gradient(x.detach(), real, fake), g)


def test_update_ratio_schedule():
    assert [i for i in range(30) if is_generator_step(i, 10)] == [0, 10, 20]
    assert [i for i in range(4) if is_generator_step(i, 1)] == [0, 1, 2, 3]
    t = uniform_t(10_000, 0.02, 0.98)
    assert t.min() >= 0.02 and t.max() <= 0.98 and abs(t.mean().item() - 0.5) < 0.01


# ---- DMD on a Gaussian teacher --------------------------------------------------------------------------------------

TEACHER_M, TEACHER_S = 2.0, 0.5
DIM = 8


class AffineGenerator(torch.nn.Module):
    """x = a + b z per coordinate: the one-step generator of a Gaussian (mis-specified at a = 0, b = 1.5)."""

    def __init__(self, a: float = 0.0, b: float = 1.5):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.log_b = torch.nn.Parameter(torch.tensor(math.log(b)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a + self.log_b.exp() * z


class AffineVelocity(torch.nn.Module):
    """A fake score of the Gaussian family's form, v = A(t) x + B(t), with A and B polynomials in t."""

    def __init__(self, degree: int = 6):
        super().__init__()
        self.coefficients = torch.nn.Parameter(torch.zeros(2, degree + 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        powers = torch.stack([t**k for k in range(self.coefficients.shape[1])], dim=1)  # (B, K)
        slope, offset = (powers @ self.coefficients.T).unbind(1)
        return slope[:, None] * x + offset[:, None]


def run_dmd(steps: int, generator_every: int, fake: str, seed: int = 0) -> tuple[AffineGenerator, list[float]]:
    """DMD with the module's functions: the real score is the teacher's exact velocity; the fake score is the
    generator's exact velocity (``exact``) or an AffineVelocity fitted online by flow matching (``learned``)."""
    torch.manual_seed(seed)
    param = FlowParametrisation()
    generator = AffineGenerator()
    real = gaussian_velocity(TEACHER_M, TEACHER_S)
    generator_opt = torch.optim.Adam(generator.parameters(), lr=0.02)
    fake_net = AffineVelocity()
    fake_opt = torch.optim.Adam(fake_net.parameters(), lr=0.05)
    for iteration in range(steps):
        x = generator(torch.randn(256, DIM))
        if is_generator_step(iteration, generator_every):
            t = uniform_t(len(x), 0.02, 0.98)
            x_t = param.noised(x.detach(), torch.randn_like(x), t)
            if fake == "exact":
                fake_field = gaussian_velocity(generator.a.item(), generator.log_b.exp().item())
            else:
                fake_field = fake_net
            with torch.no_grad():
                real_x1, fake_x1 = predict_x1(param, real, x_t, t, None), predict_x1(param, fake_field, x_t, t, None)
            generator_opt.zero_grad()
            dmd_loss(x, real_x1, fake_x1).mean().backward()
            generator_opt.step()
        if fake == "learned":
            t = uniform_t(len(x), 0.02, 0.98)
            fake_opt.zero_grad()
            denoising_loss(param, fake_net, x.detach(), torch.randn_like(x), t, None).mean().backward()
            fake_opt.step()
    return generator, [generator.a.item(), generator.log_b.exp().item()]


def test_dmd_with_the_exact_fake_score_moves_a_gaussian_generator_to_the_teacher():
    """300 generator steps from N(0, 1.5^2) toward N(2, 0.5^2), the fake score exact at every step."""
    _, (mean, std) = run_dmd(300, 1, "exact")
    print(f"\nexact fake score, 300 steps: mean 0 -> {mean:.3f} (teacher 2), std 1.5 -> {std:.3f} (teacher 0.5)")
    assert abs(mean - TEACHER_M) < 0.02 and abs(std - TEACHER_S) < 0.02  # measured: 2.000, 0.500


def test_dmd_with_a_learned_fake_score_and_two_time_scales_moves_the_generator_toward_the_teacher():
    """The DMD2 loop: the fake score fitted by flow matching every iteration, the generator every 5th."""
    _, (mean, std) = run_dmd(1500, 5, "learned")
    print(f"\nlearned fake score, 1500 iterations / 300 generator steps: mean 0 -> {mean:.3f}, std 1.5 -> {std:.3f}")
    assert abs(mean - TEACHER_M) < 0.05 and abs(std - TEACHER_S) < 0.05  # measured: 1.999, 0.501
