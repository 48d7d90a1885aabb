"""The base of ReflowModule and DistillModule: velocity model, frozen text encoder, EMA, optimisation, validation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from instaflow_pl.checkpoints import CheckpointRecord, read_record, upgrade_parameter_name
from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.faults import crashpoint
from instaflow_pl.metrics import straightness
from instaflow_pl.modules.ema import EMA
from instaflow_pl.modules.lora import LoraOptions, add_lora
from instaflow_pl.ranks import setup_on_every_rank
from instaflow_pl.solver import LatentODE, uniform_grid
from instaflow_pl.speed import set_tf32, speed_up
from instaflow_pl.text import NULL_PROMPT
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkVelocity, TextCondition

_FROZEN_PREFIXES = ("encoder.", "distance.", "vae.", "teacher.")
VAL_NOISE_SEED = 1_000_000_007
"""Validation noises for data without pairs: sample i uses the seed rule with this base seed."""


@dataclass
class StepOutput:
    """What a module's loss computation returns.

    Attributes:
        loss: The scalar to minimise.
        per_sample: The loss of each sample, (B,).
        t: The time each sample was trained at, (B,), when the loss depends on t.
        terms: Extra scalars to log (e.g. the parts of a weighted distance).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    t: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class FlowModule(L.LightningModule):
    """Shared machinery of the training modules (not used on its own).

    Args:
        base_model: Diffusers-format folder of the model being trained from (a released SD, SDXL or SD3 folder, or
            a k-RF export): its tokenizers and text encoders encode the prompts, and its network (UNet or SD3
            transformer) initialises the velocity by default. Its family (:mod:`instaflow_pl.families`) says how.
        velocity: The velocity network ``v(x, t, cond)``; null: a network velocity initialised from ``base_model``.
            Any ``nn.Module`` honouring the contract works.
        optimizer: Optimizer factory (AdamW, lr 1e-5 by default).
        lr_scheduler: Optional scheduler factory; when null, ``warmup_steps`` and ``lr_schedule`` apply.
        warmup_steps: Linear learning-rate warmup.
        lr_schedule: ``constant`` or ``cosine`` (to zero at the trainer's last step) after warmup.
        ema_decay: Decay of the exponential moving average of the weights (0: no EMA). Validation and export use the
            EMA weights.
        prompt_dropout: Probability of training on the null prompt "" instead, so guidance keeps working.
        freeze: Parameter name prefixes of the velocity to keep frozen (e.g. ``network.down_blocks.0``; the earlier
            ``unet.`` prefix still names the network).
        gradient_checkpointing: Enable the network's gradient checkpointing (SD-size networks on small GPUs).
        val_steps: Euler step counts of the validation samples (``val/mse@N`` for each).
        val_guidance: Classifier-free guidance of the validation samples (<= 1: none).
        on_nonfinite: What a NaN or Inf loss does: ``stop`` (one-line error naming the step and the batch's sample
            indices; no optimizer step is taken, so no checkpoint gets non-finite weights) or ``skip`` (the batch is
            dropped with a warning and counted in ``train/skipped_batches``).
        prompt_cache_mb: Keep the text embeddings of recent prompts (this many MB): worth it when prompts repeat
            (a small caption set, the digits demo); 0 encodes every batch afresh.
        text_dtype: Weight dtype of the frozen text encoders: ``fp32``, ``bf16`` or ``fp16`` (SD3's T5-XXL is
            19 GB in fp32, 9.5 GB in bf16).
        lora: Train LoRA adapters instead of the network's weights, e.g. ``{rank: 16, alpha: 16}`` (see
            LoraOptions); EMA and optimizer state then cover the adapters only. Export merges them by default.
        compile: ``torch.compile`` the velocity network (same loss to float tolerance; the first steps compile).
        channels_last: Keep the network's conv weights and activations channels-last (faster convs on GPUs).
        tf32: Allow TF32 matmuls and convolutions on Ampere+ GPUs (faster fp32; changes results slightly).
    """

    def __init__(
        self,
        base_model: str,
        velocity: nn.Module | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: float = 0.999,
        prompt_dropout: float = 0.1,
        freeze: Sequence[str] = (),
        gradient_checkpointing: bool = False,
        val_steps: Sequence[int] = (1, 2, 4, 25),
        val_guidance: float = 1.0,
        on_nonfinite: str = "stop",
        prompt_cache_mb: float = 0.0,
        text_dtype: str = "fp32",
        lora: LoraOptions | None = None,
        compile: bool = False,
        channels_last: bool = False,
        tf32: bool = False,
    ):
        super().__init__()
        lora = LoraOptions.parse(lora)
        self.save_hyperparameters(ignore=["velocity", "optimizer", "lr_scheduler", "lora"])
        self.hparams["lora"] = lora.to_dict() if lora is not None else None  # plain types: weights_only loads
        if not 0.0 <= ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise UserError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not val_steps or min(val_steps) < 1:
            raise UserError(f"val_steps must be step counts >= 1, got {list(val_steps)}")
        if val_guidance < 0:
            raise UserError(f"val_guidance must be >= 0 (1 or less means no guidance), got {val_guidance}")
        if on_nonfinite not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be stop or skip, got {on_nonfinite!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
        from instaflow_pl.dtypes import parse_dtype
        from instaflow_pl.model_folder import ModelFolder
        from instaflow_pl.velocity.pretrained import PretrainedVelocity

        folder = ModelFolder.open(base_model)
        self.weights_from_base = velocity is None
        self.velocity = velocity if velocity is not None else PretrainedVelocity(folder)
        if isinstance(self.velocity, NetworkVelocity):
            freeze = [upgrade_parameter_name(prefix) for prefix in freeze]
            if gradient_checkpointing:
                self.velocity.network.enable_gradient_checkpointing()
        for name, param in self.velocity.named_parameters():
            if any(name.startswith(prefix) for prefix in freeze):
                param.requires_grad_(False)
        if lora is not None:
            add_lora(self.velocity, lora)
        self.encoder = folder.load_encoder(parse_dtype(text_dtype), cache_mb=prompt_cache_mb)
        self.ema = EMA(self.velocity, ema_decay) if ema_decay > 0 else None
        if isinstance(self.velocity, NetworkVelocity):
            speed_up(self.velocity.network, compile=compile, channels_last=channels_last)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_steps = sorted(set(int(n) for n in val_steps))
        self.last_step: StepOutput | None = None
        self.skipped_batches = 0

    # ---- what each module defines ----------------------------------------------------------------------------

    def compute_loss(self, batch: TripleBatch, cond: TextCondition) -> StepOutput:
        """The module's loss on a batch (ReflowModule: velocity matching; DistillModule: one-step distance)."""
        raise NotImplementedError

    def to_latents(self, batch: TripleBatch) -> TripleBatch:
        """The batch with X1 in the model's latent space (ReflowModule may encode images here)."""
        return batch

    # ---- shared pieces ---------------------------------------------------------------------------------------

    @setup_on_every_rank
    def setup(self, stage: str) -> None:
        """Check that the triples fit the velocity's network before any step runs; apply the TF32 setting."""
        set_tf32(self.hparams.tf32, self.trainer.strategy.root_device if self._trainer else None)
        manifest = getattr(self.trainer.datamodule, "manifest", None) if self.trainer else None
        if manifest is not None and isinstance(self.velocity, NetworkVelocity):
            source = str(self.trainer.datamodule.path)
            family = self.velocity.family.name
            if not self.velocity.family.answers_to(manifest.family):  # the digits demo's older data says sd
                raise UserError(
                    f"the triples in {source} come from an {manifest.family} teacher, but the model being trained is "
                    f"an {family} model; generate pairs with a teacher of the model's family"
                )
            check_latent_shape(self.velocity.network, manifest.latent_shape, source=source)
            self.velocity.family.configure_encoder_for_pairs(
                self.encoder, manifest.teacher_kind, manifest.guidance, manifest.max_sequence_length
            )

    def sampling_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """A context in which the velocity holds the weights validation, sampling and export use: the EMA's when
        there is one (swapped in without a copy, swapped back on exit)."""
        return self.ema.swapped_into(self.velocity) if self.ema is not None else contextlib.nullcontext(self.velocity)

    def condition(self, prompts: Sequence[str], dropout: float = 0.0, with_null: bool = False) -> TextCondition:
        """Encode prompts; each is replaced by the null prompt with probability ``dropout``."""
        prompts = list(prompts)
        if dropout > 0:
            drop = (torch.rand(len(prompts)) < dropout).tolist()
            prompts = [NULL_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)]
        return self.encoder.condition(prompts, with_null=with_null)

    def sample(
        self, x0: torch.Tensor, prompts: Sequence[str], steps: int, guidance: float = 1.0, trajectory: bool = False
    ):
        """Euler sampling with the sampling weights (EMA) through the LatentODE."""
        with self.sampling_weights() as model:
            field = ClassifierFreeGuidance(model, guidance)
            cond = self.condition(prompts, with_null=field.active)
            grid = self.sampling_grid(steps)
            return LatentODE("euler", time_grid=grid).solve(field, x0, cond, return_trajectory=trajectory)

    def sampling_grid(self, steps: int) -> list[float]:
        """The Euler time grid of ``steps`` sampling steps (uniform; a piecewise flow's is uniform per window)."""
        return uniform_grid(steps)

    def training_step(self, batch: TripleBatch, batch_idx: int) -> torch.Tensor:
        """One optimisation step: the module's loss, logged as ``train/loss``.

        Its random draws (t, prompt dropout, fresh noise, dropout layers) come from the torch generators seeded for
        this batch alone (:meth:`step_seed`), so a fit resumed from a checkpoint draws exactly what the uninterrupted
        fit drew, and nothing that draws random numbers between steps (validation, callbacks) changes training.
        """
        if self._trainer is None:
            return self._train_on_batch(batch)
        with self._step_rng():
            return self._train_on_batch(batch)

    def step_seed(self) -> int:
        """Seed of the current training batch's random draws (:func:`batch_seed` of this rank and the batch's index
        over the whole fit, Lightning's ``total_batch_idx``, which a resumed fit restores from the checkpoint)."""
        return batch_seed(self.trainer.global_rank, self.trainer.fit_loop.total_batch_idx)

    def _step_rng(self):
        return seeded_rng(self.step_seed(), self.device)

    def _train_on_batch(self, batch: TripleBatch) -> torch.Tensor | None:
        self.last_step = None
        batch = self.to_latents(batch)
        cond = self.condition(batch.prompts, dropout=self.hparams.prompt_dropout)
        out = self.compute_loss(batch, cond)
        if not torch.isfinite(out.loss):
            return self._nonfinite(batch)
        # Kept (detached) for callbacks that look at each sample's loss, e.g. LossByT.
        self.last_step = StepOutput(
            out.loss.detach(), out.per_sample.detach(), None if out.t is None else out.t.detach()
        )
        size = len(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        # Each self.log costs ~0.25 ms in Lightning 2.6: the diagnostics go out only on the logger's steps.
        if out.terms and (self._trainer is None or self.global_step % self.trainer.log_every_n_steps == 0):
            for name, value in out.terms.items():
                self.log(f"train/{name}", value, batch_size=size)
        return out.loss

    def _nonfinite(self, batch: TripleBatch) -> None:
        """Stop with a clear message, or skip the batch (returning None makes Lightning skip the optimizer step)."""
        indices = batch.index.tolist()
        shown = f"{indices[:16]}{' ...' if len(indices) > 16 else ''}"
        message = f"non-finite loss at step {self.global_step} on the batch of samples {shown}"
        if self.hparams.on_nonfinite == "stop":
            raise UserError(
                f"{message}; training stopped before the optimizer step, so the last checkpoint holds the last good "
                "weights (lower the learning rate, check those samples, or set model.init_args.on_nonfinite: skip)"
            )
        self.skipped_batches += 1
        rank_zero_warn(f"{message}; batch skipped ({self.skipped_batches} so far)")
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=len(batch))
        return None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Triples move as one dataclass (Lightning's generic transfer rebuilds it field by field every step)."""
        if isinstance(batch, TripleBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Fault injection for the resume tests (``INSTAFLOW_PL_CRASH_AT=fit_step:N``; a no-op otherwise)."""
        crashpoint("fit_step", self.global_step)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser step, then the EMA update (not after a skipped batch).

        Here rather than in ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (where
        ModelCheckpoint saves) before the module's, so a checkpoint would hold an EMA one update behind its weights
        and a resumed fit would drift from the uninterrupted one.
        """
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and self.last_step is not None:
            self.ema.update(self.velocity)

    @torch.no_grad()
    def validation_step(self, batch: TripleBatch, batch_idx: int) -> None:
        """Sample the validation noises with 1, 2, 4 ... N Euler steps; log ``val/mse@n`` and ``val/straightness``."""
        guidance = self.hparams.val_guidance
        batch = self.to_latents(batch)
        size = len(batch)
        x0 = batch.x0
        if x0 is None:  # data without pairs: fixed noises by the seed rule
            x0 = noise_for_indices(VAL_NOISE_SEED, batch.index.tolist(), batch.x1.shape[1:]).to(batch.x1)
        for steps in self.val_steps:
            longest = steps == self.val_steps[-1]
            solution = self.sample(x0, batch.prompts, steps, guidance, trajectory=longest)
            mse = (solution.x.float() - batch.x1.float()).pow(2).mean()
            self.log(f"val/mse@{steps}", mse, sync_dist=True, batch_size=size)
            if longest:
                self.log("val/straightness", straightness(solution).mean(), sync_dist=True, batch_size=size)

    def on_fit_start(self) -> None:
        """Refuse, before the first step, the one optimizer setup whose gradients cannot be clipped."""
        check_clipping(self.trainer)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Clip the gradients of ``optimizer``'s parameters before its step (``trainer.gradient_clip_val``).

        Done here rather than by Lightning's precision plugin, which refuses any optimizer that unscales gradients
        itself (``AdamW(fused=True)``) even under bf16-mixed, where no gradient scaler exists. Without a scaler, or
        with one that has already unscaled the gradients (a non-fused optimizer), the gradients are the true ones and
        are clipped by their global norm (or by value); :func:`check_clipping` refuses the remaining case.
        """
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        """The optimizer over trainable velocity parameters, with the configured schedule."""
        params = [p for p in self.velocity.parameters() if p.requires_grad]
        if not params:
            raise UserError("every velocity parameter is frozen; loosen the freeze option")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
        warmup, schedule = self.hparams.warmup_steps, self.hparams.lr_schedule
        if warmup <= 0 and schedule == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "cosine":
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under a sharded strategy (:mod:`instaflow_pl.sharding`): shard the velocity's network by its family's
        blocks, and rebuild the EMA over the shards (each rank averages its own); under any other strategy,
        nothing."""
        mesh = self.device_mesh
        if mesh is None or not isinstance(self.velocity, NetworkVelocity):
            return
        from torch.distributed.fsdp import FSDPModule

        from instaflow_pl.sharding import compute_dtype, shard_network

        if isinstance(self.velocity.network, FSDPModule):  # configure_model runs once per stage
            return
        precision = compute_dtype(self.trainer.precision if self._trainer else None)
        shard_network(self.velocity.network, self.velocity.family.shard_blocks, mesh["data_parallel"], precision)
        if self.ema is not None:
            self.ema = EMA(self.velocity, self.ema.decay)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def keys_left_out_of_checkpoints(self) -> set[str]:
        """State-dict keys this module's checkpoints leave out (the text encoder, VAE and LPIPS net, and frozen
        velocity weights from ``base_model``): a resume keeps them as ``base_model`` gave them."""
        omitted = self.frozen_base_keys()
        return {k for k in self.state_dict() if k.startswith(_FROZEN_PREFIXES) or k in omitted}

    def frozen_base_keys(self) -> set[str]:
        """State-dict keys of velocity weights that are frozen and were loaded from ``base_model`` unchanged (the
        base weights under LoRA adapters, frozen blocks): checkpoints leave them out, as they do the text encoder."""
        if not self.weights_from_base:
            return set()
        return {f"velocity.{n}" for n, p in self.velocity.named_parameters() if not p.requires_grad}

    def checkpoint_record(self, omitted: set[str]) -> CheckpointRecord:
        """This module's record in its checkpoints (``omitted``: the frozen base weights left out of them)."""
        network = self.velocity.network if isinstance(self.velocity, NetworkVelocity) else None
        config = None if network is None else json.loads(network.to_json_string())  # plain types
        if config is not None:
            from instaflow_pl.sharding import unsharded_class

            config["_class_name"] = unsharded_class(network).__name__  # not FSDP2's FSDP<name>
        return CheckpointRecord(
            module=type(self).__name__,
            network_config=config,
            family=None if network is None else self.velocity.family.name,
            lora=self.hparams.get("lora"),
            base_weights_omitted=bool(omitted),
            conditioning={} if network is None else self.velocity.family.encoder_info(self.encoder),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the record (:mod:`instaflow_pl.checkpoints`); leave out what ``base_model`` restores (text encoder,
        VAE, LPIPS net, frozen velocity weights)."""
        omitted = self.frozen_base_keys()
        self.checkpoint_record(omitted).write(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(_FROZEN_PREFIXES) or k in omitted]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another module kind's checkpoint; bring an earlier version's to today's layout
        (:func:`~instaflow_pl.checkpoints.upgrade`); restore the parts left out from this module and the recorded
        conditioning (:meth:`Family.configure_encoder`)."""
        record = read_record(checkpoint, type(self).__name__)
        if isinstance(self.velocity, NetworkVelocity) and not self.velocity.family.answers_to(record.family):
            raise UserError(
                f"the checkpoint holds an {record.family} model, but this run's base_model is an "
                f"{self.velocity.family.name} model; resume with the base_model the checkpoint was trained from"
            )
        if isinstance(self.velocity, NetworkVelocity):  # e.g. a Flux student's guidance input, also without data
            self.velocity.family.configure_encoder(self.encoder, record.conditioning)
        if "state_dict" not in checkpoint:  # a sharded checkpoint: the strategy has already read the shards
            return
        state = checkpoint["state_dict"]
        omitted = self.frozen_base_keys()
        for key, value in self.state_dict().items():
            if key.startswith(_FROZEN_PREFIXES) or key in omitted:
                state.setdefault(key, value)


def batch_seed(rank: int, batch_index: int, run_seed: int | str | None = None) -> int:
    """Seed of training batch ``batch_index`` on ``rank``: a hash of the run's seed (default: ``PL_GLOBAL_SEED``, which
    ``seed_everything`` sets; 0 without it), the rank and the index. Each rank draws differently; a resumed fit draws
    what the uninterrupted one drew."""
    run_seed = os.environ.get("PL_GLOBAL_SEED", "0") if run_seed is None else run_seed
    key = f"instaflow-pl:{run_seed}:{rank}:{batch_index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu"):
    """Run the block with torch's CPU generator (and ``device``'s CUDA generator) seeded with ``seed``; the outer
    generator states are restored afterwards."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def clip_gradients(optimizer: torch.optim.Optimizer, value: float | None, algorithm: Any = None) -> None:
    """Clip the gradients of every parameter ``optimizer`` steps: by their global norm (default) or by value."""
    if not value:
        return
    grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:  # a skipped batch: no backward ran
        return
    if str(getattr(algorithm, "value", algorithm)) == "value":
        torch.nn.utils.clip_grad_value_(grads, value)
    else:
        torch.nn.utils.clip_grad_norm_(grads, value)


def check_clipping(trainer: L.Trainer) -> None:
    """One line for the setup that cannot clip: a gradient scaler (``precision: 16-mixed``) with an optimizer that
    unscales inside its own step (fused AdamW), whose gradients are still scaled when clipping would run."""
    if not trainer.gradient_clip_val or getattr(trainer.precision_plugin, "scaler", None) is None:
        return
    for optimizer in trainer.optimizers:
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise UserError(
                f"precision {trainer.precision} scales gradients, and {type(optimizer).__name__} with fused=true "
                "unscales them only inside its step, so gradient_clip_val cannot clip them; use precision "
                "bf16-mixed (no scaler), set the optimizer's fused: false, or drop gradient_clip_val"
            )


def check_latent_shape(network: nn.Module, shape: Sequence[int], source: str = "the triples") -> None:
    """A clear error when latents of ``shape`` (C, H, W) cannot go through ``network``."""
    from instaflow_pl.families import latent_geometry

    geometry = latent_geometry(network)
    if not geometry.fits(tuple(shape)):
        raise UserError(
            f"latents in {source} have shape {list(shape)}, but the model's network takes {geometry.describe()}; "
            "generate pairs with the student's latent shape or pick a matching base_model"
        )
