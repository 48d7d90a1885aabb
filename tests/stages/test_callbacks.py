"""Drawing callbacks: grids, trajectories with the teacher's, loss by t; PNGs always, train mode restored."""

from __future__ import annotations

import lightning as L
import torch
from conftest import write_dataset
from PIL import Image

from instaflow_pl.callbacks import LossByT, SampleGrid, Trajectories
from instaflow_pl.callbacks.trajectories import gap_profile, project_2d
from instaflow_pl.data import TriplesDataModule
from instaflow_pl.modules import ReflowModule
from instaflow_pl.solver import LatentODE


def test_callbacks_draw_during_a_fit(tiny_sd, tmp_path):
    root = write_dataset(tmp_path / "d", count=32, shard_size=16)
    callbacks = [
        SampleGrid(prompts=["a cat", "a dog"], steps=[1, 2]),
        Trajectories(prompts=["a cat", "a dog"], steps=4, teacher=str(tiny_sd), teacher_solver="ddim", teacher_steps=4),
        LossByT(bins=4, every_n_steps=2),
    ]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
        num_sanity_val_steps=0,
    )  # fmt: skip
    module = ReflowModule(str(tiny_sd), ema_decay=0.9, val_steps=[1])
    trainer.fit(module, datamodule=TriplesDataModule(str(root), batch_size=8, val_fraction=0.25))
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    assert "val_samples_step0000002.png" in images and "val_trajectories_step0000002.png" in images
    assert {"train_loss_by_t_step0000002.png", "train_loss_by_t_step0000004.png"} <= set(images)
    grid = Image.open(tmp_path / "images" / "val_samples_step0000002.png")
    assert grid.size == (2 * 16, 2 * 16), "2 prompts x 2 step counts of 16x16 decoded images"
    assert module.training, "train mode restored after drawing"


def test_loss_by_t_bins():
    callback = LossByT(bins=2)
    callback._t = [torch.tensor([0.1, 0.2, 0.9])]
    callback._loss = [torch.tensor([1.0, 3.0, 10.0])]
    edges, means, counts = callback.binned()
    assert edges.tolist() == [0.0, 0.5, 1.0] and means.tolist() == [2.0, 10.0] and counts.tolist() == [2, 1]


def test_straightness_profile_and_projection():
    x0 = torch.randn(3, 4)
    straight = LatentODE("euler", 8).solve(lambda x, t, c: torch.ones_like(x), x0, return_trajectory=True)
    start, gaps = gap_profile(straight)
    assert start.tolist() == [k / 8 for k in range(8)] and torch.allclose(gaps, torch.zeros(8), atol=1e-10)

    def curved(x, t, c):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1).repeat(1, 2)[:, :4] * 3

    _, bent = gap_profile(LatentODE("euler", 8).solve(curved, x0, return_trajectory=True))
    assert (bent > 0).all()
    a, b = project_2d(straight.states, straight.states + 1)
    assert a.shape == (9, 3, 2) and b.shape == (9, 3, 2)


class CountingFeatures(torch.nn.Module):
    """A fixed random conv feature net that counts its calls (to see the reference cache at work)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.conv(images).mean(dim=(2, 3))


def test_sample_quality_logs_fid_and_clip_at_each_step_count(tiny_sd, tmp_path):
    from instaflow_pl.callbacks import SampleQuality
    from instaflow_pl.tiny import build_tiny_clip

    root = write_dataset(tmp_path / "d", count=48, shard_size=16)
    features = CountingFeatures()
    quality = SampleQuality(
        steps=[1, 2], num_samples=12, batch_size=6, fid_features=features, cache_dir=str(tmp_path / "cache"),
        clip_model=str(build_tiny_clip(tmp_path / "clip")),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[quality],
        num_sanity_val_steps=0,
    )  # fmt: skip
    module = ReflowModule(str(tiny_sd), ema_decay=0.0, val_steps=[1])
    data = TriplesDataModule(str(root), batch_size=8, val_fraction=0.25)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("val/fid@1", "val/fid@2", "val/clip@1", "val/clip@2"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0 <= float(metrics["val/clip@1"]) <= 100
    assert float(metrics["val/fid@1"]) > 0
    assert len(list((tmp_path / "cache").glob("fid-reference-*.safetensors"))) == 1
    calls = features.calls
    validated = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert {"val/fid@1", "val/clip@2", "val/mse@1"} <= set(validated), "in validate's results table too"
    # One more evaluation: one net call per step count; the reference statistics come from the cache.
    assert features.calls - calls == 2
    assert quality.seconds is not None and quality.seconds > 0
