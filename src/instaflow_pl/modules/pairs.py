"""Pair generation: a teacher turns noise and prompts into (X0, X1, prompt) triples, under ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from instaflow_pl.conventions import noise_for_indices, sample_seed
from instaflow_pl.data.manifest import X0_FORMATS, X1_DTYPES, Manifest
from instaflow_pl.data.prompt_stream import PromptBatch
from instaflow_pl.data.prompts import prompts_digest
from instaflow_pl.data.store import PairRecord, PairStore
from instaflow_pl.errors import UserError
from instaflow_pl.predict import ShardedPredict, ShardWriter
from instaflow_pl.ranks import rank_zero_first
from instaflow_pl.speed import set_tf32, speed_up
from instaflow_pl.teachers import load_teacher


@dataclass
class GeneratedBatch:
    """What one predict step produces.

    Attributes:
        indices: Sample indices.
        prompts: Their prompts.
        x1: Teacher outputs, (B, C, H, W).
        x0: The noises, (B, C, H, W).
        nfe: Teacher evaluations spent on the batch.
    """

    indices: list[int]
    prompts: list[str]
    x1: torch.Tensor
    x0: torch.Tensor
    nfe: int


class PairGenerator(ShardedPredict):
    """Generates the (X0, X1, prompt) triples of reflow or distillation with a teacher.

    Sample ``i`` uses noise drawn from ``seed + i`` (:func:`instaflow_pl.conventions.noise_for_indices`; see
    docs/architecture.md), so the data does not depend on batch size, workers or ranks. Work is cut into shards; each
    rank generates whole shards and a shard is committed atomically, so a killed run resumes where it stopped when
    the same command is run again (the machine is :class:`~instaflow_pl.predict.ShardedPredict`'s).

    Args:
        teacher: Diffusers-format folder (or hub id) of a Stable Diffusion model or a velocity (k-RF) model.
        output_dir: Dataset folder to create or resume.
        solver: ``auto`` (the folder's own scheduler for a released folder, Euler for a velocity one), a scheduler
            name for SD and SDXL (``dpm++``, ``ddim``, ...) or an ODE method for SD3 and velocity teachers.
        steps: Solver steps.
        guidance: Classifier-free guidance weight (<= 1: none, only the conditional branch is evaluated).
        seed: Base seed of the noises.
        latent_shape: (C, H, W) of the latents; null: the UNet's native shape.
        teacher_dtype: Teacher weight dtype: ``fp32``, ``fp16`` or ``bf16``.
        x0_format: ``seed`` (store only the seed of X0; exact regeneration, half the bytes) or ``tensor``.
        x1_dtype: Storage dtype of X1: ``fp16``, ``bf16`` or ``fp32``.
        shard_size: Samples per shard (the unit of resumption).
        compile: ``torch.compile`` the teacher's network (the first batches compile; outputs equal to float
            tolerance).
        channels_last: Run the teacher's convolutions channels-last (faster on GPUs).
        tf32: Allow TF32 matmuls and convolutions on Ampere+ GPUs (faster fp32 teachers; changes results slightly).
        max_sequence_length: T5 tokens of a prompt for SD3 and Flux teachers (diffusers' name; at most 512; null:
            the teacher's own, 256 for SD3, 512 for Flux or what a velocity folder records). Recorded in the
            manifest; models trained on the pairs read their prompts the same way.
    """

    progress_label = "pairs"
    progress_unit = "sample"

    def __init__(
        self,
        teacher: str,
        output_dir: str,
        solver: str = "auto",
        steps: int = 25,
        guidance: float = 1.0,
        seed: int = 0,
        latent_shape: list[int] | None = None,
        teacher_dtype: str = "fp32",
        x0_format: str = "seed",
        x1_dtype: str = "fp16",
        shard_size: int = 256,
        compile: bool = False,
        channels_last: bool = False,
        tf32: bool = False,
        max_sequence_length: int | None = None,
    ):
        super().__init__()
        if x0_format not in X0_FORMATS:
            raise UserError(f"x0_format must be one of {', '.join(X0_FORMATS)}, got {x0_format!r}")
        if x1_dtype not in X1_DTYPES:
            raise UserError(f"x1_dtype must be one of {', '.join(X1_DTYPES)}, got {x1_dtype!r}")
        if shard_size < 1:
            raise UserError(f"shard_size must be >= 1, got {shard_size}")
        if guidance < 0:
            raise UserError(f"guidance must be >= 0 (1 or less means no guidance), got {guidance}")
        self.teacher = load_teacher(teacher, solver=solver, steps=steps, dtype=teacher_dtype)
        if max_sequence_length is not None:
            self.teacher.family.set_prompt_length(self.teacher.encoder, max_sequence_length)
        network = getattr(self.teacher.model, "network", None)
        if network is not None:
            speed_up(network, compile=compile, channels_last=channels_last)
        self.tf32 = tf32
        self.latent_shape = self.teacher.check_latent_shape(latent_shape or self.teacher.latent_shape)
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.teacher_dtype = teacher_dtype
        self.x0_format = x0_format
        self.x1_dtype = x1_dtype
        self.shard_size = shard_size
        self.output_dir = output_dir

    def manifest_for(self, prompts: list[str], source: str) -> Manifest:
        """The manifest this configuration produces for ``prompts``."""
        return Manifest(
            teacher=self.teacher.source,
            teacher_kind=self.teacher.kind,
            teacher_fingerprint=self.teacher.fingerprint,
            teacher_dtype=self.teacher_dtype,
            solver=self.teacher.solver_name,
            steps=self.steps,
            guidance=float(self.guidance),
            seed=self.seed,
            latent_shape=list(self.latent_shape),
            x0_format=self.x0_format,
            x1_dtype=self.x1_dtype,
            count=len(prompts),
            shard_size=self.shard_size,
            prompts_sha256=prompts_digest(prompts),
            prompts_source=str(source),
            family=self.teacher.family.name,
            max_sequence_length=self.teacher.family.prompt_length(self.teacher.encoder),
        )

    def setup(self, stage: str) -> None:
        """Open (or resume) the dataset folder on rank 0 and decide which shards this rank generates."""
        set_tf32(self.tf32, self.trainer.strategy.root_device)
        super().setup(stage)

    def make_store(self, datamodule: L.LightningDataModule | None) -> PairStore:
        """The dataset folder for the prompts ``datamodule`` serves."""
        if datamodule is None or not hasattr(datamodule, "prompts"):
            raise UserError("pair generation needs a PromptDataModule (data: class_path: ...PromptDataModule)")
        return PairStore(self.output_dir, self.manifest_for(datamodule.prompts, datamodule.source))

    def opened(self, pending: Sequence[int]) -> None:
        """Say what is resumed; write the index if only the index is left (killed after the last shard)."""
        store, manifest = self.store, self.store.manifest
        # Decided by rank 0 before it writes anything, so every rank takes the same branch.
        index_left = self.trainer.strategy.broadcast(not pending and not store.is_complete(), src=0)
        done = manifest.num_shards - len(pending)
        if index_left:
            rank_zero_first(lambda: (store.finalize(), None), lambda _: None, "writing the dataset index")
            rank_zero_info(f"{store.root}: all shards were written; wrote the index")
        elif not pending:
            rank_zero_info(f"{store.root} is complete ({manifest.count} samples); nothing to do")
        elif done:
            rank_zero_info(f"resuming {store.root}: {done}/{manifest.num_shards} shards already written")

    def work_ranges(self, count: int) -> list[range]:
        """The sample ranges (whole shards) this rank generates; used by the PromptDataModule."""
        return [samples for _, samples in self.work_units()]

    def predict_step(self, batch: PromptBatch, batch_idx: int = 0) -> GeneratedBatch:
        """Solve the teacher's ODE for one micro-batch."""
        x0 = noise_for_indices(self.seed, batch.indices, self.latent_shape).to(self.device)
        solution = self.teacher.sample(x0, batch.prompts, guidance=self.guidance)
        return GeneratedBatch(batch.indices, batch.prompts, solution.x, x0, solution.nfe)

    def unit_key(self, prediction: GeneratedBatch) -> int:
        """The shard of a micro-batch (micro-batches never cross a shard)."""
        return prediction.indices[0] // self.shard_size

    def commit_unit(self, key: int, parts: list[GeneratedBatch]) -> None:
        """Write and commit a whole shard."""
        manifest = self.store.manifest
        keep_x0 = manifest.x0_format == "tensor"
        records = [
            PairRecord(
                index=index,
                seed=sample_seed(manifest.seed, index),
                prompt=part.prompts[row],
                x1=part.x1[row],
                x0=part.x0[row] if keep_x0 else None,
            )
            for part in parts
            for row, index in enumerate(part.indices)
        ]
        self.store.write_shard(key, records)

    def complete(self, samples: int, seconds: float) -> None:
        """Write the dataset index (rank 0, once every rank has written its shards)."""
        if self.store.is_complete():
            return
        path = self.store.finalize()
        rate = samples / seconds if seconds > 0 else 0.0
        rank_zero_info(f"wrote {path.parent} ({self.store.manifest.count} samples, {rate:.1f}/s here)")


PairWriter = ShardWriter
"""Pair generation's writer: a :class:`~instaflow_pl.predict.ShardWriter` (the name is public API)."""
