"""Metrics: straightness against analytic flows, FID and its reference cache, CLIP score on a tiny CLIP folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.metrics import (
    FID,
    INCEPTION_WEIGHTS_FILE,
    CLIPScore,
    FIDReference,
    StraightnessMetric,
    inception_features,
)
from instaflow_pl.solver import LatentODE

# ---------------------------------------------------------------------------------------------------------------------
# Straightness


def constant_field(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """A straight flow: every sample moves with its own constant velocity."""
    return torch.linspace(-1.0, 2.0, x[0].numel()).view_as(x[0]).expand_as(x).clone()


OMEGA = math.pi / 2


def rotation_field(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """dx/dt = OMEGA J x (rotation at constant angular speed): the exact flow is x(t) = R(OMEGA t) x0."""
    return OMEGA * torch.stack([-x[:, 1], x[:, 0]], dim=1)


def rotation_gap(t: torch.Tensor, w: float = OMEGA) -> torch.Tensor:
    """``|chord - v(t)|^2 / |x0|^2`` for the exact rotation flow, in closed form.

    With x0 as a complex number z: chord = (e^{iw} - 1) z and v(t) = i w e^{iwt} z, so the gap is
    ``|e^{iw} - 1 - i w e^{iwt}|^2 = 2 - 2 cos w + w^2 - 2 w (sin(w t) - sin(w (t - 1)))``; its integral over [0, 1]
    is ``w^2 - 2 + 2 cos w``.
    """
    return 2 - 2 * math.cos(w) + w * w - 2 * w * (torch.sin(w * t) - torch.sin(w * (t - 1)))


def solve(field, x0: torch.Tensor, steps: int = 8, grid: list[float] | None = None):
    return LatentODE("euler", steps, time_grid=grid).solve(field, x0, return_trajectory=True)


def test_straightness_is_zero_for_a_straight_flow():
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    metric = StraightnessMetric(steps=8)
    metric.update(solve(constant_field, x0))
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-10)
    assert metric.profile().values.abs().max().item() < 1e-10


def test_straightness_of_a_rotation_matches_the_closed_form():
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 1000
    metric = StraightnessMetric(steps=steps)
    metric.update(solve(rotation_field, x0, steps))
    # S averages the squared gap over the 2 elements: per sample |x0|^2 / 2 * (w^2 - 2 + 2 cos w).
    half_norm = (x0.pow(2).sum(dim=1) / 2).mean().item()
    expected = half_norm * (OMEGA**2 - 2 + 2 * math.cos(OMEGA))
    assert expected > 0.4
    assert metric.compute().item() == pytest.approx(expected, rel=1e-2)
    # The profile shows where the flow bends: the closed-form gap at each step's start time.
    profile = metric.profile()
    closed_form = half_norm * rotation_gap(profile.times.double())
    assert torch.allclose(profile.values.double(), closed_form, atol=2e-2 * closed_form.max().item())


def test_straightness_profile_has_one_value_per_step_and_integrates_to_s():
    grid = [0.0, 0.1, 0.3, 0.6, 1.0]
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    metric = StraightnessMetric(time_grid=grid)
    metric.update(solve(rotation_field, x0, grid=grid))
    profile = metric.profile()
    assert profile.values.shape == profile.times.shape == profile.dt.shape == (4,)
    assert torch.allclose(profile.times, torch.tensor(grid[:-1]))
    assert (profile.values > 0).all()
    assert (profile.dt * profile.values).sum().item() == pytest.approx(metric.compute().item(), rel=1e-5)


def test_straightness_merges_updates_and_ranks_like_one_batch():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 2, generator=gen), torch.randn(5, 2, generator=gen) * 3
    whole = StraightnessMetric(steps=6)
    whole.update(solve(rotation_field, torch.cat([a, b]), 6))
    two_updates = StraightnessMetric(steps=6)
    two_updates.update(solve(rotation_field, a, 6))
    two_updates.update(solve(rotation_field, b, 6))
    rank0, rank1 = StraightnessMetric(steps=6), StraightnessMetric(steps=6)
    rank0.update(solve(rotation_field, a, 6))
    rank1.update(solve(rotation_field, b, 6))
    rank0.merge_state(rank1)  # the same sum reduction DDP applies
    for merged in (two_updates, rank0):
        assert merged.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)
        assert torch.allclose(merged.profile().values, whole.profile().values, rtol=1e-6)


def test_straightness_refuses_another_grid():
    metric = StraightnessMetric(steps=4)
    with pytest.raises(ValueError, match="time grid|times"):
        metric.update(solve(rotation_field, torch.ones(2, 2), 5))


# ---------------------------------------------------------------------------------------------------------------------
# FID


class CountingNet(nn.Module):
    """A fixed random conv net with 16 features that counts its forward calls."""

    num_features = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


def image_set(count: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fid_is_zero_against_itself_and_grows_with_noise():
    net, images = CountingNet(), image_set()
    reference = FIDReference.compute(images, net)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    scale = reference.cov.trace().item()
    with_reference, with_real_images = [], []
    for std in (0.0, 0.1, 0.2, 0.4, 0.8):
        fid = FID(net, reference=reference)
        fid.update(images + std * noise)
        with_reference.append(fid.compute().item())
        plain = FID(net)  # torchmetrics' own path: real images through update(real=True)
        plain.update(images, real=True)
        plain.update(images + std * noise)
        with_real_images.append(plain.compute().item())
    assert abs(with_reference[0]) < 1e-9 * scale and abs(with_real_images[0]) < 1e-9 * scale
    assert all(b > a for a, b in zip(with_reference, with_reference[1:], strict=False)), with_reference
    assert with_reference[1] > 1e-6 * scale
    assert with_reference == pytest.approx(with_real_images, rel=1e-4, abs=1e-9 * scale)


def test_fid_with_reference_refuses_real_images_and_another_network():
    net = CountingNet()
    reference = FIDReference.compute(image_set(20), net, feature_key="not-this-net")
    fid = FID(net, reference=FIDReference.compute(image_set(20), net))
    with pytest.raises(UserError, match="generated images only"):
        fid.update(image_set(4), real=True)
    with pytest.raises(UserError, match="another feature network"):
        FID(net, reference=reference)


def test_fid_inception_weights_missing_is_one_clear_line(tmp_path):
    missing = tmp_path / "models" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(UserError) as info:
        inception_features(missing)
    message = str(info.value)
    assert str(missing) in message and "put the file there" in message and "\n" not in message


def test_fid_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    """The real Inception path, with random weights written to a local file (torch-fidelity must be installed)."""
    inception_module = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    extractor = inception_module.FeatureExtractorInceptionV3
    with monkeypatch.context() as patch:  # build random weights once, without their download
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(extractor, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        weights = extractor("inception-v3-compat", ["64"]).state_dict()
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(weights, path)
    net = inception_features(path, feature_dim=64)
    images = image_set(6)
    reference = FIDReference.load_or_compute(images, net, tmp_path / "cache")
    fid = FID(net, reference=reference)
    fid.update(images)
    assert reference.mean.shape == (64,)
    assert abs(fid.compute().item()) < 1e-6 * max(reference.cov.trace().item(), 1.0)


def test_inception_features_round_to_uint8_and_key_the_cache_by_it(inception_weights, monkeypatch):
    """Images reach Inception as diffusers saves them, ``(x * 255).round()``: a reference PNG's bytes read into
    [-1, 1] come back exactly (truncation lost one level on some), and the conversion is part of the cache key."""
    from instaflow_pl.metrics import module_fingerprint
    from instaflow_pl.metrics.fid import InceptionFeatures

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.seen.append(images)
            return torch.zeros(images.shape[0], 64)

    net = inception_features(inception_weights, feature_dim=64)
    rounding = module_fingerprint(net)
    with monkeypatch.context() as patch:
        patch.setattr(InceptionFeatures, "fingerprint_tag", "")
        assert module_fingerprint(net) != rounding, "statistics cached under another conversion must not be reused"
    net.inception = recorder = Recorder()
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    net(levels.float() / 127.5 - 1.0)  # as ReferenceImages reads a PNG
    assert recorder.seen[0].dtype == torch.uint8 and torch.equal(recorder.seen[0], levels)
    net(torch.full((1, 3, 4, 4), 1 / 255 - 1 + 1e-4))  # just above half a level (0.5 / 255 in [0, 1]): rounds up
    assert recorder.seen[1].unique().tolist() == [1]


def test_reference_statistics_are_cached_and_keyed_by_data_and_network(tmp_path):
    net, images = CountingNet(), image_set(40)
    first = FIDReference.load_or_compute(images, net, tmp_path, batch_size=16)
    assert net.calls == 3
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    second = FIDReference.load_or_compute(images, net, tmp_path, batch_size=16)
    assert net.calls == 3  # read from the file: the network did not run again
    assert torch.equal(first.mean, second.mean) and torch.equal(first.cov, second.cov)
    assert second.count == 40 and second.reference_key == first.reference_key

    other_images = images.clone()
    other_images[0, 0, 0, 0] += 0.5
    FIDReference.load_or_compute(other_images, net, tmp_path)
    FIDReference.load_or_compute(images, CountingNet(seed=1), tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # another set, another net: each its own file

    # The cached reference is usable as is by FID with the same net.
    fid = FID(net, reference=second)
    fid.update(images)
    assert abs(fid.compute().item()) < 1e-9 * second.cov.trace().item()


def test_reference_from_a_folder_is_keyed_by_its_listing(tmp_path):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    net = CountingNet()
    cache = tmp_path / "cache"
    reference = FIDReference.load_or_compute(folder, net, cache, resolution=16)
    assert reference.count == 4
    Image.fromarray(pixels).save(folder / "4.png")
    FIDReference.load_or_compute(folder, net, cache, resolution=16)
    assert len(list(cache.glob("*.safetensors"))) == 2
    with pytest.raises(UserError, match="key="):
        FIDReference.load_or_compute(iter([image_set(4)]), net, cache)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: half of the generated images and of the flows; every rank holds the same FID reference."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net, images = CountingNet(), image_set()
    fid = FID(net, reference=FIDReference.compute(images, net))
    fid.update(noisy_images(images)[rank::world])
    straight = StraightnessMetric(steps=6)
    straight.update(solve(rotation_field, ddp_starts()[rank::world], 6))
    result = {"fid": fid.compute(), "s": straight.compute(), "profile": straight.profile().values}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()  # leave together: a rank exiting mid-teardown makes gloo abort the other
    dist.destroy_process_group()


def noisy_images(images: torch.Tensor) -> torch.Tensor:
    return images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))


def ddp_starts() -> torch.Tensor:
    return torch.randn(8, 2, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 9).view(-1, 1)


def test_metrics_reduce_across_two_ddp_ranks_like_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    net, images = CountingNet(), image_set()
    fid = FID(net, reference=FIDReference.compute(images, net))
    fid.update(noisy_images(images))
    straight = StraightnessMetric(steps=6)
    straight.update(solve(rotation_field, ddp_starts(), 6))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["fid"].item() == pytest.approx(fid.compute().item(), rel=1e-6)
        assert result["s"].item() == pytest.approx(straight.compute().item(), rel=1e-6)
        assert torch.allclose(result["profile"], straight.profile().values, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from instaflow_pl.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


PROMPTS_A = ["a photo of a cat", "a red car in the city", "a small bird sitting on a tree", "a drawing of a house"]
PROMPTS_B = ["a painting of a horse by the river", "a blue sea", "an old man", "a green forest on a mountain"]


def test_clip_score_on_the_tiny_clip_folder(tiny_clip):
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metric = CLIPScore(tiny_clip)
    scores_a, scores_b = metric.scores(images, PROMPTS_A), metric.scores(images, PROMPTS_B)
    assert scores_a.shape == (4,) and ((scores_a >= 0) & (scores_a <= 100)).all() and (scores_a > 0).any()
    assert not torch.allclose(scores_a, scores_b)
    metric.update(images[:2], PROMPTS_A[:2])
    metric.update(images[2:], PROMPTS_A[2:])
    assert 0.0 <= metric.compute().item() <= 100.0
    assert metric.compute().item() == pytest.approx(scores_a.mean().item(), rel=1e-5)
    again = CLIPScore(tiny_clip)
    again.update(images, PROMPTS_A)
    assert again.compute().item() == pytest.approx(metric.compute().item(), rel=1e-6)
    # The same images given in [0, 1] score the same with value_range=(0, 1).
    unit = CLIPScore(tiny_clip, value_range=(0.0, 1.0))
    assert torch.allclose(unit.scores((images + 1) / 2, PROMPTS_A), scores_a, atol=1e-4)


def test_clip_score_missing_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "clip-vit-large-patch14"
    with pytest.raises(UserError) as info:
        CLIPScore(missing)
    message = str(info.value)
    assert str(missing) in message and "save_pretrained" in message and "\n" not in message


def test_random_features_are_fixed_by_their_seed():
    from instaflow_pl.metrics import RandomFeatures

    images = torch.rand(4, 3, 16, 16) * 2 - 1
    a, b, c = RandomFeatures(seed=0), RandomFeatures(seed=0), RandomFeatures(seed=1)
    assert a(images).shape == (4, 64)
    assert torch.equal(a(images), b(images)) and not torch.equal(a(images), c(images))
