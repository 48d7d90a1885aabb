"""What a score network predicts and how it becomes a clean-sample prediction: the parametrisations DMD reads its
real and fake scores through (:mod:`instaflow_pl.modules.dmd`).

A velocity at our flow time t gives ``x1_hat = x_t + (1 - t) v`` on the straight path ``x_t = t X1 + (1 - t) X0``; an
epsilon, v or sample prediction of a diffusion teacher at diffusers timestep ``(1 - t) * N`` (rounded) is converted
through its scheduler's ``alphas_cumprod`` on the path ``x = sqrt(a) X1 + sqrt(1 - a) noise``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.velocity import NetworkVelocity

ScoreModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""A score network as its parametrisation calls it: ``f(x, model_time, cond)``."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (B,) shaped to broadcast against ``like`` (B, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like)


class FlowParametrisation:
    """A velocity ``v(x_t, t)`` on the straight path ``x_t = t X1 + (1 - t) X0`` (k-RF folders, SD3, Flux).

    The velocity is ``E[X1 - X0 | x_t]``, so ``x_t + (1 - t) v = E[X1 | x_t]``; the denoising loss is flow matching,
    ``||v - (X1 - X0)||^2``.
    """

    def noised(self, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The point at flow time ``t`` (B,) between ``noise`` and ``x1``."""
        tt = _per_sample(t, x1)
        return tt * x1 + (1 - tt) * noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network is called at (a velocity takes flow time itself)."""
        return t

    def to_x1(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean-sample prediction ``x + (1 - t) v``."""
        return x + (1 - _per_sample(t, x)) * out

    def target(self, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto: ``X1 - X0``."""
        return x1 - noise


class DiffusionParametrisation:
    """A diffusion network's epsilon, v or sample prediction at a discrete timestep (SD, SDXL).

    Flow time t maps to timestep ``round((1 - t) * N)`` (clamped to ``[0, N - 1]``, N the number of training
    timesteps), as the project reports scheduler steps (``t = 1 - timestep / N``); ``a`` is ``alphas_cumprod`` there.

    Args:
        alphas_cumprod: The scheduler's cumulative alphas, (N,).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` (the scheduler config's).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"prediction_type {prediction_type!r} is not epsilon, v_prediction or sample")
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction_type = prediction_type

    @property
    def num_train_timesteps(self) -> int:
        """N, the number of training timesteps."""
        return len(self.alphas_cumprod)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Diffusers timestep of flow time ``t``: ``round((1 - t) * N)`` in ``[0, N - 1]`` (as floats)."""
        n = self.num_train_timesteps
        return ((1 - t.double()) * n).round().clamp(0, n - 1).to(t.dtype)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        index = self.model_time(t).long().cpu()
        return self.alphas_cumprod[index].reshape(-1, *([1] * (like.ndim - 1))).to(like.device)

    def noised(self, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(a) X1 + sqrt(1 - a) noise`` (diffusers' ``add_noise``)."""
        a = self._alpha(t, x1)
        return (a.sqrt() * x1 + (1 - a).sqrt() * noise).to(x1.dtype)

    def to_x1(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean-sample prediction from the network's output (diffusers' ``pred_original_sample``)."""
        a = self._alpha(t, x)
        if self.prediction_type == "epsilon":
            x1 = (x - (1 - a).sqrt() * out) / a.sqrt()
        elif self.prediction_type == "v_prediction":
            x1 = a.sqrt() * x - (1 - a).sqrt() * out
        else:
            x1 = out
        return x1.to(out.dtype)

    def target(self, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's regression target: the noise, the velocity ``sqrt(a) noise - sqrt(1 - a) X1``, or X1."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x1
        a = self._alpha(t, x1)
        return (a.sqrt() * noise - (1 - a).sqrt() * x1).to(x1.dtype)


Parametrisation = FlowParametrisation | DiffusionParametrisation


def parametrisation_of(model: nn.Module, scheduler_config: dict[str, Any]) -> Parametrisation:
    """The parametrisation of a teacher's model: a velocity for velocity folders and flow families, else the
    diffusion prediction its scheduler config names (alphas from the config's beta schedule)."""
    if isinstance(model, NetworkVelocity):
        return FlowParametrisation()
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(config)
    return DiffusionParametrisation(scheduler.alphas_cumprod, scheduler.config.prediction_type)


def predict_x1(param: Parametrisation, model: ScoreModel, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """``model``'s prediction of the clean sample at the noised point ``x`` at flow time ``t`` (B,)."""
    return param.to_x1(x, t, model(x, param.model_time(t), cond))


def denoising_loss(
    param: Parametrisation, model: ScoreModel, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Any
) -> torch.Tensor:
    """The score network's own training loss per sample: mean squared error to its target at ``x1`` noised to ``t``
    (flow matching for a velocity; epsilon / v / sample matching for a diffusion network)."""
    out = model(param.noised(x1, noise, t), param.model_time(t), cond)
    return (out.float() - param.target(x1, noise, t).float()).pow(2).flatten(1).mean(1)
