"""The demo's digit classifier: FID features (its penultimate layer) and prompt accuracy (its prediction).

It plays the parts Inception and CLIP play for Stable Diffusion. It is trained by the project on the 1400 training
digits only, so FID against the 397 held-out digits never sees them in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from instaflow_pl.data.digits import Digits
from instaflow_pl.errors import UserError

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


class DigitClassifier(nn.Module):
    """An MLP on 8x8 digits in [-1, 1]: ``features`` (B, num_features), then a linear layer to 10 logits.

    Args:
        width: Width of the hidden layer.
        num_features: Size of the feature layer (the FID features).
    """

    def __init__(self, width: int = 256, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Linear(width, num_features), nn.SiLU()
        )
        self.head = nn.Linear(num_features, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Predicted classes (B,)."""
        return torch.cat([self(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A little pixel noise, so the features do not hinge on exact pixel values (generated digits are not exact)."""
    return images + 0.05 * torch.randn(images.shape, generator=generator)


def train_classifier(
    train: Digits, epochs: int = 60, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``train`` (a few seconds on a CPU); returned in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for index in order.split(batch_size):
            images = _augment(train.images[index], generator)
            loss = nn.functional.cross_entropy(model(images), train.labels[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: DigitClassifier, digits: Digits) -> float:
    """Fraction of ``digits`` classified as their label."""
    return float((model.predict(digits.images) == digits.labels).float().mean())


def save_classifier(model: DigitClassifier, folder: str | Path, **info: object) -> Path:
    """Write the weights (safetensors) and a JSON record (sizes and ``info``) to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    width = model.features[1].out_features
    config = {"width": width, "num_features": model.num_features, **info}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path) -> DigitClassifier:
    """Read a classifier written by :func:`save_classifier` (safetensors: no code runs on load)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise UserError(
            f"no digit classifier in {folder}; run the demo's setup stage (instaflow-pl demo --stage setup)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = DigitClassifier(config["width"], config["num_features"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval()
