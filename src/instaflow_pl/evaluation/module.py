"""``instaflow-pl evaluate``: the paper's evaluation protocol (FID, CLIP score, NFE, speed) under ``Trainer.predict``.

Every row of the report is one model at one step count and guidance weight. Sample i of every row is generated from
caption i and the noise of ``seed + i`` (the project's seed rule), so the rows differ only by their models. Each
rank computes whole shards of (row, samples); a shard's FID features and CLIP scores are committed atomically
(``evaluation/store.py``), so a killed evaluation resumes where it stopped, and the numbers, computed on rank zero
from the stored features in sample order, do not depend on the number of ranks or on interruptions.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from instaflow_pl.conventions import latents_to_images, noise_for_indices
from instaflow_pl.data.prompts import prompts_digest
from instaflow_pl.errors import UserError
from instaflow_pl.evaluation.captions import CaptionBatch
from instaflow_pl.evaluation.reference import ReferenceImages
from instaflow_pl.evaluation.store import EvaluationSpec, EvaluationStore, RowSpec, ShardResult

warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


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
    from instaflow_pl.families import family_of_folder
    from instaflow_pl.teachers import fingerprint, model_kind, parse_dtype, resolve_model_folder

    root = resolve_model_folder(spec.folder)
    kind = model_kind(root)
    family = family_of_folder(root)
    for part in (family.network_folder, *family.text_parts, "scheduler"):
        if not (root / part).is_dir():
            raise UserError(
                f"{root} is not a model to evaluate: it has no {part}/ subfolder (give an exported folder or a "
                f"released {family.name} folder: {family.network_folder}, {', '.join(family.text_parts)}, scheduler)"
            )
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {scheduler_file} ({err}); a model folder needs its scheduler config") from None
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
    return kind, fingerprint(root), solver


class Evaluation(L.LightningModule):
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
        self.store: EvaluationStore | None = None
        self.reference = None
        self._units: list[tuple[int, range]] = []
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

    def setup(self, stage: str) -> None:
        """Open (or resume) the output folder and load the reference statistics on rank zero; split the work."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "captions"):
            raise UserError(
                "evaluate needs a CaptionDataModule (data: class_path: instaflow_pl.evaluation.CaptionDataModule)"
            )
        self.store = EvaluationStore(self.output_dir, self.spec_for(datamodule.captions, datamodule.source), self.rows)
        error = None
        if self.trainer.is_global_zero:
            try:
                self.store.open()
                self.reference = self.reference_images.statistics(self.features, self.cache_dir)
            except UserError as err:
                error = str(err)
        error = self.trainer.strategy.broadcast(error, src=0)
        if error:
            raise UserError(error)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        pending = self.store.pending()
        self._units = [(r, self.store.spec.shard_range(s)) for j, (r, s) in enumerate(pending) if j % world == rank]
        total = len(self.rows) * self.store.spec.num_shards
        if not pending:
            rank_zero_info(f"{self.store.root}: every shard is computed ({len(self.rows)} rows)")
        elif len(pending) < total:
            rank_zero_info(f"resuming {self.store.root}: {total - len(pending)}/{total} shards already computed")

    def work_units(self) -> list[tuple[int, range]]:
        """The (row, sample range) units this rank computes; used by the CaptionDataModule."""
        return self._units

    def _model(self, row: int):
        """The row's model (a Teacher with the row's steps) and its VAE; one model is kept loaded at a time."""
        from instaflow_pl.callbacks.grid import load_vae
        from instaflow_pl.teachers import load_teacher, parse_dtype

        spec = self.rows[row]
        key = (spec.folder, spec.solver, spec.dtype)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            teacher = load_teacher(
                spec.folder, solver=spec.solver, steps=spec.steps, dtype=spec.dtype, device=self.device
            )
            vae = load_vae(spec.folder)
            if vae is not None:
                dtype = parse_dtype(spec.dtype)
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
        if images.shape[1] == 1:  # a grey pixel-space model (the digits demo)
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

    def configure_callbacks(self) -> list[L.Callback]:
        """Evaluation always writes through an :class:`EvaluationWriter`."""
        return [EvaluationWriter()]

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


class EvaluationWriter(BasePredictionWriter):
    """Collects measured samples per (row, shard), commits each shard as soon as it is whole; then the report."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self._pending: dict[tuple[int, int], list[EvaluatedBatch]] = {}
        self._bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: Evaluation) -> None:
        """Open the progress bar (rank zero) over the samples this rank computes."""
        total = sum(len(r) for _, r in pl_module.work_units())
        if trainer.is_global_zero and total:
            self._bar = tqdm(total=total, desc="evaluate", unit="image", dynamic_ncols=True)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: Evaluation,
        prediction: EvaluatedBatch,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Buffer the batch; commit every shard it completes."""
        spec = pl_module.store.spec
        shard = prediction.indices[0] // spec.shard_size
        parts = self._pending.setdefault((prediction.row, shard), [])
        parts.append(prediction)
        if sum(len(p.indices) for p in parts) == len(spec.shard_range(shard)):
            parts = sorted(self._pending.pop((prediction.row, shard)), key=lambda p: p.indices[0])
            result = ShardResult(
                indices=[i for p in parts for i in p.indices],
                features=torch.cat([p.features for p in parts]),
                clip=torch.cat([p.clip for p in parts]),
                nfe=parts[0].nfe,
                images=torch.cat([p.images for p in parts]),
            )
            try:
                pl_module.store.write_shard(prediction.row, shard, result, rank=trainer.global_rank)
            except ValueError as err:
                raise UserError(str(err)) from None
        if self._bar is not None:
            self._bar.update(len(prediction.indices))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Close the progress bar, so the error is printed on a line of its own."""
        self._close()

    def on_predict_end(self, trainer: L.Trainer, pl_module: Evaluation) -> None:
        """Wait for every rank; rank zero measures speed and writes the report."""
        self._close()
        if self._pending:
            raise RuntimeError(f"shards {sorted(self._pending)} were left incomplete; rerun to finish them")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            path = pl_module.finish(datamodule.captions, datamodule.batch_size)
            if path is not None:
                rank_zero_info(f"wrote {path}")
