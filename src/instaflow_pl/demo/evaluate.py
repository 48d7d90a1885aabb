"""Measuring the demo's models: FID on classifier features, prompt accuracy, straightness, speed, distillation loss.

Every model is sampled from the same noises (paired across models), ``samples_per_prompt`` per digit prompt, once
per evaluation seed; FID is taken against the 397 held-out digits, which neither the models nor the classifier saw.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.data.digits import DIGIT_PROMPTS, Digits, load_digits
from instaflow_pl.demo.classifier import DigitClassifier
from instaflow_pl.errors import UserError
from instaflow_pl.metrics import FID, FeatureNet, FIDReference, straightness
from instaflow_pl.modules.losses import l2_distance
from instaflow_pl.solver import ODESolution
from instaflow_pl.teachers import Teacher, load_teacher

EVAL_SEED = 2_000_000_000
"""Base seed of the evaluation noises: seed ``s`` uses ``EVAL_SEED + s * 1_000_000 + i`` for sample i."""


@dataclass
class EvalSettings:
    """What the report measures.

    Attributes:
        samples_per_prompt: Generated digits per prompt and seed (10 prompts).
        seeds: Evaluation-noise seeds; FID is reported as mean and spread over them.
        steps: Euler step counts of the flows (1-RF, 2-RF).
        guidance: Guidance weights of the flows (1: none).
        straightness_steps: Euler steps of the trajectories S is measured on.
        distill_val_pairs: Held-out pairs the distillation loss is measured on (at most).
    """

    samples_per_prompt: int = 100
    seeds: int = 3
    steps: tuple[int, ...] = (1, 2, 4, 25)
    guidance: tuple[float, ...] = (1.0, 1.5)
    straightness_steps: int = 25
    distill_val_pairs: int = 1000

    def __post_init__(self):
        self.steps = tuple(int(s) for s in self.steps)
        self.guidance = tuple(float(w) for w in self.guidance)
        if 1 not in self.steps or min(self.steps) < 1:
            raise UserError(f"evaluation steps must be >= 1 and include 1 (the one-step findings), got {self.steps}")
        if 1.0 not in self.guidance:
            raise UserError(f"evaluation guidance must include 1 (no guidance), got {self.guidance}")
        if self.samples_per_prompt < 1 or self.seeds < 1:
            raise UserError("evaluation needs samples_per_prompt >= 1 and seeds >= 1")


@dataclass
class Row:
    """One model at one setting, measured.

    Attributes:
        model: Display name (``1-RF``, ``2-RF``, ``student (2-RF)`` ...).
        folder: The model folder.
        steps: Euler steps.
        guidance: Guidance weight.
        budget: Distillation steps (students only).
        fid: FID for each evaluation seed.
        accuracy: Prompt accuracy for each seed.
        ms_per_image: Generation time per image (batch of all samples, this machine).
        straightness: S of the model's flow at this guidance (flows only).
        distill_loss: Mean l2 to the teacher's held-out pairs (students and their starting points).
    """

    model: str
    folder: str
    steps: int
    guidance: float
    budget: int | None = None
    fid: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    ms_per_image: float = 0.0
    straightness: float | None = None
    distill_loss: float | None = None

    @property
    def fid_mean(self) -> float:
        """Mean FID over seeds."""
        return sum(self.fid) / len(self.fid)

    @property
    def fid_std(self) -> float:
        """Sample standard deviation of FID over seeds (0 for one seed)."""
        return float(torch.tensor(self.fid).std()) if len(self.fid) > 1 else 0.0

    @property
    def accuracy_mean(self) -> float:
        """Mean prompt accuracy over seeds."""
        return sum(self.accuracy) / len(self.accuracy)

    def to_json(self) -> dict:
        """The row with its summary statistics."""
        return {**asdict(self), "fid_mean": self.fid_mean, "fid_std": self.fid_std, "accuracy_mean": self.accuracy_mean}


@dataclass
class Coverage:
    """The modes of a prompt-conditioned model as the classifier sees them, over every seed's samples.

    The prompts ask for each digit equally often, so a model that covers every digit as asked gives each one a 10%
    share of the classifier's readings. Within a digit, ``spread`` compares the samples' variety with real digits'.

    Attributes:
        model: Display name.
        steps: Euler steps.
        guidance: Guidance weight.
        shares: Per digit 0-9, the share of all samples (every prompt) the classifier reads as that digit.
        accuracy: Per digit, the share of that digit's prompt's samples read as that digit.
        spread: Per digit, ``sqrt(trace(cov))`` of the classifier features of that prompt's samples over the same of
            the held-out digits of that class (1: as varied as real digits; 0: one image per prompt).
    """

    model: str
    steps: int
    guidance: float
    shares: list[float]
    accuracy: list[float]
    spread: list[float]

    def to_json(self) -> dict:
        """The fields as plain types."""
        return asdict(self)


def _feature_spread(features: torch.Tensor) -> float:
    """``sqrt(trace(cov))`` of (N, D) features (0 for fewer than two)."""
    return float(features.var(dim=0).sum().sqrt()) if len(features) > 1 else 0.0


def eval_noise(seed: int, count: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The noises, prompts and labels of evaluation seed ``seed``: sample i asks for digit ``i % 10``."""
    x0 = noise_for_indices(EVAL_SEED + seed * 1_000_000, range(count), (1, 8, 8))
    labels = torch.arange(count) % 10
    return x0, [DIGIT_PROMPTS[int(d)] for d in labels], labels


