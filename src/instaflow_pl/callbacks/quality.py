"""Sample quality during validation: FID and CLIP score of the model's samples at 1, 2, 4 ... N Euler steps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from instaflow_pl.callbacks.grid import module_vae
from instaflow_pl.conventions import latents_to_images, noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import raise_if_any_rank_failed, rank_zero_first, setup_on_every_rank


class SampleQuality(L.Callback):
    """Logs ``val/fid@n`` and ``val/clip@n`` for each step count n at the end of validation (computed on rank zero).

    The evaluation set is the first ``num_samples`` validation triples: their prompts, and noises drawn by the seed
    rule from ``seed``. FID compares the decoded samples with a reference set, by default the decoded X1 of the same
    triples (the teacher's images), whose statistics are computed once and cached in ``cache_dir``.

    Args:
        steps: Euler step counts to evaluate.
        num_samples: Images per evaluation.
        batch_size: Images per sampling call.
        guidance: Classifier-free guidance of the samples.
        seed: Base seed of the evaluation noises.
        every_n_epochs: Evaluate after every n-th validation epoch.
        fid_features: Feature network of FID (any module mapping images in [-1, 1] to features, e.g. a digit
            classifier); null with ``inception_weights`` set: the standard InceptionV3.
        inception_weights: Local file of FID's InceptionV3 weights (``weights-inception-2015-12-05-6726825d.pth``).
        fid_reference: Image folder of reference images; null: the decoded X1 of the evaluation triples.
        reference_resolution: Size the reference folder's images are read at (default: the samples' size).
        cache_dir: Where reference statistics are cached (default: ``~/.cache/instaflow-pl/fid``).
        clip_model: Local CLIP folder (or hub id) for the CLIP score; null: no CLIP score.
    """

    def __init__(
        self,
        steps: Sequence[int] = (1, 2, 4, 25),
        num_samples: int = 64,
        batch_size: int = 16,
        guidance: float = 1.0,
        seed: int = 0,
        every_n_epochs: int = 1,
        fid_features: nn.Module | None = None,
        inception_weights: str | None = None,
        fid_reference: str | None = None,
        reference_resolution: int | None = None,
        cache_dir: str | None = None,
        clip_model: str | None = None,
    ):
        if num_samples < 2 or batch_size < 1 or not steps or min(steps) < 1:
            raise UserError("SampleQuality needs num_samples >= 2, batch_size >= 1 and step counts >= 1")
        self.steps = [int(s) for s in steps]
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.guidance = guidance
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.fid_features = fid_features
        self.inception_weights = inception_weights
        self.fid_reference = fid_reference
        self.reference_resolution = reference_resolution
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.clip_model = clip_model
        self.seconds: float | None = None
        self._features: nn.Module | None = None
        self._clip = None
        self._vae = None
        self._reference = None

    @setup_on_every_rank
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the configured weights before any step runs, not at the first validation (hours later)."""
        if self.fid_features is None and self.inception_weights is not None:
            from instaflow_pl.metrics.fid import check_inception_weights

            check_inception_weights(self.inception_weights)
        if self.clip_model is not None:
            from instaflow_pl.metrics.clip_score import check_clip_source

            check_clip_source(self.clip_model)

    def _feature_net(self) -> nn.Module | None:
        if self._features is None:
            if self.fid_features is not None:
                self._features = self.fid_features
            elif self.inception_weights is not None:
                from instaflow_pl.metrics import inception_features

                self._features = inception_features(self.inception_weights)
        return self._features

    def _evaluation_set(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list[str], torch.Tensor]:
        """The first ``num_samples`` validation prompts and their X1 in the model's latent space (image batches are
        encoded by the module first, ``encode_images``)."""
        prompts, x1 = [], []
        for batch in trainer.datamodule.val_dataloader():
            batch = pl_module.to_latents(batch.to(pl_module.device))
            prompts += list(batch.prompts)
            x1.append(batch.x1.cpu())
            if len(prompts) >= self.num_samples:
                break
        if len(prompts) < 2:
            raise UserError("SampleQuality needs a validation split with at least 2 samples (data.val_fraction)")
        n = min(self.num_samples, len(prompts))
        return prompts[:n], torch.cat(x1)[:n]

    def _decode(self, pl_module, latents: torch.Tensor) -> torch.Tensor:
        if self._vae is None:
            self._vae = module_vae(pl_module) or False
        if self._vae is False:
            return latents  # a setting without a VAE: latent = image
        vae = self._vae.to(pl_module.device)
        return torch.cat([latents_to_images(vae, c).clamp(-1, 1) for c in latents.split(self.batch_size)])

    def _samples(self, pl_module, prompts: list[str], steps: int) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            x0 = noise_for_indices(self.seed, range(start, start + len(chunk)), self._shape).to(pl_module.device)
            out.append(pl_module.sample(x0, chunk, steps, self.guidance).x)
        return self._decode(pl_module, torch.cat(out))

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Every metric for every step count."""
        from instaflow_pl.metrics import FID, CLIPScore

        prompts, x1 = self._evaluation_set(trainer, pl_module)
        self._shape = tuple(x1.shape[1:])
        results: dict[str, float] = {}
        features = self._feature_net()
        fid = None
        if features is not None:
            reference = self._reference
            if reference is None:
                reference = self._compute_reference(pl_module, features, x1)[0]
            # Rank zero evaluates alone: a synchronising compute would wait for the other ranks forever.
            fid = FID(features, reference=reference, sync_on_compute=False).to(pl_module.device)
        if self.clip_model is not None and self._clip is None:
            self._clip = CLIPScore(self.clip_model, sync_on_compute=False)
        for steps in self.steps:
            images = self._samples(pl_module, prompts, steps)
            if fid is not None:
                fid.reset()
                fid.update(images)
                results[f"val/fid@{steps}"] = float(fid.compute())
            if self._clip is not None:
                clip = self._clip.to(pl_module.device)
                clip.reset()
                clip.update(images, prompts)
                results[f"val/clip@{steps}"] = float(clip.compute())
        return results

    def _compute_reference(self, pl_module, features: nn.Module, x1: torch.Tensor):
        """The FID reference statistics (read from the cache, or computed and cached) and their cache file."""
        from instaflow_pl.metrics import FIDReference

        if self.fid_reference is not None:
            source, resolution = Path(self.fid_reference), self.reference_resolution
        else:
            source, resolution = self._decode(pl_module, x1.to(pl_module.device)).cpu(), None
        reference = FIDReference.load_or_compute(source, features, self.cache_dir, resolution=resolution)
        return reference, str(FIDReference.cache_path(self.cache_dir, reference.reference_key, reference.feature_key))

    @torch.no_grad()
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first validation: the FID reference, computed and cached by rank 0 while the other ranks wait,
        then read from the cache file by them; a failure there ends every rank."""
        if self._reference is not None or (self.fid_features is None and self.inception_weights is None):
            return
        from instaflow_pl.metrics import FIDReference

        def compute():
            was_training = pl_module.training
            pl_module.eval()
            try:
                x1 = self._evaluation_set(trainer, pl_module)[1]
                return self._compute_reference(pl_module, self._feature_net(), x1)
            finally:
                pl_module.train(was_training)

        self._reference = rank_zero_first(compute, FIDReference.load, "SampleQuality's FID reference")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate on rank zero and log through the module, so the numbers reach the loggers and the printed table;
        under DDP an error in the evaluation ends every rank (the others would wait for rank zero forever)."""
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        error = None
        if trainer.is_global_zero:
            try:
                self._evaluate_and_log(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
                error = err
        raise_if_any_rank_failed(error, "SampleQuality's evaluation")

    def _evaluate_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            results = self.evaluate(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        for key, value in results.items():
            pl_module.log(key, value, rank_zero_only=True)
        self.seconds = time.perf_counter() - started


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/instaflow-pl/fid`` (``~/.cache/instaflow-pl/fid`` by default): outside any checkout."""
    import os
    from pathlib import Path

    return str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "instaflow-pl" / "fid")
