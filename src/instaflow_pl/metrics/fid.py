"""Frechet distance between feature statistics (FID), with reference statistics computed once and cached.

Features come from either InceptionV3 with weights from a local file (:func:`inception_features`, the standard FID)
or any ``nn.Module`` that maps a batch of images to ``(B, D)`` features (e.g. the digits demo's classifier).

Typical use (one validation loop)::

    net = inception_features("/models/weights-inception-2015-12-05-6726825d.pth")
    reference = FIDReference.load_or_compute(real_images, net, cache_dir="outputs/fid-cache")
    fid = FID(net, reference=reference)
    fid.update(generated_images)  # images in [-1, 1] for Inception; as the net expects otherwise
    fid.compute()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

from instaflow_pl.errors import UserError
from instaflow_pl.fileio import atomic_path
from instaflow_pl.metrics.fingerprint import (
    folder_fingerprint,
    image_files,
    module_fingerprint,
    tensor_fingerprint,
    text_fingerprint,
)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""The file name of the standard FID InceptionV3 weights (torch-fidelity's conversion of the TensorFlow weights)."""

INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
"""Where to download them, on a machine with network; nothing here ever downloads them."""

CACHE_FORMAT = "1"

UINT8_CONVERSION = "uint8=round"
"""How :class:`InceptionFeatures` turns images into uint8 (rounding, as diffusers' ``numpy_to_pil``); it keys the
cached reference statistics through the network's fingerprint."""

ReferenceSource = torch.Tensor | str | Path | Iterable[torch.Tensor]
"""Reference images: one tensor (N, C, H, W), a folder of image files, or an iterable of image batches."""


class FeatureNet(nn.Module):
    """A feature network that stays in eval mode, frozen, and returns ``(B, D)`` features.

    Args:
        net: Maps a batch of images to features of any shape ``(B, ...)`` (flattened here).
        num_features: D; read from ``net.num_features`` when not given.
    """

    def __init__(self, net: nn.Module, num_features: int | None = None):
        super().__init__()
        num_features = num_features if num_features is not None else getattr(net, "num_features", None)
        if isinstance(num_features, torch.Tensor):
            num_features = int(num_features.item())
        if not isinstance(num_features, int) or num_features < 1:
            raise UserError(f"give num_features for the FID feature network {type(net).__name__} (its feature size)")
        self.net = net.requires_grad_(False)
        self.num_features = num_features
        self.eval()

    def train(self, mode: bool = True) -> FeatureNet:
        """Stay in evaluation mode whatever is asked (a metric's features must not depend on the fit loop)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch, ``(B, D)``."""
        return self.net(images).reshape(images.shape[0], -1)