class Evaluator:
    """Measures models against the held-out digits with the demo's classifier.

    Args:
        classifier: The trained digit classifier.
        settings: What to measure.
    """

    def __init__(self, classifier: DigitClassifier, settings: EvalSettings):
        self.classifier = classifier
        self.settings = settings
        self.features = FeatureNet(classifier.features, classifier.num_features)
        self.reference = FIDReference.compute(load_digits("heldout").images, self.features)
        self.count = 10 * settings.samples_per_prompt
        self.noises = [eval_noise(s, self.count) for s in range(settings.seeds)]

    def fid(self, images: torch.Tensor) -> float:
        """FID of ``images`` (clamped to the pixel range) against the held-out digits."""
        metric = FID(self.features, reference=self.reference)
        metric.update(images.clamp(-1, 1))
        return float(metric.compute())

    def floor(self) -> float:
        """FID of as many real training digits as the models generate (at most 1400): a sense of scale.

        The classifier was trained on these digits, so this is a little optimistic as a floor.
        """
        train = load_digits("train")
        return self.fid(train.images[: self.count])

    def classifier_accuracy(self) -> float:
        """The classifier's accuracy on the held-out digits."""
        held = load_digits("heldout")
        return float((self.classifier.predict(held.images) == held.labels).float().mean())

    def measure(self, row: Row, teacher: Teacher) -> Row:
        """Sample every seed's noises and fill in FID, accuracy and speed."""
        solver = at_steps(teacher, row.steps)
        with torch.no_grad():  # warm-up (first-call allocations), not timed
            solver.sample(self.noises[0][0][:10], self.noises[0][1][:10], row.guidance)
        elapsed = 0.0
        for x0, prompts, labels in self.noises:
            start = time.perf_counter()
            with torch.no_grad():
                images = solver.sample(x0, prompts, row.guidance).x
            elapsed += time.perf_counter() - start
            row.fid.append(self.fid(images))
            row.accuracy.append(float((self.classifier.predict(images.clamp(-1, 1)) == labels).float().mean()))
        row.ms_per_image = 1000 * elapsed / (len(self.noises) * self.count)
        return row

    def coverage(self, model: str, teacher: Teacher, steps: int, guidance: float) -> Coverage:
        """Per-digit shares, accuracy and feature spread of the samples :meth:`measure` draws (the same noises)."""
        solver = at_steps(teacher, steps)
        predicted, asked, features = [], [], []
        for x0, prompts, labels in self.noises:
            with torch.no_grad():
                images = solver.sample(x0, prompts, guidance).x.clamp(-1, 1)
                features.append(self.features(images))
            predicted.append(self.classifier.predict(images))
            asked.append(labels)
        predicted, asked, features = torch.cat(predicted), torch.cat(asked), torch.cat(features)
        held = load_digits("heldout")
        with torch.no_grad():
            real = self.features(held.images)
        shares = [float((predicted == d).float().mean()) for d in range(10)]
        accuracy = [float((predicted[asked == d] == d).float().mean()) for d in range(10)]
        spread = [_feature_spread(features[asked == d]) / _feature_spread(real[held.labels == d]) for d in range(10)]
        return Coverage(model, steps, guidance, shares, accuracy, spread)

    def trajectory(self, teacher: Teacher, guidance: float, count: int | None = None) -> ODESolution:
        """The flow's Euler trajectory on the first seed's noises (``count`` of them)."""
        x0, prompts, _ = self.noises[0]
        count = count or len(prompts)
        solver = at_steps(teacher, self.settings.straightness_steps)
        with torch.no_grad():
            return solver.sample(x0[:count], prompts[:count], guidance, return_trajectory=True)

    def straightness(self, teacher: Teacher, guidance: float) -> float:
        """S of the flow at ``guidance`` (0 = straight), on the first seed's noises."""
        return float(straightness(self.trajectory(teacher, guidance)).mean())

    def samples(self, teacher: Teacher, steps: int, guidance: float, count: int = 10) -> torch.Tensor:
        """The first ``count`` samples of the first seed (one per prompt for count = 10), for the grid."""
        x0, prompts, _ = self.noises[0]
        with torch.no_grad():
            return at_steps(teacher, steps).sample(x0[:count], prompts[:count], guidance).x.clamp(-1, 1)


