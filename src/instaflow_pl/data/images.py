"""Images + prompts for a 1-rectified flow trained from data (independent coupling: fresh noise per step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, random_split

from instaflow_pl.data.prompts import read_jsonl
from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import setup_on_every_rank

METADATA_FILE = "metadata.jsonl"


def read_metadata(folder: Path, image_column: str, prompt_column: str) -> list[tuple[Path, str]]:
    """(image path, prompt) rows of ``folder/metadata.jsonl`` (the Hugging Face imagefolder layout)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: an image folder needs {METADATA_FILE} with {image_column} and {prompt_column}"
        )
    rows = []
    for number, row in read_jsonl(path):
        if image_column not in row or prompt_column not in row:
            raise UserError(f"line {number} of {path} needs the fields {image_column!r} and {prompt_column!r}")
        image = folder / row[image_column]
        if not image.is_file():
            raise UserError(f"image {image} (line {number} of {path}) not found")
        rows.append((image, str(row[prompt_column])))
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows


class ImagePromptDataset(Dataset):
    """Images resized and centre-cropped to ``resolution``, as tensors in [-1, 1], with their prompts."""

    def __init__(self, rows: list[tuple[Path, str]], resolution: int):
        from torchvision import transforms

        self.rows = rows
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, prompt = self.rows[index]
        try:
            with Image.open(path) as image:
                pixels = self.transform(image.convert("RGB"))
        except OSError as err:
            raise UserError(f"cannot read image {path} ({err}); fix or remove it from {METADATA_FILE}") from None
        return {"image": pixels, "prompt": prompt, "index": index}


def collate_images(items: list[dict[str, Any]]) -> TripleBatch:
    """A batch whose X1 are images and whose X0 is left to the module (fresh noise)."""
    return TripleBatch(
        x0=None,
        x1=torch.stack([it["image"] for it in items]),
        prompts=[it["prompt"] for it in items],
        index=torch.tensor([it["index"] for it in items]),
    )


class ImagePromptDataModule(L.LightningDataModule):
    """Image + prompt pairs from a folder with ``metadata.jsonl``, for training a 1-rectified flow from data.

    Batches are :class:`TripleBatch` with ``x0=None``: the ReflowModule draws fresh noise for each (the
    independent coupling of a 1-RF) and, with ``encode_images: true``, maps the images to VAE latents.

    Args:
        folder: The image folder.
        resolution: Images are resized and centre-cropped to this size.
        image_column: Field of ``metadata.jsonl`` holding the image file name.
        prompt_column: Field holding the prompt.
        batch_size: Images per batch.
        num_workers: DataLoader workers.
        val_fraction: Fraction held out for validation (fixed by ``seed``).
        seed: Seed of the split and the shuffle.
    """

    def __init__(
        self,
        folder: str,
        resolution: int = 512,
        image_column: str = "file_name",
        prompt_column: str = "text",
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.folder = Path(folder).expanduser()
        self.resolution = resolution
        self.columns = (image_column, prompt_column)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    @setup_on_every_rank
    def setup(self, stage: str | None = None) -> None:
        """Read the metadata and split it."""
        if self._train is not None:
            return
        dataset = ImagePromptDataset(read_metadata(self.folder, *self.columns), self.resolution)
        n_val = int(round(len(dataset) * self.val_fraction))
        if n_val:
            generator = torch.Generator().manual_seed(self.seed)
            self._train, self._val = random_split(dataset, [len(dataset) - n_val, n_val], generator=generator)
        else:
            self._train = dataset

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset, self.batch_size, shuffle=shuffle, num_workers=self.num_workers, collate_fn=collate_images,
            generator=generator,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Shuffled training images."""
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out images (empty when ``val_fraction`` is 0)."""
        return self._loader(self._val, shuffle=False) if self._val is not None else []
