"""DMDModule: distribution-matching distillation (DMD2, Yin et al. 2024, arXiv 2405.14867) of a one-step student.

Three networks: the generator (the one-step student ``x = X0 + v(X0, 0)``, initialised from a k-RF), the real score
(the frozen teacher, guided) and the fake score (a trainable copy of the teacher's network, fitted to the generator's
samples with the teacher's own denoising loss). The generator follows the difference of the two scores' predictions of
the clean sample at noised generator samples, which is the gradient of the KL divergence from the teacher's
distribution to the generator's (DMD, arXiv 2311.18828, eq. 7; DMD2's ``main/sd_guidance.py``).

Every score network is read as a prediction of the clean sample X1 through its parametrisation: a velocity at our
flow time t gives ``x1_hat = x_t + (1 - t) v`` on the straight path ``x_t = t X1 + (1 - t) X0``; an epsilon, v or
sample prediction of a diffusion teacher at diffusers timestep ``(1 - t) * N`` (rounded) is converted through its
scheduler's ``alphas_cumprod`` on the path ``x = sqrt(a) X1 + sqrt(1 - a) noise``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules.base import FlowModule, StepOutput, clip_gradients
from instaflow_pl.modules.lora import LoraOptions, add_lora
from instaflow_pl.solver import LatentODE
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkPredictor, NetworkVelocity, TextCondition

ScoreModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""A score network as its parametrisation calls it: ``f(x, model_time, cond)``."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (B,) shaped to broadcast against ``like`` (B, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like)


# ---- parametrisations: what a score network predicts, and how that becomes X1 --------------------------------------


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


# ---- the distribution-matching gradient -----------------------------------------------------------------------------


def dmd_gradient(x: torch.Tensor, real_x1: torch.Tensor, fake_x1: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised gradient ``(fake_x1 - real_x1) / mean|x - real_x1|`` (mean per sample; NaN set to 0)."""
    scale = (x - real_x1).abs().flatten(1).mean(1)
    return torch.nan_to_num((fake_x1 - real_x1) / _per_sample(scale, x))


def dmd_loss(x: torch.Tensor, real_x1: torch.Tensor, fake_x1: torch.Tensor) -> torch.Tensor:
    """Per-sample ``0.5 * mean((x - sg(x - grad))^2)``, whose gradient in ``x`` is ``grad / numel`` per sample."""
    grad = dmd_gradient(x.detach(), real_x1.detach(), fake_x1.detach())
    return 0.5 * (x.float() - (x - grad).detach().float()).pow(2).flatten(1).mean(1)