def distill_loss(teacher: Teacher, pairs: Path, limit: int, val_fraction: float) -> float:
    """Mean l2 between a one-step model's output and held-out pairs' X1 (the distillation loss on unseen pairs).

    The held-out pairs are the ``val_fraction`` split the distillation config validates on (never trained on).
    """
    from instaflow_pl.data import TriplesDataModule

    if val_fraction <= 0:
        raise UserError("the distillation config holds out no pairs (data.val_fraction: 0); the report needs some")
    data = TriplesDataModule(str(pairs), batch_size=500, val_fraction=val_fraction)
    data.setup("fit")
    total, count = 0.0, 0
    one_step = teacher.with_steps(1)
    for batch in data.val_dataloader():
        with torch.no_grad():
            out = one_step.sample(batch.x0, batch.prompts, 1.0).x
        total += float(l2_distance(out, batch.x1).sum())
        count += len(batch)
        if count >= limit:
            break
    return total / max(count, 1)


def at_steps(teacher: Teacher, steps: int) -> Teacher:
    """``teacher`` solved in ``steps`` Euler steps: a piecewise flow (``windows`` K > 1) on its piecewise grid when
    ``steps >= K``, and below K (which its sampler refuses) on the uniform grid ``k / steps``, one step crossing
    windows; any other flow as :meth:`Teacher.with_steps` gives it."""
    if steps >= teacher.windows:
        return teacher.with_steps(steps)
    import copy

    uniform = copy.copy(teacher)
    uniform.windows = 1
    return uniform.with_steps(steps)


def load_flow(folder: Path) -> Teacher:
    """A demo model folder as a velocity teacher (Euler; :meth:`Teacher.with_steps` or :func:`at_steps` sets the step
    count), loaded at one step per window (one step for a flow without windows)."""
    from instaflow_pl.model_folder import ModelFolder

    opened = ModelFolder.open(folder)
    return load_teacher(opened, solver="euler", steps=int(opened.info.get("windows", 1)))


def digits_for_grid() -> Digits:
    """One real held-out digit per class (the grid's top row)."""
    held = load_digits("heldout")
    firsts = [int((held.labels == d).nonzero()[0]) for d in range(10)]
    return Digits(held.images[firsts], held.labels[firsts])
