"""DMDModule: distribution-matching distillation (DMD2, Yin et al. 2024, arXiv 2405.14867) of a one-step student.

Three networks: the generator (the one-step student ``x = X0 + v(X0, 0)``, initialised from a k-RF), the real score
(the frozen teacher, guided) and the fake score (a trainable copy of the teacher's network, fitted to the generator's
samples with the teacher's own denoising loss). The generator follows the difference of the two scores' predictions of
the clean sample at noised generator samples, which is the gradient of the KL divergence from the teacher's
distribution to the generator's (DMD, arXiv 2311.18828, eq. 7; DMD2's ``main/sd_guidance.py``).

Every score network is read as a prediction of the clean sample X1 through its parametrisation
(:mod:`instaflow_pl.modules.parametrisation`). Two optional generator terms: DMD2's GAN head on the fake score's
bottleneck (:mod:`instaflow_pl.modules.dmd_gan`, with real images) and the original DMD's paired regression onto
stored triples (the distances of :mod:`instaflow_pl.modules.losses`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from instaflow_pl.conventions import images_to_latents
from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules.base import FlowModule, StepOutput, clip_gradients
from instaflow_pl.modules.dmd_gan import bottleneck_features, critic_gan_loss, gan_head_for, generator_gan_loss
from instaflow_pl.modules.lora import LoraOptions, add_lora
from instaflow_pl.modules.losses import Distance, LPIPSDistance
from instaflow_pl.modules.parametrisation import (
    DiffusionParametrisation,
    FlowParametrisation,
    Parametrisation,
    ScoreModel,
    _per_sample,
    denoising_loss,
    parametrisation_of,
    predict_x1,
)
from instaflow_pl.solver import LatentODE
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkPredictor, NetworkVelocity, TextCondition

__all__ = [
    "DMDModule",
    "DiffusionParametrisation",
    "FlowParametrisation",
    "Parametrisation",
    "ScoreModel",
    "denoising_loss",
    "dmd_gradient",
    "dmd_loss",
    "is_generator_step",
    "parametrisation_of",
    "predict_x1",
    "uniform_t",
]
GAN_REAL = ("data", "pairs")
"""Where the GAN's real samples come from: ``data`` (batches without X0: images + prompts, the digits) or ``pairs``
(the triples' X1, the teacher's samples)."""

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

    Two optional terms join the generator's loss on its steps. DMD2's GAN (its stage 2): a classifier head on the
    fake score's bottleneck features (:mod:`instaflow_pl.modules.dmd_gan`) whose critic loss
    ``softplus(D(fake)) + softplus(-D(real))`` joins the fake score's loss (the head's parameters join its
    optimizer) and whose ``softplus(-D(fake))`` the generator minimises. The real side is the batch's X1 from data:
    images + prompts (``ImagePromptDataModule`` with ``encode_images: true``) or the digits (``DigitsDataModule``),
    batches without X0; ``gan_real: pairs`` takes the triples' X1 (the teacher's samples) instead. The original
    DMD's regression: the generator's sample from the batch's stored X0 regressed onto its X1 with DistillModule's
    distances (triples needed).

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
        encode_images: Batches hold images in [-1, 1] (an ImagePromptDataModule): encode them with the base model's
            VAE (the GAN's real samples, and prompts from their captions).
        gan_generator_weight: Weight of the generator's GAN term (DMD2 SD 1.5: 1e-3, SDXL: 5e-3; 0: none).
        gan_critic_weight: Weight of the critic's term in the fake score's loss (DMD2: 1e-2; 0: none).
        gan_t_min: The GAN's samples are noised to a flow time uniform in ``[gan_t_min, 1]`` before the fake score
            reads them (DMD2's ``diffusion_gan`` with maximum timestep 1000: 0; 1: clean samples).
        gan_real: The GAN's real samples: ``data`` (the X1 of batches without X0) or ``pairs`` (the triples' X1).
        regression_weight: Weight of the paired regression term (the original DMD's; 0: none); needs triples.
        regression_distance: Its distances, as DistillModule's ``distance`` (default ``{l2: 1.0}``; DMD: LPIPS).
        lpips_net: LPIPS backbone of a regression ``lpips`` distance, ``vgg`` or ``alex``.
        lpips_pretrained: Use the backbone's ImageNet weights (false: random weights, tests only).
        init_from: A DMDModule checkpoint whose weights (generator, its EMA, fake score; not the optimizers) start
            this run, e.g. stage 1's for the GAN stage (DMD2's ``--ckpt_only_path``); a new GAN head starts fresh.
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
        encode_images: bool = False,
        gan_generator_weight: float = 0.0,
        gan_critic_weight: float = 0.0,
        gan_t_min: float = 0.0,
        gan_real: str = "data",
        regression_weight: float = 0.0,
        regression_distance: dict[str, float] | None = None,
        lpips_net: str = "vgg",
        lpips_pretrained: bool = True,
        init_from: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs,
    ):
        check_dmd_options(generator_every, t_min, t_max, real_guidance, student_steps, max_grad_norm)
        check_extra_terms(gan_generator_weight, gan_critic_weight, gan_t_min, gan_real, regression_weight)
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
        self.gan_head = None
        if gan_generator_weight > 0 or gan_critic_weight > 0:
            if not isinstance(self.fake_score, NetworkPredictor):
                raise UserError("the GAN head sits on a network's bottleneck; this teacher has no network")
            self.gan_head = gan_head_for(self.fake_score.network)
        self.vae = self._load_vae(base_model, "encode_images") if encode_images else None
        self.distance = None
        if regression_weight > 0:
            weights = dict(regression_distance or {"l2": 1.0})
            lpips = None
            if "lpips" in weights:
                vae = self._load_vae(base_model, "an lpips regression distance")
                lpips = LPIPSDistance(vae, lpips_net, lpips_pretrained)
            self.distance = Distance(weights, lpips=lpips)
        self.fake_optimizer_factory = fake_optimizer
        self.student = LatentODE("euler", student_steps)
        self.generator_updates = 0
        if init_from is not None:
            self.load_weights_from(init_from)

    @staticmethod
    def _load_vae(base_model: str, needed_by: str) -> nn.Module:
        from instaflow_pl.model_folder import ModelFolder

        folder = ModelFolder.open(base_model)
        if folder.vae_config is None:
            raise UserError(f"{needed_by} needs a VAE, but {folder.root} has no vae/ subfolder")
        return folder.load_vae()

    def load_weights_from(self, path: str) -> None:
        """Start from a DMDModule checkpoint's weights (generator, EMA, fake score), not its optimizer states: every
        weight the checkpoint holds must fit this module, and only the GAN head may be new."""
        from instaflow_pl.checkpoints import read_checkpoint, read_record

        checkpoint = read_checkpoint(path)
        read_record(checkpoint, type(self).__name__, source=f"init_from {path}")
        missing, unexpected = self.load_state_dict(checkpoint["state_dict"], strict=False)
        allowed = self.keys_left_out_of_checkpoints()
        missing = [k for k in missing if k not in allowed and not k.startswith("gan_head.")]
        if missing or unexpected:
            shown = (unexpected or missing)[:3]
            raise UserError(
                f"init_from {path} does not fit this DMD run ({len(missing)} weights missing, {len(unexpected)} "
                f"unexpected, e.g. {shown}); start from a checkpoint of the same base_model, teacher and LoRA options"
            )

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

    @torch.no_grad()
    def to_latents(self, batch: TripleBatch) -> TripleBatch:
        """Encode image batches with the VAE when ``encode_images`` is on."""
        if self.vae is None:
            return batch
        return TripleBatch(batch.x0, images_to_latents(self.vae, batch.x1).float(), batch.prompts, batch.index)

    def gan_logits(self, x: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The GAN head's logits (B,) of samples ``x``, noised to flow times uniform in ``[gan_t_min, 1]``, on the fake
        score's bottleneck features (with the graph to ``x``, the fake score and the head)."""
        t = uniform_t(len(x), self.hparams.gan_t_min, 1.0, x.device)
        x_t = self.param.noised(x, torch.randn_like(x), t)
        time = self.param.model_time(t)
        features = bottleneck_features(self.fake_score.network, lambda: self.fake_score(x_t, time, cond))
        return self.gan_head(features)

    def real_samples(self, batch: TripleBatch) -> torch.Tensor:
        """The GAN's real samples: the batch's X1 when it holds data (no X0) or with ``gan_real: pairs``."""
        if batch.x0 is not None and self.hparams.gan_real == "data":
            raise UserError(
                "gan_generator_weight / gan_critic_weight > 0 need real images, but the batches are triples (X0, X1); "
                "train on images + prompts (data: ImagePromptDataModule, model encode_images: true) or the digits "
                "(DigitsDataModule), or set gan_real: pairs to take the triples' X1 as the real side"
            )
        return batch.x1

    def regression_loss(self, batch: TripleBatch, cond: TextCondition) -> torch.Tensor:
        """The original DMD's paired term: the generator's sample from the batch's X0 against its X1 (the weighted
        distances, mean over the batch)."""
        if batch.x0 is None:
            raise UserError(
                "regression_weight > 0 needs triples (X0, X1), but the batches have no X0 (images or digits without "
                "pairs); train on a TriplesDataModule of the teacher's pairs or set regression_weight: 0"
            )
        prediction = self.generate(batch.x0, cond, grad=True)
        return self.distance(prediction, batch.x1)["total"].mean()

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
        real = self.real_samples(batch) if self.gan_head is not None else None
        x = self.generate(noise, cond, grad=update_generator)
        size = len(batch)
        if update_generator:
            out = self.generator_loss(x, cond)
            loss, terms = out.loss, {"dmd_loss": out.loss.detach(), "dmd_grad_norm": out.terms["dmd_grad_norm"]}
            if h.gan_generator_weight > 0:
                gan = generator_gan_loss(self.gan_logits(x, cond)).mean()
                loss, terms["gan_generator_loss"] = loss + h.gan_generator_weight * gan, gan.detach()
            if h.regression_weight > 0:
                regression = self.regression_loss(batch, cond)
                loss, terms["regression_loss"] = loss + h.regression_weight * regression, regression.detach()
            if not torch.isfinite(loss):
                return self._nonfinite(batch)
            if generator_opt is not None:
                self._step(generator_opt, loss, counted=False)
                if self.ema is not None:
                    self.ema.update(self.velocity)
            self.generator_updates += 1
            self.log("train/generator_loss", loss.detach(), batch_size=size)
            for name, value in terms.items():
                self.log(f"train/{name}", value, batch_size=size)
        fake = self.fake_score_loss(x.detach(), cond)
        loss = fake.loss
        if h.gan_critic_weight > 0:
            fake_logits, real_logits = self.gan_logits(x.detach(), cond), self.gan_logits(real, cond)
            critic = critic_gan_loss(fake_logits, real_logits)
            loss = loss + h.gan_critic_weight * critic
            self.log("train/gan_critic_loss", critic.detach(), batch_size=size)
            self.log("train/critic_real", torch.sigmoid(real_logits.detach()).mean(), batch_size=size)
            self.log("train/critic_fake", torch.sigmoid(fake_logits.detach()).mean(), batch_size=size)
        if not torch.isfinite(loss):
            return self._nonfinite(batch)
        if fake_opt is not None:
            self._step(fake_opt, loss, counted=True)
        self.last_step = StepOutput(fake.loss.detach(), fake.per_sample, fake.t)
        self.log("train/loss", fake.loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/fake_loss", fake.loss.detach(), batch_size=size)
        self.log("train/generator_updates", float(self.generator_updates), batch_size=size)
        return fake.loss.detach()

    # ---- optimisation and checkpoints --------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Refuse a gradient scaler (``precision: 16-mixed``: the manual steps here do not unscale) and a teacher that
        is not frozen."""
        super().on_fit_start()
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise UserError(
                f"DMDModule does not support precision {self.trainer.precision} (a gradient scaler); use 32 or "
                "bf16-mixed"
            )
        check_frozen_teacher(self.teacher, {"generator": self.velocity, "fake score": self.fake_score})

    def configure_optimizers(self):
        """Two optimizers: the generator's (trainable velocity parameters) and the fake score's (with the GAN head's
        parameters, as DMD2's guidance optimizer holds its classifier branch)."""
        generator = [p for p in self.velocity.parameters() if p.requires_grad]
        if not generator:
            raise UserError("every velocity parameter is frozen; loosen the freeze option")
        fake = [p for p in self.fake_score.parameters() if p.requires_grad]
        if self.gan_head is not None:
            fake += list(self.gan_head.parameters())
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


def check_extra_terms(
    gan_generator_weight: float, gan_critic_weight: float, gan_t_min: float, gan_real: str, regression_weight: float
) -> None:
    """One line for each bad option of the GAN and regression terms."""
    for name, value in [("gan_generator_weight", gan_generator_weight), ("gan_critic_weight", gan_critic_weight),
                        ("regression_weight", regression_weight)]:  # fmt: skip
        if value < 0:
            raise UserError(f"{name} must be >= 0 (0: no such term), got {value}")
    if not 0.0 <= gan_t_min <= 1.0:
        raise UserError(f"gan_t_min must be in [0, 1] (DMD2: 0, any noise level; 1: clean samples), got {gan_t_min}")
    if gan_real not in GAN_REAL:
        raise UserError(f"gan_real must be one of {', '.join(GAN_REAL)}, got {gan_real!r}")


def check_frozen_teacher(teacher: nn.Module, trained: dict[str, nn.Module]) -> None:
    """One line when the teacher (the real score) is not frozen: a parameter of it requires grad, or it shares a
    parameter with a trained network (the generator or the fake score, e.g. the generator's own module)."""
    named = list(teacher.named_parameters())
    owned = {id(p) for _, p in named}
    for role, module in trained.items():
        shared = [n for n, p in module.named_parameters() if id(p) in owned]
        if shared:
            raise UserError(
                f"the teacher (real score) shares {len(shared)} parameters with the {role} (e.g. {shared[0]}), so "
                "training would move the target it is matched to; the teacher must be a separate frozen copy"
            )
    loose = [n for n, p in named if p.requires_grad]
    if loose:
        raise UserError(
            f"the teacher (real score) must be frozen, but {len(loose)} of its parameters require grad (e.g. "
            f"{loose[0]}); DMD's real score is a fixed target: call teacher.requires_grad_(False) or leave it as loaded"
        )


def load_real_score(source: str, dtype: str):
    """The frozen teacher (real score) at any step count; its prompt encoder is dropped (the module's conditions
    it)."""
    from instaflow_pl.teachers import load_teacher

    teacher = load_teacher(source, dtype=dtype, steps=1)
    teacher.encoder = None
    return teacher
