"""The embedded dataset: scikit-learn's handwritten digits (1797 grey 8x8 images) with text prompts.

Images are scaled from 0..16 to [-1, 1] and kept as (1, 8, 8) tensors: the demo works in pixel space (no VAE), so
the latent is the image. Sample ``i`` has the prompt ``"a handwritten digit <word>"`` of its label.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import setup_on_every_rank

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT = 397
"""Digits held out from training (FID reference and validation); the other 1400 train."""
SPLIT_SEED = 0


def digit_prompt(label: int) -> str:
    """The prompt of a digit class, e.g. ``a handwritten digit seven``."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


DIGIT_PROMPTS = tuple(digit_prompt(d) for d in range(10))


def prompt_label(prompt: str) -> int:
    """The digit class a prompt asks for (the inverse of :func:`digit_prompt`)."""
    try:
        return DIGIT_PROMPTS.index(prompt)
    except ValueError:
        raise UserError(f"{prompt!r} is not a digit prompt; expected e.g. {DIGIT_PROMPTS[7]!r}") from None


@dataclass
class Digits:
    """Digit images and labels.

    Attributes:
        images: (N, 1, 8, 8) in [-1, 1], float32.
        labels: (N,) class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def prompts(self) -> list[str]:
        """The prompt of each image."""
        return [DIGIT_PROMPTS[int(label)] for label in self.labels]


def load_digits(split: str = "train") -> Digits:
    """scikit-learn's digits: ``train`` (1400), ``heldout`` (397, fixed by a seeded permutation) or ``all``."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("train", "heldout", "all"):
        raise UserError(f"unknown digits split {split!r}: choose train, heldout or all")
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    if split == "heldout":
        order = order[:HELD_OUT]
    elif split == "train":
        order = order[HELD_OUT:]
    return Digits(images[order], labels[order])


class DigitsDataset(Dataset):
    """Digits as a map-style dataset that fetches whole batches at once (``__getitems__``), ``repeats`` times over."""

    def __init__(self, digits: Digits, repeats: int = 1):
        self.digits = digits
        self.prompts = digits.prompts
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.digits) * self.repeats

    def __getitems__(self, indices: list[int]) -> TripleBatch:
        """A batch of images with their prompts; X0 is left to the module (fresh noise for a 1-RF)."""
        index = torch.tensor(indices) % len(self.digits)
        return TripleBatch(None, self.digits.images[index], [self.prompts[i] for i in index.tolist()], index)

    def __getitem__(self, index: int) -> TripleBatch:
        return self.__getitems__([index])


def _keep_batch(batch: TripleBatch) -> TripleBatch:
    return batch


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits with prompts, for training a 1-rectified flow from data (the demo's first stage).

    Batches are :class:`TripleBatch` with ``x0=None``: the ReflowModule draws fresh noise (independent coupling).
    Validation uses the held-out digits, whose noises follow the seed rule, so every validation sees the same ones.

    Args:
        batch_size: Images per batch.
        repeats: Passes over the 1400 training digits per epoch (fewer, longer epochs).
        val_size: Held-out digits used for validation (at most 397).
        num_workers: DataLoader workers (0 is fastest for in-memory data).
        seed: Seed of the shuffle.
    """

    def __init__(
        self, batch_size: int = 256, repeats: int = 10, val_size: int = 256, num_workers: int = 0, seed: int = 0
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if repeats < 1:
            raise UserError(f"data.repeats must be >= 1, got {repeats}")
        if not 0 <= val_size <= HELD_OUT:
            raise UserError(f"data.val_size must be in [0, {HELD_OUT}], got {val_size}")
        self.batch_size = batch_size
        self.repeats = repeats
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self._train: DigitsDataset | None = None
        self._val: DigitsDataset | None = None

    @setup_on_every_rank
    def setup(self, stage: str | None = None) -> None:
        """Load the digits (a few milliseconds)."""
        if self._train is None:
            self._train = DigitsDataset(load_digits("train"), self.repeats)
            heldout = load_digits("heldout")
            self._val = DigitsDataset(Digits(heldout.images[: self.val_size], heldout.labels[: self.val_size]))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training digits."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self._train, self.batch_size, shuffle=True, num_workers=self.num_workers, collate_fn=_keep_batch,
            generator=generator, drop_last=True,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        """Held-out digits in a fixed order."""
        if not self.val_size:
            return []
        return DataLoader(self._val, self.batch_size, num_workers=self.num_workers, collate_fn=_keep_batch)
