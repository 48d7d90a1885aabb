"""ReflowModule: text-conditioned reflow, ``min E || (X1 - X0) - v(X_t, t | T) ||^2``, on stored pairs or, with a
teacher in the module, on pairs its solver makes online, window by window (piecewise rectified flow, PeRFlow)."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_pl.conventions import images_to_latents
from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules.base import FlowModule, StepOutput
from instaflow_pl.modules.losses import l2_distance, pseudo_huber_distance
from instaflow_pl.modules.timesampling import T_DISTRIBUTIONS, sample_t
from instaflow_pl.solver import piecewise_grid, window_targets
from instaflow_pl.solver.windows import check_windows
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkVelocity, TextCondition

VELOCITY_LOSSES = ("mse", "huber")
"""``loss``: the squared error of the velocity (InstaFlow, PeRFlow) or its pseudo-Huber (2-rectified flow++)."""
DEFAULT_HUBER_C = 0.00054
"""``huber_c``: iCT's ``c = 0.00054 sqrt(d)`` (d: elements per sample) in this per-element-mean form (see
:meth:`ReflowModule.velocity_loss`)."""


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``X_t = t X1 + (1 - t) X0`` with one t per sample (t = 0 noise, t = 1 data)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return t * x1 + (1.0 - t) * x0


class ReflowModule(FlowModule):
    """Trains a velocity on fixed (X0, X1, prompt) triples so its flow becomes straighter (k-RF -> (k+1)-RF).

    With batches whose ``x0`` is missing (images + prompts, no pairs), fresh noise is drawn: that is the
    independent coupling of a 1-rectified flow trained from data, with the same loss.

    With a ``teacher``, the pairs are made online (piecewise rectified flow, PeRFlow, arXiv 2405.07510): t in [0, 1]
    is cut into ``windows`` equal windows; a sample's time t falls in window ``[t_s, t_e]``, ``z_s`` is the teacher's
    forward marginal of the batch's data X1 at ``t_s`` (``t_s X1 + (1 - t_s) X0`` for flow teachers and velocity
    folders; the DDPM marginal at the window's first timestep for SD and SDXL), ``z_e`` the teacher's solve of the
    window from ``z_s`` (``window_solver_steps`` steps: the LatentODE on the sub-grid, or the scheduler on its
    timesteps in the window), and the student learns ``(z_e - z_s) / (t_e - t_s)`` at ``z_s + (t - t_s)`` times that.
    The noise X0 is drawn from the batch's seeded generator, so a resumed fit makes the same pairs. With one window
    the solve starts from pure noise and runs the whole way: InstaFlow's reflow target, computed online. The model
    then samples with ``n >= windows`` Euler steps, ``n // windows`` per window (the remainder in the first ones).

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
        teacher: Diffusers-format folder (or hub id) of the teacher whose windows the model learns (a released SD,
            SDXL, SD3 or Flux folder, or a velocity folder); null: train on the batches' stored pairs. Frozen, kept
            out of checkpoints, conditioned through ``base_model``'s prompt encoder (same family).
        windows: Number of equal time windows K (>= 1; more than 1 needs a ``teacher``).
        window_solver_steps: The teacher's solver steps per window (PeRFlow: 8).
        teacher_solver: The teacher's solver (``auto`` as in pair generation); SD and SDXL need one that solves a
            sub-interval of its timesteps: ``ddim`` (PeRFlow's), ``dpm++`` or ``unipc``.
        teacher_guidance: Classifier-free guidance of the teacher against the null prompt (PeRFlow without
            ``cfg_sync``: 7.5), on the batch's prompts before dropout.
        cfg_sync: The teacher sees the student's condition (prompt dropout included) at guidance 1 (PeRFlow's SD 1.5
            recipe).
        teacher_dtype: The teacher's weight dtype: ``fp32``, ``fp16`` or ``bf16``.
        loss: The distance between the predicted and the target velocity, per sample, on stored pairs and on
            windows alike: ``mse`` (the mean squared error, InstaFlow's and PeRFlow's, whose ``train_perflow.py``
            uses ``F.mse_loss``) or ``huber``, the pseudo-Huber distance of 2-rectified flow++ (Lee et al., arXiv
            2405.20320, which takes it from iCT, Song & Dhariwal, arXiv 2310.14189): see :meth:`velocity_loss`.
        huber_c: The pseudo-Huber constant c (> 0) of ``loss: huber``; the default 0.00054 is iCT's
            ``0.00054 sqrt(d)`` in the per-element-mean form used here.
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
        teacher: str | None = None,
        windows: int = 1,
        window_solver_steps: int = 8,
        teacher_solver: str = "auto",
        teacher_guidance: float = 1.0,
        cfg_sync: bool = False,
        teacher_dtype: str = "fp32",
        loss: str = "mse",
        huber_c: float = DEFAULT_HUBER_C,
        **kwargs,
    ):
        if t_distribution not in T_DISTRIBUTIONS:
            raise UserError(f"unknown t distribution {t_distribution!r}: choose one of {', '.join(T_DISTRIBUTIONS)}")
        if loss_bins < 1:
            raise UserError(f"loss_bins must be >= 1, got {loss_bins}")
        check_window_options(teacher, windows, window_solver_steps, teacher_guidance, cfg_sync)
        check_loss_options(loss, huber_c)
        super().__init__(base_model, velocity, **kwargs)
        if self.val_steps[0] < windows:
            raise UserError(
                f"val_steps {self.val_steps} has step counts below windows={windows}: a piecewise flow samples with "
                "at least one step per window (set model.init_args.val_steps)"
            )
        self.teacher = None
        if teacher is not None:
            self.teacher = load_window_teacher(teacher, teacher_solver, windows * window_solver_steps, teacher_dtype)
            if isinstance(self.velocity, NetworkVelocity) and self.teacher.family.name != self.velocity.family.name:
                raise UserError(
                    f"the teacher {teacher} is an {self.teacher.family.name} model and the model being trained an "
                    f"{self.velocity.family.name} one: a piecewise reflow learns windows of a teacher of its family"
                )
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

    def sampling_grid(self, steps: int) -> list[float]:
        """The Euler grid of ``steps`` steps: uniform inside each of the ``windows`` windows."""
        return piecewise_grid(steps, self.hparams.get("windows", 1))

    def train(self, mode: bool = True) -> ReflowModule:
        """Train mode for the model; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def compute_loss(self, batch: TripleBatch, cond: TextCondition) -> StepOutput:
        """Velocity matching on the straight line from X0 to X1 (stored pairs) or across each window (a teacher)."""
        if self.teacher is not None:
            return self.window_loss(batch, cond)
        x1 = batch.x1
        x0 = batch.x0 if batch.x0 is not None else torch.randn_like(x1)
        t = self.draw_t(x1.shape[0])
        prediction = self.velocity(interpolate(x0, x1, t), t, cond)
        per_sample = self.velocity_loss(prediction, x1 - x0)
        return StepOutput(per_sample.mean(), per_sample, t, self._binned(per_sample.detach(), t))

    def velocity_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each sample, (B,), in float32: with ``loss: mse`` the mean squared error
        ``m = mean_i (v_i - u_i)^2`` over the n elements of a sample; with ``loss: huber`` the pseudo-Huber distance
        ``sqrt(m + c^2) - c`` of the whole sample (not element by element).

        That is 2-rectified flow++'s (and iCT's) ``sqrt(||v - u||^2 + C^2) - C`` with ``C = c sqrt(n)``, divided by
        ``sqrt(n)``: with c = 0.00054 exactly iCT's ``C = 0.00054 sqrt(d)``, up to a constant factor. For a small
        error (m << c^2) it is ``m / (2c)``, a scaled MSE; for a large one ``sqrt(m) - c``, the root mean square error,
        so one badly fitted sample weighs on the gradient like ``1 / (2 sqrt(m + c^2))`` times its MSE gradient.
        """
        if self.hparams.get("loss", "mse") == "huber":
            return pseudo_huber_distance(prediction, target, self.hparams.huber_c)
        return l2_distance(prediction, target)

    def teacher_field(self, prompts: list[str], cond: TextCondition) -> tuple[ClassifierFreeGuidance, TextCondition]:
        """The teacher's model as its solver calls it, and its condition: the student's own at guidance 1 with
        ``cfg_sync``, else the prompts before dropout (with the null prompt when guided)."""
        h = self.hparams
        if h.cfg_sync:
            return ClassifierFreeGuidance(self.teacher.model, 1.0), cond
        field = ClassifierFreeGuidance(self.teacher.model, h.teacher_guidance)
        return field, self.encoder.condition(prompts, with_null=field.active)

    def window_targets(self, batch: TripleBatch, cond: TextCondition, noise: torch.Tensor, t: torch.Tensor):
        """The teacher's windows for the batch's data with ``noise`` at times ``t`` (see
        :func:`~instaflow_pl.solver.window_targets`)."""
        x1 = batch.x1
        self.teacher.check_latent_shape(x1.shape[1:])
        field, teacher_cond = self.teacher_field(list(batch.prompts), cond)
        solver = self.teacher.solver_for(x1.shape[1:])
        out = window_targets(solver, field, x1, noise, t, self.hparams.windows, teacher_cond)
        out.nfe *= 2 if field.active else 1  # both branches of a guided call
        return out

    def window_loss(self, batch: TripleBatch, cond: TextCondition) -> StepOutput:
        """PeRFlow's loss: the straight velocity of each sample's window at its interpolated state."""
        x1 = batch.x1
        noise = torch.randn_like(x1)  # the batch's seeded generator: a resumed fit draws the same
        t = self.draw_t(x1.shape[0])
        out = self.window_targets(batch, cond, noise, t)
        prediction = self.velocity(interpolate(out.start, out.end, out.fraction), t, cond)
        per_sample = self.velocity_loss(prediction, out.target)
        terms = self._binned(per_sample.detach(), t)
        terms["teacher_nfe"] = torch.tensor(out.nfe)
        return StepOutput(per_sample.mean(), per_sample, t, terms)

    def _binned(self, per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        bins = self.hparams.loss_bins
        index = (t * bins).long().clamp(max=bins - 1)
        out = {}
        for b in range(bins):
            mask = index == b
            if mask.any():
                out[f"loss_t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = per_sample[mask].mean()
        return out


def check_loss_options(loss: str, huber_c: float) -> None:
    """One line for an unknown velocity loss or a pseudo-Huber constant that is not positive."""
    if loss not in VELOCITY_LOSSES:
        raise UserError(f"unknown loss {loss!r}: choose one of {', '.join(VELOCITY_LOSSES)}")
    if not huber_c > 0:
        raise UserError(f"huber_c must be > 0, got {huber_c}")


def check_window_options(
    teacher: str | None, windows: int, steps: int, teacher_guidance: float, cfg_sync: bool
) -> None:
    """One line for each inconsistent piecewise-reflow option."""
    windows = check_windows(windows)
    if windows > 1 and teacher is None:
        raise UserError(
            f"windows={windows} needs a teacher: piecewise reflow makes its pairs online from the teacher's window "
            "solves (set model.init_args.teacher)"
        )
    if steps < 1:
        raise UserError(f"window_solver_steps must be >= 1, got {steps}")
    if teacher_guidance < 0:
        raise UserError(f"teacher_guidance must be >= 0 (1 or less means no guidance), got {teacher_guidance}")
    if cfg_sync and teacher_guidance > 1:
        raise UserError(
            f"cfg_sync runs the teacher on the student's condition at guidance 1; drop teacher_guidance "
            f"({teacher_guidance}) or cfg_sync"
        )


def load_window_teacher(source: str, solver: str, steps: int, dtype: str):
    """The frozen teacher of a piecewise reflow, its solver at ``steps`` steps over [0, 1]; one line when that solver
    cannot solve a window. Its prompt encoder is dropped: the student's conditions it."""
    from instaflow_pl.teachers import load_teacher

    teacher = load_teacher(source, solver=solver, steps=steps, dtype=dtype)
    if not teacher.solver.can_solve_interval:
        raise UserError(
            f"the teacher's solver {teacher.solver_name!r} cannot solve a window (a sub-interval of its timesteps): "
            "set teacher_solver to ddim (PeRFlow's), dpm++ or unipc"
        )
    teacher.encoder = None
    return teacher