def uniform_t(batch: int, t_min: float, t_max: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flow times uniform in ``[t_min, t_max]`` (DMD2: timesteps uniform in 2 % .. 98 % of the schedule)."""
    return t_min + (t_max - t_min) * torch.rand(batch, device=device)


def is_generator_step(iteration: int, generator_every: int) -> bool:
    """Whether iteration ``iteration`` (0-based) also updates the generator: every ``generator_every``-th, from the
    first (the fake score updates on every iteration: DMD2's two time-scale rule)."""
    return iteration % generator_every == 0


@contextlib.contextmanager
def _uncounted(optimizer: Any) -> Iterator[None]:
    """Step a Lightning optimizer without counting the step in ``trainer.global_step`` (which then counts iterations,
    the fake score's steps, so ``max_steps`` and ``every_n_train_steps`` mean iterations)."""
    before, after = getattr(optimizer, "_on_before_step", None), getattr(optimizer, "_on_after_step", None)
    if before is None:
        yield
        return
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


def _default_fake_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)


class DMDModule(FlowModule):
    """Distribution-matching distillation (DMD2) of a one-step student from a teacher's scores.

    Each training iteration updates the fake score on the generator's (detached) samples with the teacher's
    denoising loss; every ``generator_every``-th iteration first updates the generator: its sample ``x`` is noised to
    t uniform in ``[t_min, t_max]``, both scores predict the clean sample, and the generator minimises
    ``0.5 * ||x - sg(x - grad)||^2`` with ``grad = (fake_x1 - real_x1) / mean|x - real_x1|``. ``trainer.global_step``
    counts iterations; ``train/generator_updates`` the generator's steps. Lightning's manual optimization: the
    trainer's ``gradient_clip_val`` and learning-rate schedules do not apply (use ``max_grad_norm``).

    Args:
        base_model: Diffusers-format folder of the generator's starting point (a k-RF velocity folder, e.g. the 2-RF).
        teacher: Folder of the real score (a velocity folder, or a released SD / SDXL / SD3 / Flux folder); default
            ``base_model``. Its family must be the generator's (their text conditions are shared).
        real_guidance: Classifier-free guidance of the real score (DMD2 SD 1.5: 1.75; <= 1: none).
        generator_every: Iterations per generator update (DMD2: 10 for SD 1.5, 5 for SDXL); >= 1.
        t_min: Lowest flow time of the noised samples (DMD2: 0.02).
        t_max: Highest flow time (DMD2: 0.98).
        fake_optimizer: Optimizer factory of the fake score (AdamW lr 1e-5, weight decay 0.01 by default; the
            generator's is ``optimizer``).
        fake_lora: Train LoRA adapters of the fake score instead of all its weights (same options as ``lora``).
        max_grad_norm: Clip each network's gradients to this global norm before its step (DMD2: 10); null: none.
        teacher_dtype: Weight dtype of the real score: ``fp32``, ``fp16`` or ``bf16`` (the fake score trains in fp32).
        student_steps: Euler steps of the generator (1: DMD's one-step generator).
        prompt_dropout: Probability of the null prompt for the generator and fake score (DMD2: 0).
        val_steps: Euler step counts of the validation samples.
        velocity: The generator's velocity network (default: the network of ``base_model``).
        optimizer: Optimizer factory of the generator.
        **kwargs: The shared options of FlowModule (EMA of the generator, LoRA of the generator, freezing, ...).
    """

    def __init__(
        self,
        base_model: str,
        velocity: nn.Module | None = None,
        teacher: str | None = None,
        real_guidance: float = 1.75,
        generator_every: int = 10,
        t_min: float = 0.02,
        t_max: float = 0.98,
        optimizer: OptimizerCallable | None = None,
        fake_optimizer: OptimizerCallable = _default_fake_optimizer,
        fake_lora: LoraOptions | dict[str, Any] | None = None,
        max_grad_norm: float | None = None,
        teacher_dtype: str = "fp32",
        student_steps: int = 1,
        prompt_dropout: float = 0.0,
        val_steps: Sequence[int] = (1, 2, 4),
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs,
    ):
        check_dmd_options(generator_every, t_min, t_max, real_guidance, student_steps, max_grad_norm)
        if (
            lr_scheduler is not None
            or kwargs.get("warmup_steps")
            or kwargs.get("lr_schedule", "constant") != "constant"
        ):
            raise UserError("DMDModule trains at constant learning rates (DMD2's); drop lr_scheduler, warmup_steps "
                            "and lr_schedule")  # fmt: skip
        fake_lora = LoraOptions.parse(fake_lora)
        extra = {} if optimizer is None else {"optimizer": optimizer}
        super().__init__(base_model, velocity, prompt_dropout=prompt_dropout, val_steps=val_steps, **extra, **kwargs)
        self.hparams["fake_lora"] = fake_lora.to_dict() if fake_lora is not None else None  # plain types
        self.hparams.pop("fake_optimizer", None)  # a callable: checkpoints load with weights_only
        self.automatic_optimization = False
        self.teacher = load_real_score(teacher or base_model, teacher_dtype)
        if isinstance(self.velocity, NetworkVelocity) and self.teacher.family.name != self.velocity.family.name:
            raise UserError(
                f"the teacher {teacher} is an {self.teacher.family.name} model and the generator an "
                f"{self.velocity.family.name} one: DMD needs a teacher of the generator's family"
            )
        self.param = parametrisation_of(self.teacher.model, self.teacher.scheduler_config)
        self.fake_score = copy.deepcopy(self.teacher.model).float().requires_grad_(True).train()
        if self.hparams.gradient_checkpointing and isinstance(self.fake_score, NetworkPredictor):
            self.fake_score.network.enable_gradient_checkpointing()
        if fake_lora is not None:
            add_lora(self.fake_score, fake_lora)
        self.fake_optimizer_factory = fake_optimizer
        self.student = LatentODE("euler", student_steps)
        self.generator_updates = 0

    # ---- the pieces of one iteration ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DMDModule:
        """Train mode for the generator and fake score; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def generate(self, noise: torch.Tensor, cond: TextCondition, grad: bool) -> torch.Tensor:
        """The generator's sample for ``noise`` (its Euler solve of ``student_steps`` steps)."""
        return self.student.solve(self.velocity, noise, cond, enable_grad=grad).x

    def real_x1(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The guided teacher's clean-sample prediction (``cond`` carries the null condition when guidance is on)."""
        field = ClassifierFreeGuidance(self.teacher.model, self.hparams.real_guidance)
        with torch.no_grad():
            return predict_x1(self.param, field, x_t, t, cond).float()

    def fake_x1(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The fake score's clean-sample prediction (unguided)."""
        with torch.no_grad():
            return predict_x1(self.param, self.fake_score, x_t, t, cond).float()

    def generator_loss(self, x: torch.Tensor, cond: TextCondition) -> StepOutput:
        """The distribution-matching loss of the generator's samples ``x`` (with their graph)."""
        h = self.hparams
        t = uniform_t(len(x), h.t_min, h.t_max, x.device)
        x_t = self.param.noised(x.detach(), torch.randn_like(x), t)
        real, fake = self.real_x1(x_t, t, cond), self.fake_x1(x_t, t, cond)
        per_sample = dmd_loss(x, real, fake)
        grad_norm = dmd_gradient(x.detach(), real, fake).flatten(1).norm(dim=1).mean()
        return StepOutput(per_sample.mean(), per_sample.detach(), t, {"dmd_grad_norm": grad_norm})

    def fake_score_loss(self, x: torch.Tensor, cond: TextCondition) -> StepOutput:
        """The fake score's denoising loss on the generator's detached samples, t uniform in ``[t_min, t_max]``."""
        h = self.hparams
        t = uniform_t(len(x), h.t_min, h.t_max, x.device)
        per_sample = denoising_loss(self.param, self.fake_score, x.detach(), torch.randn_like(x), t, cond)
        return StepOutput(per_sample.mean(), per_sample.detach(), t)

    def _latent_shape(self, batch: TripleBatch) -> tuple[int, ...]:
        if batch.x1 is not None:
            return tuple(batch.x1.shape[1:])
        return tuple(self.teacher.latent_shape)

    def _step(self, optimizer: Any, loss: torch.Tensor, counted: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip_gradients(optimizer, self.hparams.max_grad_norm)
        with contextlib.nullcontext() if counted else _uncounted(optimizer):
            optimizer.step()

    def _train_on_batch(self, batch: TripleBatch) -> torch.Tensor | None:
        """One DMD iteration (inside the batch's seeded generators, see FlowModule.training_step)."""
        self.last_step = None
        h = self.hparams
        batch = self.to_latents(batch)
        cond = self.condition(batch.prompts, dropout=h.prompt_dropout, with_null=h.real_guidance > 1.0)
        noise = torch.randn(len(batch), *self._latent_shape(batch), device=self.device)
        iteration = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else self.generator_updates
        update_generator = is_generator_step(iteration, h.generator_every)
        generator_opt, fake_opt = self.optimizers() if self._trainer is not None else (None, None)
        x = self.generate(noise, cond, grad=update_generator)
        size = len(batch)
        if update_generator:
            out = self.generator_loss(x, cond)
            if not torch.isfinite(out.loss):
                return self._nonfinite(batch)
            if generator_opt is not None:
                self._step(generator_opt, out.loss, counted=False)
                if self.ema is not None:
                    self.ema.update(self.velocity)
            self.generator_updates += 1
            self.log("train/generator_loss", out.loss.detach(), batch_size=size)
            self.log("train/dmd_grad_norm", out.terms["dmd_grad_norm"], batch_size=size)
        fake = self.fake_score_loss(x.detach(), cond)
        if not torch.isfinite(fake.loss):
            return self._nonfinite(batch)
        if fake_opt is not None:
            self._step(fake_opt, fake.loss, counted=True)
        self.last_step = StepOutput(fake.loss.detach(), fake.per_sample, fake.t)
        self.log("train/loss", fake.loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/fake_loss", fake.loss.detach(), batch_size=size)
        self.log("train/generator_updates", float(self.generator_updates), batch_size=size)
        return fake.loss.detach()

    # ---- optimisation and checkpoints --------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Refuse a gradient scaler (``precision: 16-mixed``): the manual steps here do not unscale."""
        super().on_fit_start()
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise UserError(
                f"DMDModule does not support precision {self.trainer.precision} (a gradient scaler); use 32 or "
                "bf16-mixed"
            )

    def configure_optimizers(self):
        """Two optimizers: the generator's (trainable velocity parameters) and the fake score's."""
        generator = [p for p in self.velocity.parameters() if p.requires_grad]
        if not generator:
            raise UserError("every velocity parameter is frozen; loosen the freeze option")
        fake = [p for p in self.fake_score.parameters() if p.requires_grad]
        return [self.optimizer_factory(generator), self.fake_optimizer_factory(fake)]

    def frozen_base_keys(self) -> set[str]:
        """The generator's frozen base weights and, under ``fake_lora``, the fake score's (the teacher's, restored
        from ``teacher`` at construction): checkpoints leave them out."""
        keys = super().frozen_base_keys()
        if self.hparams.get("fake_lora"):
            keys |= {f"fake_score.{n}" for n, p in self.fake_score.named_parameters() if not p.requires_grad}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """FlowModule's record, and the generator's update counter."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["dmd"] = {"generator_updates": self.generator_updates}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """FlowModule's checks, and the generator's update counter."""
        super().on_load_checkpoint(checkpoint)
        self.generator_updates = int(checkpoint.get("dmd", {}).get("generator_updates", 0))


def check_dmd_options(
    generator_every: int, t_min: float, t_max: float, real_guidance: float, student_steps: int, max_grad_norm
) -> None:
    """One line for each bad DMD option."""
    if generator_every < 1:
        raise UserError(
            f"generator_every must be >= 1 (fake-score updates per generator update; DMD2: 10), got {generator_every}"
        )
    if not 0.0 <= t_min < t_max <= 1.0:
        raise UserError(f"DMD's times must satisfy 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if real_guidance < 0:
        raise UserError(f"real_guidance must be >= 0 (1 or less means no guidance), got {real_guidance}")
    if student_steps < 1:
        raise UserError(f"student_steps must be >= 1, got {student_steps}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise UserError(f"max_grad_norm must be > 0 (null: no clipping), got {max_grad_norm}")


def load_real_score(source: str, dtype: str):
    """The frozen teacher (real score) at any step count; its prompt encoder is dropped (the module's conditions
    it)."""
    from instaflow_pl.teachers import load_teacher

    teacher = load_teacher(source, dtype=dtype, steps=1)
    teacher.encoder = None
    return teacher
