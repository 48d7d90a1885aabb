"""The reference (real) images of an evaluation: a folder read once into cached FID statistics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from instaflow_pl.errors import UserError
from instaflow_pl.metrics import FIDReference
from instaflow_pl.metrics.fingerprint import IMAGE_SUFFIXES, folder_fingerprint, image_files


class ReferenceImages:
    """A folder of real images (e.g. COCO val2017), brought to one square size for the FID feature network.

    Each image is converted to RGB, its shorter side resized to ``resolution`` (bicubic, antialiased, as PIL does)
    and its centre cropped to a square; with ``center_crop=False`` it is resized straight to ``resolution`` x
    ``resolution``. The feature network then takes it as generated images are taken (InceptionV3: uint8, resized to
    299 x 299 inside the network, torch-fidelity's convention).

    Args:
        folder: The folder (searched recursively for .png, .jpg, .jpeg, .webp, .bmp files, in sorted order).
        resolution: Side of the square images.
        center_crop: Crop the centre after resizing the shorter side (else squash to a square).
        batch_size: Images per feature-network call.
    """

    def __init__(self, folder: str | Path, resolution: int = 512, center_crop: bool = True, batch_size: int = 32):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise UserError(
                f"reference folder {self.folder} not found; point reference_folder at real images (COCO val)"
            )
        self.files = image_files(self.folder)
        if len(self.files) < 2:
            raise UserError(
                f"reference folder {self.folder} holds {len(self.files)} images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "FID needs at least 2: point reference_folder at the real images (e.g. COCO val2017)"
            )
        self.resolution = resolution
        self.center_crop = center_crop
        self.batch_size = batch_size
        self.key = folder_fingerprint(self.folder, extra=f"resolution={resolution}|center_crop={center_crop}|bicubic")

    def convention(self, feature_net: nn.Module) -> str:
        """How the images reach ``feature_net``, in words (for the report)."""
        from instaflow_pl.metrics import InceptionFeatures

        how = (
            f"shorter side resized (bicubic) to {self.resolution} and centre-cropped"
            if self.center_crop
            else f"resized (bicubic) to {self.resolution} x {self.resolution}"
        )
        if isinstance(feature_net, InceptionFeatures):
            net = "torch-fidelity style: uint8 images, InceptionV3 resizes them to 299 x 299"
        else:
            net = f"features of {type(feature_net).__name__} on images in [-1, 1], not Inception: not comparable to FID"
        return f"reference images {how}; {net}"

    def _transform(self):
        from torchvision import transforms

        bicubic = transforms.InterpolationMode.BICUBIC
        size = self.resolution
        steps = (
            [transforms.Resize(size, bicubic), transforms.CenterCrop(size)]
            if self.center_crop
            else [transforms.Resize((size, size), bicubic)]
        )
        return transforms.Compose([*steps, transforms.PILToTensor()])

    def batches(self) -> Iterator[torch.Tensor]:
        """The images in [-1, 1], (B, 3, resolution, resolution), in file order, with a progress bar."""
        from PIL import Image

        transform = self._transform()
        with tqdm(total=len(self.files), desc="reference", unit="image", dynamic_ncols=True) as bar:
            for start in range(0, len(self.files), self.batch_size):
                images = []
                for path in self.files[start : start + self.batch_size]:
                    try:
                        with Image.open(path) as image:
                            images.append(transform(image.convert("RGB")))
                    except OSError as err:
                        raise UserError(f"cannot read reference image {path} ({err}); fix or remove it") from None
                bar.update(len(images))
                yield torch.stack(images).float() / 127.5 - 1.0

    def statistics(self, feature_net: nn.Module, cache_dir: str | Path) -> FIDReference:
        """FID statistics of the folder under ``feature_net``: read from the cache, or computed once and cached."""
        return FIDReference.load_or_compute(
            self.batches(), feature_net, cache_dir, key=self.key, batch_size=self.batch_size
        )