class InceptionFeatures(nn.Module):
    """FID's InceptionV3 (torchmetrics / torch-fidelity) fed with float images in ``value_range``.

    Images are mapped to uint8 by rounding, as diffusers' ``numpy_to_pil`` saves them (``(x * 255).round()``; a
    reference image read from a PNG comes back to its own bytes), and resized to 299 x 299 inside the network.
    Build it with :func:`inception_features`.
    """

    fingerprint_tag: ClassVar[str] = UINT8_CONVERSION
    """How images become uint8: part of :func:`module_fingerprint`, so statistics cached under another conversion
    (the earlier truncation) are never reused."""

    def __init__(self, inception: nn.Module, num_features: int, value_range: tuple[float, float]):
        super().__init__()
        self.inception = inception
        self.num_features = num_features
        # A buffer, so the range is part of the fingerprint that keys cached reference statistics.
        self.register_buffer("value_range", torch.tensor(value_range, dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(B, num_features)`` of images in ``value_range``."""
        low, high = (float(v) for v in self.value_range)
        unit = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
        return self.inception((unit * 255).round().to(torch.uint8))


def check_inception_weights(weights_path: str | Path) -> Path:
    """The path of the Inception weights file; a clear error that says where to put it if it is not there."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise UserError(
            f"FID Inception weights {path} not found: download {INCEPTION_WEIGHTS_URL} on a machine with network "
            f"and put the file there (or point weights_path at your copy)"
        )
    return path


def inception_features(
    weights_path: str | Path, feature_dim: int = 2048, value_range: tuple[float, float] = (-1.0, 1.0)
) -> InceptionFeatures:
    """The standard FID InceptionV3 with weights from a local file (never downloaded).

    Args:
        weights_path: The file ``weights-inception-2015-12-05-6726825d.pth`` (torchmetrics'
            ``feature_extractor_weights_path``).
        feature_dim: Inception feature layer: 64, 192, 768 or 2048 (the standard FID).
        value_range: Range of the images that will be given (the project's images are in [-1, 1]).

    Returns:
        The network, ready for :class:`FID` and :class:`FIDReference`.
    """
    path = check_inception_weights(weights_path)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(feature_dim)], feature_extractor_weights_path=str(path)
        )
    except ModuleNotFoundError:
        raise UserError(
            "FID with Inception weights needs torch-fidelity: pip install 'torch-fidelity<=0.4.0'"
        ) from None
    return InceptionFeatures(inception, feature_dim, value_range)


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _net_device(net: nn.Module) -> torch.device:
    tensor = next(iter(net.parameters()), None)
    if tensor is None:
        tensor = next(iter(net.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _folder_batches(folder: Path, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Images of a folder, resized and centre-cropped to ``resolution``, in [-1, 1], in batches."""
    from instaflow_pl.data.images import ImagePromptDataset

    dataset = ImagePromptDataset([(path, "") for path in image_files(folder)], resolution)
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])


def reference_key(source: ReferenceSource, key: str | None = None, resolution: int | None = None) -> str:
    """The content key of a reference set: a hash of the tensor, of the folder listing, or of ``key``."""
    if key is not None:
        return text_fingerprint(key)
    if isinstance(source, torch.Tensor):
        return tensor_fingerprint(source)
    if isinstance(source, str | Path):
        return folder_fingerprint(_reference_folder(source), extra=f"resolution={resolution}")
    raise UserError("reference images given as an iterable need an explicit key= (e.g. the data set's name and size)")


def _reference_folder(source: str | Path) -> Path:
    folder = Path(source).expanduser()
    if not folder.is_dir() or not image_files(folder):
        raise UserError(f"FID reference folder {folder} not found or holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
    return folder


def _batches(source: ReferenceSource, batch_size: int, resolution: int | None) -> Iterable[torch.Tensor]:
    if isinstance(source, torch.Tensor):
        return source.split(batch_size)
    if isinstance(source, str | Path):
        if resolution is None:
            raise UserError(f"FID reference folder {source} needs resolution= (images are resized and cropped to it)")
        return _folder_batches(_reference_folder(source), resolution, batch_size)
    return source


@dataclass
class FIDReference:
    """Feature statistics of a reference (real) image set.

    Attributes:
        mean: Mean feature, shape (D,), float64.
        cov: Unbiased feature covariance, shape (D, D), float64.
        count: Number of reference images.
        reference_key: Hash of the reference set (see :func:`reference_key`).
        feature_key: Hash of the feature network (:func:`module_fingerprint` of the unwrapped net).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    reference_key: str = ""
    feature_key: str = ""

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        source: ReferenceSource,
        feature_net: nn.Module,
        *,
        batch_size: int = 64,
        resolution: int | None = None,
        reference_key: str = "",
        feature_key: str = "",
    ) -> FIDReference:
        """Run ``feature_net`` over the reference images (in eval mode, on the net's device) and take statistics.

        Args:
            source: The images (see :data:`ReferenceSource`); a folder is read in [-1, 1] at ``resolution``.
            feature_net: Maps a batch to ``(B, ...)`` features.
            batch_size: Images per forward pass (for a tensor or a folder).
            resolution: Side of the square images read from a folder.
            reference_key: Recorded as is.
            feature_key: Recorded as is.
        """
        device = _net_device(feature_net)
        total: torch.Tensor | None = None
        outer: torch.Tensor | None = None
        count = 0
        with _eval_mode(feature_net):
            for batch in _batches(source, batch_size, resolution):
                features = feature_net(batch.to(device)).reshape(batch.shape[0], -1).double()
                total = features.sum(0) if total is None else total + features.sum(0)
                outer = features.T @ features if outer is None else outer + features.T @ features
                count += features.shape[0]
        if total is None or outer is None or count < 2:
            raise UserError(f"FID reference statistics need at least 2 images, got {count}")
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        return cls(mean.cpu(), cov.cpu(), count, reference_key, feature_key)

    @classmethod
    def load_or_compute(
        cls,
        source: ReferenceSource,
        feature_net: nn.Module,
        cache_dir: str | Path,
        *,
        key: str | None = None,
        batch_size: int = 64,
        resolution: int | None = None,
    ) -> FIDReference:
        """Read the cached statistics of this reference set and feature net, or compute and cache them.

        The cache file's name is a hash of the reference set (tensor bytes, or folder listing with sizes, or ``key``)
        and of the feature net's class and weights, so another set or another net never reads a stale file. Writes
        are atomic, so ranks that compute concurrently leave one valid file.

        Args:
            source: The images: a tensor (N, C, H, W), a folder of image files, or an iterable of batches (then
                ``key`` is required, since an iterable cannot be hashed without reading it).
            feature_net: The feature network (the very module given to :class:`FID`).
            cache_dir: Folder of the cache files (created when needed).
            key: Names the reference set instead of hashing it (e.g. ``"coco2017-val-5k@512"``).
            batch_size: Images per forward pass.
            resolution: Side of the square images read from a folder.
        """
        ref_key = reference_key(source, key, resolution)
        net_key = module_fingerprint(_unwrap(feature_net))
        path = cls.cache_path(cache_dir, ref_key, net_key)
        if path.is_file():
            return cls.load(path)
        reference = cls.compute(
            source,
            feature_net,
            batch_size=batch_size,
            resolution=resolution,
            reference_key=ref_key,
            feature_key=net_key,
        )
        reference.save(path)
        return reference

    @staticmethod
    def cache_path(cache_dir: str | Path, reference_key: str, feature_key: str) -> Path:
        """The cache file of a (reference set, feature net) pair."""
        return Path(cache_dir) / f"fid-reference-{reference_key[:16]}-{feature_key[:16]}.safetensors"

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": CACHE_FORMAT,
            "count": str(self.count),
            "reference_key": self.reference_key,
            "feature_key": self.feature_key,
        }
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> FIDReference:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                mean, cov = file.get_tensor("mean"), file.get_tensor("cov")
        except Exception as err:  # safetensors raises its own error types for bad files
            raise UserError(
                f"cannot read FID reference statistics {path} ({err}); delete the file to recompute"
            ) from None
        if metadata.get("format") != CACHE_FORMAT:
            raise UserError(f"{path} is not an FID reference file of format {CACHE_FORMAT}; delete it to recompute")
        count = int(metadata["count"])
        return cls(mean, cov, count, metadata.get("reference_key", ""), metadata.get("feature_key", ""))


def _unwrap(net: nn.Module) -> nn.Module:
    return net.net if isinstance(net, FeatureNet) else net


class FID(FrechetInceptionDistance):
    """FID (torchmetrics' ``FrechetInceptionDistance``) on any feature network, against cached reference statistics.

    Generated images go in with ``update(images)``. With a ``reference`` the real statistics are fixed (every rank
    holds the same copy, outside the synchronised state, so DDP sums only the generated features); without one, real
    images go in with ``update(images, real=True)`` as in torchmetrics. States are sums, reduced by sum under DDP.

    Args:
        features: The feature network: :func:`inception_features` for the standard FID, or any module mapping a
            batch to ``(B, D)`` features (it is frozen and kept in eval mode).
        num_features: D, when ``features`` has no ``num_features`` attribute.
        reference: Statistics from :meth:`FIDReference.load_or_compute` with the same network.
        kwargs: Passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        features: nn.Module,
        *,
        num_features: int | None = None,
        reference: FIDReference | None = None,
        **kwargs,
    ):
        net = features if isinstance(features, FeatureNet) else FeatureNet(features, num_features)
        super().__init__(feature=net, normalize=True, **kwargs)
        self.register_buffer("reference_mean", None, persistent=False)
        self.register_buffer("reference_cov", None, persistent=False)
        if reference is not None:
            self.set_reference(reference)

    @property
    def has_reference(self) -> bool:
        """Whether fixed reference statistics replace the real images."""
        return self.reference_mean is not None

    def set_reference(self, reference: FIDReference, check_network: bool = True) -> None:
        """Use fixed reference statistics for the real side.

        Args:
            reference: Statistics of the real images.
            check_network: Refuse statistics whose ``feature_key`` is not this metric's network (one hash of its
                weights); a reference without a key is always accepted.
        """
        if reference.mean.numel() != self.inception.num_features:
            raise UserError(
                f"FID reference has {reference.mean.numel()} features, the network gives {self.inception.num_features}"
            )
        if check_network and reference.feature_key and reference.feature_key != module_fingerprint(self.inception.net):
            raise UserError("FID reference statistics were computed with another feature network; recompute them")
        device = self.fake_features_sum.device
        self.reference_mean = reference.mean.to(device, torch.float64)
        self.reference_cov = reference.cov.to(device, torch.float64)

    def update(self, imgs: torch.Tensor, real: bool = False) -> None:
        """Add a batch of generated images (or real ones, when there is no fixed reference)."""
        if real and self.has_reference:
            raise UserError("this FID has fixed reference statistics: update it with generated images only")
        super().update(imgs, real)

    def compute(self) -> torch.Tensor:
        """FID between the real (or reference) and the generated statistics, a float32 scalar."""
        if not self.has_reference:
            return super().compute().float()
        count = self.fake_features_num_samples
        if count < 2:
            raise RuntimeError("FID needs at least 2 generated images")
        mean = self.fake_features_sum / count
        cov = (self.fake_features_cov_sum - count * torch.outer(mean, mean)) / (count - 1)
        return _compute_fid(self.reference_mean, self.reference_cov, mean, cov).float()


class RandomFeatures(nn.Module):
    """A fixed, seeded random conv network as an FID feature extractor, for tiny settings and smoke tests.

    It checks the FID plumbing (sampling, decoding, reference cache, logging) where no trained feature network is
    available; its numbers say little about image quality. Use InceptionV3 weights (``inception_features``) or a
    classifier trained on the data (the digits demo) for real measurements.

    Args:
        channels: Image channels.
        num_features: Feature size.
        seed: Seed of the weights (part of the reference cache key through the weights).
    """

    def __init__(self, channels: int = 3, num_features: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d(channels, num_features, kernel_size=3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (channels * 9) ** 0.5)
            conv.bias.zero_()
        self.conv = conv.requires_grad_(False)
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, num_features)``: mean-pooled ReLU responses."""
        return torch.relu(self.conv(images.float())).mean(dim=(2, 3))
