"""``instaflow-pl evaluate``: the paper's evaluation protocol (FID, CLIP score, NFE, speed) under ``Trainer.predict``.

Every row of the report is one model at one step count and guidance weight. Sample i of every row is generated from
caption i and the noise of ``seed + i`` (the project's seed rule), so the rows differ only by their models. Each
rank computes whole shards of (row, samples); a shard's FID features and CLIP scores are committed atomically
(``evaluation/store.py``), so a killed evaluation resumes where it stopped, and the numbers, computed on rank zero
from the stored features in sample order, do not depend on the number of ranks or on interruptions.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from instaflow_pl.conventions import latents_to_images, noise_for_indices
from instaflow_pl.data.prompts import prompts_digest
from instaflow_pl.errors import UserError
from instaflow_pl.evaluation.captions import CaptionBatch
from instaflow_pl.evaluation.reference import ReferenceImages
from instaflow_pl.evaluation.store import EvaluationSpec, EvaluationStore, RowSpec, ShardResult
from instaflow_pl.predict import ShardedPredict, ShardWriter


@dataclass
class ModelToEvaluate:
    """A model of the evaluation and the settings it is sampled at (one report row per steps x guidance).

    Attributes:
        folder: An exported velocity folder (``instaflow-pl export``; Euler steps) or a diffusion teacher folder such
            as Stable Diffusion 1.5 (solved through its scheduler).
        name: Name in the report (default: the folder's name).
        steps: Step counts, one row each.
        guidance: Classifier-free guidance weights, one row each (1 or less: none, conditional branch only).
        solver: ``auto`` (Euler for a velocity folder; the folder's own scheduler for a released one, as its stock
            pipeline samples it), an ODE method (``euler``, ``midpoint``, ``heun``, ``rk4``) or a scheduler (``dpm++``,
            ``ddim``, ``euler-discrete``, ``pndm``, ``unipc``).
        dtype: Weight dtype: ``fp32``, ``fp16`` or ``bf16``.
    """

    folder: str
    name: str | None = None
    steps: list[int] = field(default_factory=lambda: [1])
    guidance: list[float] = field(default_factory=lambda: [1.0])
    solver: str = "auto"
    dtype: str = "fp32"


@dataclass
class EvaluatedBatch:
    """What one predict step produces: one micro-batch of a row, measured.

    Attributes:
        row: The report row.
        indices: Sample indices.
        features: FID features, (B, D).
        clip: CLIP scores, (B,) (empty without a CLIP model).
        nfe: Network evaluations per image.
        images: uint8 images of the samples the grid shows (indices below ``grid_columns``).
    """

    row: int
    indices: list[int]
    features: torch.Tensor
    clip: torch.Tensor
    nfe: int
    images: torch.Tensor


def _check_model(spec: ModelToEvaluate) -> tuple[str, str, str]:
    """(kind, fingerprint, solver) of a model folder; one line for a folder that is not a model."""
    from instaflow_pl.dtypes import parse_dtype
    from instaflow_pl.model_folder import ModelFolder

    try:
        folder = ModelFolder.open(spec.folder)
        scheduler_config = folder.require_scheduler()
    except UserError as err:
        raise UserError(f"{Path(spec.folder).name} is not a model to evaluate: {err}") from None
    root, kind, family = folder.root, folder.kind, folder.family
    solver = family.solver_name(kind, spec.solver, scheduler_config)
    allowed = family.allowed_solvers(kind)
    if solver not in allowed:
        raise UserError(
            f"solver {solver!r} does not fit {root} ({kind} model): choose auto or one of {', '.join(allowed)}"
        )
    if not spec.steps or min(spec.steps) < 1:
        raise UserError(f"steps of {spec.folder} must be a non-empty list of counts >= 1, got {spec.steps}")
    if not spec.guidance or min(spec.guidance) < 0:
        raise UserError(f"guidance of {spec.folder} must be a non-empty list of weights >= 0, got {spec.guidance}")
    parse_dtype(spec.dtype)
    return kind, folder.fingerprint(), solver


class Evaluation(ShardedPredict):
    """Evaluates models on a caption set against a reference image folder: FID, CLIP score, NFE and speed.

    Run it with ``instaflow-pl evaluate --config configs/eval/coco5k.yaml`` (``Trainer.predict``; any number of
    devices and nodes). The numbers are written to ``output_dir`` as ``report.md`` (model | steps | guidance | NFE |
    FID | CLIP | ms/img), ``report.json`` and ``grid.png`` (rows: model x steps x guidance; columns: the first
    captions, the same noise down each column), and to the configured logger (W&B: a table and the grid).

    FID follows torch-fidelity's convention: images become uint8 (rounded, as diffusers saves them) and InceptionV3
    resizes them to 299 x 299 itself (bilinear, as TensorFlow 1 did); reference images are first resized (bicubic,
    shorter side) to ``reference_resolution`` and centre-cropped (or squashed to a square with ``center_crop: false``).

    Args:
        models: The models, each with its step counts and guidance weights.
        output_dir: Folder of the evaluation (created; an interrupted one is resumed with the same settings).
        reference_folder: Folder of real images (e.g. COCO val2017): its FID statistics are computed once and cached,
            keyed by the folder listing (names and sizes), the resize settings and the feature network.
        reference_resolution: Side the reference images are brought to before the feature network.
        center_crop: Resize the shorter side and crop the centre (else resize to a square, distorting).
        inception_weights: Local file of FID's InceptionV3 (``weights-inception-2015-12-05-6726825d.pth``); never
            downloaded.
        feature_dim: Inception feature layer: 2048 (the standard FID), 768, 192 or 64.
        fid_features: Another feature network instead of Inception (e.g. ``RandomFeatures`` for tiny settings).
        clip_model: Local CLIP folder (ViT-L/14 or ViT-g/14 saved with ``save_pretrained``) for the CLIP score;
            null: no CLIP score.
        seed: Sample i uses the noise of ``seed + i`` in every row.
        shard_size: Samples per shard, the unit of resumption and of work per rank.
        grid_columns: Captions shown in the grid (the first ones).
        grid_image_size: Side of each image in the grid.
        timing_batches: Batches timed per row after one warm-up batch (0: no speed measurement).
        cache_dir: Where reference statistics are cached (default: ``~/.cache/instaflow-pl/fid``).
    """

    progress_label = "evaluate"
    progress_unit = "image"

    def __init__(
        self,
        models: list[ModelToEvaluate],
        output_dir: str,
        reference_folder: str,
        reference_resolution: int = 512,
        center_crop: bool = True,
        inception_weights: str | None = None,
        feature_dim: int = 2048,
        fid_features: nn.Module | None = None,
        clip_model: str | None = None,
        seed: int = 0,
        shard_size: int = 250,
        grid_columns: int = 8,
        grid_image_size: int = 128,
        timing_batches: int = 3,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not models:
            raise UserError("models is empty: list at least one model folder to evaluate")
        for name, value, low in (
            ("shard_size", shard_size, 1),
            ("grid_columns", grid_columns, 0),
            ("grid_image_size", grid_image_size, 8),
            ("timing_batches", timing_batches, 0),
            ("reference_resolution", reference_resolution, 8),
        ):
            if value < low:
                raise UserError(f"model.init_args.{name} must be >= {low}, got {value}")
        from instaflow_pl.callbacks.quality import default_cache_dir

        self.models = [m if isinstance(m, ModelToEvaluate) else ModelToEvaluate(**m) for m in models]
        self.rows: list[RowSpec] = []
        for spec in self.models:
            kind, fingerprint, solver = _check_model(spec)
            name = spec.name or Path(spec.folder).name
            for steps in spec.steps:
                for guidance in spec.guidance:
                    row = RowSpec(
                        name, str(spec.folder), kind, fingerprint, solver, int(steps), float(guidance), spec.dtype
                    )
                    self.rows.append(row)
        self.output_dir = output_dir
        self.seed = seed
        self.shard_size = shard_size
        self.grid_columns = grid_columns
        self.grid_image_size = grid_image_size
        self.timing_batches = timing_batches
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.reference_images = ReferenceImages(reference_folder, reference_resolution, center_crop)
        self.features = self._feature_net(fid_features, inception_weights, feature_dim)
        self.clip = None
        if clip_model is not None:
            from instaflow_pl.metrics import CLIPScore

            self.clip = CLIPScore(clip_model)
        self.reference = None
        self._loaded: tuple[tuple, Any, Any] | None = None

    @staticmethod
    def _feature_net(fid_features: nn.Module | None, weights: str | None, dim: int) -> nn.Module:
        if fid_features is not None:
            return fid_features.requires_grad_(False).eval()
        if weights is None:
            from instaflow_pl.metrics.fid import INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL

            raise UserError(
                f"set model.init_args.inception_weights to your local {INCEPTION_WEIGHTS_FILE} (from "
                f"{INCEPTION_WEIGHTS_URL}) for FID, or fid_features to another feature network"
            )
        from instaflow_pl.metrics import inception_features

        return inception_features(weights, feature_dim=dim)

    # ---- setup and work ---------------------------------------------------------------------------------------

    def spec_for(self, captions: list[str], source: str) -> EvaluationSpec:
        """What the rows of this evaluation share, for ``captions``."""
        from instaflow_pl.metrics import module_fingerprint

        return EvaluationSpec(
            num_samples=len(captions),
            seed=self.seed,
            shard_size=self.shard_size,
            captions_sha256=prompts_digest(captions),
            features=module_fingerprint(self.features),
            reference=self.reference_images.key,
            clip=module_fingerprint(self.clip.model) if self.clip is not None else "",
            grid_columns=self.grid_columns,
            captions_source=str(source),
            reference_folder=str(self.reference_images.folder),
        )

    def make_store(self, datamodule: L.LightningDataModule | None) -> EvaluationStore:
        """The evaluation folder for the captions ``datamodule`` serves."""
        if datamodule is None or not hasattr(datamodule, "captions"):
            raise UserError(
                "evaluate needs a CaptionDataModule (data: class_path: instaflow_pl.evaluation.CaptionDataModule)"
            )
        return EvaluationStore(self.output_dir, self.spec_for(datamodule.captions, datamodule.source), self.rows)

    def open_on_rank_zero(self) -> None:
        """Open (or resume) the output folder and load the reference statistics (computed once, then cached)."""
        self.store.open()
        self.reference = self.reference_images.statistics(self.features, self.cache_dir)

    def opened(self, pending: Sequence[tuple[int, int]]) -> None:
        """Say what is resumed."""
        total = len(self.rows) * self.store.spec.num_shards
        if not pending:
            rank_zero_info(f"{self.store.root}: every shard is computed ({len(self.rows)} rows)")
        elif len(pending) < total:
            rank_zero_info(f"resuming {self.store.root}: {total - len(pending)}/{total} shards already computed")

    def _model(self, row: int):
        """The row's model (a Teacher with the row's steps) and its VAE; one model is kept loaded at a time."""
        from instaflow_pl.dtypes import parse_dtype
        from instaflow_pl.model_folder import ModelFolder
        from instaflow_pl.teachers import load_teacher

        spec = self.rows[row]
        key = (spec.folder, spec.solver, spec.dtype)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            folder = ModelFolder.open(spec.folder)
            teacher = load_teacher(folder, solver=spec.solver, steps=spec.steps, dtype=spec.dtype, device=self.device)
            vae = None
            if folder.vae_config is not None:
                dtype = parse_dtype(spec.dtype)
                vae = folder.load_vae()
                vae = vae.to(self.device) if dtype == torch.float32 else vae.to(self.device, dtype)
            self._loaded = (key, teacher, vae)
        _, teacher, vae = self._loaded
        return teacher.with_steps(spec.steps), vae

    @torch.no_grad()
    def generate(self, row: int, indices: list[int], captions: list[str]) -> tuple[torch.Tensor, int]:
        """Images (B, 3, H, W) in [-1, 1] of samples ``indices`` of a row, and the network evaluations per image."""
        spec = self.rows[row]
        teacher, vae = self._model(row)
        x0 = noise_for_indices(self.seed, indices, teacher.latent_shape).to(self.device)
        solution = teacher.sample(x0, captions, guidance=spec.guidance)
        latents = solution.x
        images = latents_to_images(vae, latents) if vae is not None else latents
        images = images.float().clamp(-1, 1)
        if images.shape[1] == 1:  # a grey pixel-space model: FID and CLIP features take RGB
            images = images.expand(-1, 3, -1, -1)
        return images, solution.nfe * (2 if spec.guidance > 1 else 1)

    def predict_step(self, batch: CaptionBatch, batch_idx: int = 0) -> EvaluatedBatch:
        """Generate one micro-batch of a row and measure it (FID features, CLIP scores)."""
        images, nfe = self.generate(batch.row, batch.indices, batch.captions)
        with torch.no_grad():
            features = self.features(images).reshape(images.shape[0], -1).float()
            clip = (
                self.clip.scores(images, batch.captions).double()
                if self.clip is not None
                else torch.zeros(0, dtype=torch.float64)
            )
        shown = [j for j, i in enumerate(batch.indices) if i < self.grid_columns]
        return EvaluatedBatch(
            batch.row, batch.indices, features.cpu(), clip.cpu(), nfe, self._thumbnails(images[shown]).cpu()
        )

    def _thumbnails(self, images: torch.Tensor) -> torch.Tensor:
        size = self.grid_image_size
        if not images.shape[0]:
            return torch.zeros(0, 3, size, size, dtype=torch.uint8)
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def unit_key(self, prediction: EvaluatedBatch) -> tuple[int, int]:
        """The (row, shard) of a micro-batch (micro-batches never cross a shard)."""
        return prediction.row, prediction.indices[0] // self.shard_size

    def commit_unit(self, key: tuple[int, int], parts: list[EvaluatedBatch]) -> None:
        """Commit a whole shard of a row: its FID features, CLIP scores, NFE and grid images."""
        row, shard = key
        result = ShardResult(
            indices=[i for p in parts for i in p.indices],
            features=torch.cat([p.features for p in parts]),
            clip=torch.cat([p.clip for p in parts]),
            nfe=parts[0].nfe,
            images=torch.cat([p.images for p in parts]),
        )
        self.store.write_shard(row, shard, result, rank=self.trainer.global_rank)

    # ---- speed and report (rank zero) -------------------------------------------------------------------------

    def measure_speed(self, row: int, captions: list[str], batch_size: int) -> dict:
        """Milliseconds per image of a row: captions to decoded images, warm (one untimed batch first)."""
        indices = list(range(batch_size))
        prompts = [captions[i % len(captions)] for i in indices]
        cuda = self.device.type == "cuda"
        self.generate(row, indices, prompts)  # warm-up: allocations, kernels, caches
        elapsed = 0.0
        for _ in range(self.timing_batches):
            if cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self.generate(row, indices, prompts)
            if cuda:
                torch.cuda.synchronize(self.device)
            elapsed += time.perf_counter() - start
        return {
            "ms_per_image": 1000.0 * elapsed / (self.timing_batches * batch_size),
            "batch_size": batch_size,
            "batches": self.timing_batches,
            "device": device_name(self.device),
            "dtype": self.rows[row].dtype,
        }

    def complete(self, samples: int, seconds: float) -> None:
        """Measure speed and write the report (rank zero, once every rank has committed its shards)."""
        datamodule = self.trainer.datamodule
        path = self.finish(datamodule.captions, datamodule.batch_size)
        if path is not None:
            rank_zero_info(f"wrote {path}")

    def finish(self, captions: list[str], batch_size: int) -> Path | None:
        """Measure the speed of rows not measured yet, then write the report (rank zero). Returns report.md's path."""
        from instaflow_pl.evaluation.report import write_report

        store = self.store
        if self.timing_batches:
            for row in range(len(self.rows)):
                if store.timing(row) is None:
                    store.write_timing(row, self.measure_speed(row, captions, batch_size))
        self._loaded = None
        return write_report(
            store, self.reference, captions, self.reference_images.convention(self.features), self.trainer.loggers
        )


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "CPU"
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


EvaluationWriter = ShardWriter
"""Evaluation's writer: a :class:`~instaflow_pl.predict.ShardWriter` (the name is public API)."""
