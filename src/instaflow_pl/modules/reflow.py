"""ReflowModule: text-conditioned reflow, ``min E || (X1 - X0) - v(X_t, t | T) ||^2``."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_pl.conventions import images_to_latents
from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules.base import FlowModule, StepOutput
from instaflow_pl.modules.timesampling import T_DISTRIBUTIONS, sample_t
from instaflow_pl.velocity import TextCondition


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``X_t = t X1 + (1 - t) X0`` with one t per sample (t = 0 noise, t = 1 data)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return t * x1 + (1.0 - t) * x0


class ReflowModule(FlowModule):
    """Trains a velocity on fixed (X0, X1, prompt) triples so its flow becomes straighter (k-RF -> (k+1)-RF).

    With batches whose ``x0`` is missing (images + prompts, no pairs), fresh noise is drawn: that is the
    independent coupling of a 1-rectified flow trained from data, with the same loss.

    Args:
        base_model: Diffusers-format folder the model is trained from (see FlowModule).
        t_distribution: ``uniform`` (the paper), ``logit_normal`` or ``u_shaped`` (2-rectified flow++).
        t_loc: Mean under the logit for ``logit_normal``.
        t_scale: Its standard deviation.
        t_sharpness: Sharpness ``a`` of ``u_shaped`` (density proportional to ``cosh(a (t - 1/2))``).
        loss_bins: Number of equal t-bins whose loss is logged (``train/loss_t0.00-0.25`` ...): where the flow
            is still curved.
        encode_images: Batches hold images in [-1, 1] (an ImagePromptDataModule): encode them with the base
            model's VAE to scaled latents, ``latent_dist.sample() * scaling_factor``.
        velocity: The velocity network (default: the network of ``base_model``, a UNet or a transformer).
        **kwargs: The shared training options of FlowModule (optimizer, schedule, EMA, freezing, validation).
    """

    def __init__(
        self,
        base_model: str,
        velocity: nn.Module | None = None,
        t_distribution: str = "uniform",
        t_loc: float = 0.0,
        t_scale: float = 1.0,
        t_sharpness: float = 4.0,
        loss_bins: int = 4,
        encode_images: bool = False,
        **kwargs,
    ):
        if t_distribution not in T_DISTRIBUTIONS:
            raise UserError(f"unknown t distribution {t_distribution!r}: choose one of {', '.join(T_DISTRIBUTIONS)}")
        if loss_bins < 1:
            raise UserError(f"loss_bins must be >= 1, got {loss_bins}")
        super().__init__(base_model, velocity, **kwargs)
        self.vae = None
        if encode_images:
            from instaflow_pl.model_folder import ModelFolder

            folder = ModelFolder.open(base_model)
            if folder.vae_config is None:
                raise UserError(f"encode_images needs a VAE, but {folder.root} has no vae/ subfolder")
            self.vae = folder.load_vae()

    @torch.no_grad()
    def to_latents(self, batch: TripleBatch) -> TripleBatch:
        """Encode image batches with the VAE when ``encode_images`` is on."""
        if self.vae is None:
            return batch
        latents = images_to_latents(self.vae, batch.x1)
        return TripleBatch(batch.x0, latents.float(), batch.prompts, batch.index)

    def draw_t(self, batch: int) -> torch.Tensor:
        """Training times for a batch from the configured distribution."""
        h = self.hparams
        return sample_t(h.t_distribution, batch, self.device, h.t_loc, h.t_scale, h.t_sharpness)

    def compute_loss(self, batch: TripleBatch, cond: TextCondition) -> StepOutput:
        """Velocity matching on the straight line from X0 to X1."""
        x1 = batch.x1
        x0 = batch.x0 if batch.x0 is not None else torch.randn_like(x1)
        t = self.draw_t(x1.shape[0])
        prediction = self.velocity(interpolate(x0, x1, t), t, cond)
        per_sample = (prediction.float() - (x1 - x0).float()).pow(2).flatten(1).mean(dim=1)
        return StepOutput(per_sample.mean(), per_sample, t, self._binned(per_sample.detach(), t))

    def _binned(self, per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        bins = self.hparams.loss_bins
        index = (t * bins).long().clamp(max=bins - 1)
        out = {}
        for b in range(bins):
            mask = index == b
            if mask.any():
                out[f"loss_t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = per_sample[mask].mean()
        return out
