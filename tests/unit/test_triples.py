"""The triples DataModule: typed batches, X0 from seeds, splits, clear errors, exact resume from a checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from instaflow_pl.conventions import noise_from_seed
from instaflow_pl.data import TripleBatch, TriplesDataModule
from instaflow_pl.errors import UserError


def all_batches(data: TriplesDataModule) -> list[TripleBatch]:
    return list(data.train_dataloader())


def test_batches_are_typed_and_x0_is_regenerated_from_the_seed(tmp_path):
    root = write_dataset(tmp_path / "d", count=20, shard_size=8)
    data = TriplesDataModule(str(root), batch_size=6, shuffle=False)
    data.setup("fit")
    batches = all_batches(data)
    assert all(isinstance(b, TripleBatch) for b in batches)
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    first = batches[0]
    assert first.index.tolist() == list(range(6)) and first.prompts[2] == "prompt 2"
    assert first.x0.dtype == torch.float32 and first.x1.dtype == torch.float32
    assert torch.equal(first.x0[4], noise_from_seed(4, (4, 8, 8)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_stream_covers_every_sample_once(tmp_path, num_workers):
    root = write_dataset(tmp_path / "d", count=40, shard_size=8)
    data = TriplesDataModule(str(root), batch_size=4, shuffle=True, seed=3, num_workers=num_workers)
    data.setup("fit")
    seen = torch.cat([b.index for b in all_batches(data)]).tolist()
    assert sorted(seen) == list(range(40))
    assert seen != list(range(40))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_dataset_held_in_memory_gives_the_streams_batches(tmp_path, num_workers):
    """Same samples, same order, every epoch, in both splits (the validation split's chunks are numbered from 0 by
    litdata, so a row lookup that ignored the split would read the training samples)."""
    root = write_dataset(tmp_path / "d", count=52, shard_size=8)

    def batches(in_memory: bool) -> list[TripleBatch]:
        data = TriplesDataModule(
            str(root), batch_size=5, seed=2, val_fraction=0.25, num_workers=num_workers, in_memory=in_memory
        )
        data.setup("fit")
        assert (data.table is not None) == in_memory
        train = data.train_dataloader()
        return [*train, *train, *data.val_dataloader()]  # two epochs, then validation

    streamed, held = batches(False), batches(True)
    assert len(streamed) == len(held) == 2 * 8 + 3
    for a, b in zip(streamed, held, strict=True):
        assert torch.equal(a.index, b.index) and a.prompts == b.prompts
        assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1)
    assert torch.cat([b.index for b in held[-3:]]).min() >= 39  # validation: the last quarter


def test_a_small_local_dataset_is_held_in_memory_and_a_large_one_streams(tmp_path, monkeypatch):
    import instaflow_pl.data.triples as triples

    root = write_dataset(tmp_path / "d", count=16, shard_size=8)  # 16 x 2 x 4x8x8 float32: 32 KiB
    data = TriplesDataModule(str(root))
    data.setup("fit")
    assert data.table is not None and len(data.table) == 16
    monkeypatch.setattr(triples, "IN_MEMORY_MB", 0.02)
    data = TriplesDataModule(str(root))
    data.setup("fit")
    assert data.table is None


def test_val_split_is_disjoint(tmp_path):
    root = write_dataset(tmp_path / "d", count=40, shard_size=8)
    data = TriplesDataModule(str(root), batch_size=4, shuffle=False, val_fraction=0.25)
    data.setup("fit")
    train = torch.cat([b.index for b in data.train_dataloader()]).tolist()
    val = torch.cat([b.index for b in data.val_dataloader()]).tolist()
    assert len(train) == 30 and len(val) == 10
    assert not set(train) & set(val) and set(train) | set(val) == set(range(40))


def test_truncated_shard_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", count=20, shard_size=8)
    shard = root / "shard-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"shard .*shard-000001.bin is corrupt"):
        TriplesDataModule(str(root)).setup("fit")


def test_missing_shard_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", count=20, shard_size=8)
    (root / "shard-000002.bin").unlink()
    with pytest.raises(UserError, match=r"shard .*shard-000002.bin is missing"):
        TriplesDataModule(str(root)).setup("fit")


def test_missing_manifest_and_unfinished_dataset(tmp_path):
    root = write_dataset(tmp_path / "d", count=8, shard_size=8)
    (root / "index.json").unlink()
    with pytest.raises(UserError, match="has no index.json: generation has not finished"):
        TriplesDataModule(str(root)).setup("fit")
    (root / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json not found"):
        TriplesDataModule(str(root)).setup("fit")


def test_wrong_latent_shape_is_refused(tmp_path):
    root = write_dataset(tmp_path / "d", count=8, shard_size=8)
    with pytest.raises(UserError, match=r"latent shape \[4, 8, 8\], but the model expects \[4, 64, 64\]"):
        TriplesDataModule(str(root), expected_latent_shape=[4, 64, 64]).setup("fit")


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="batch_size must be >= 1"):
        TriplesDataModule("x", batch_size=0)
    with pytest.raises(UserError, match="val_fraction"):
        TriplesDataModule("x", val_fraction=1.5)


class Killed(Exception):
    """Stands in for a kill: the run stops without saving anything."""


class Recorder(L.LightningModule):
    """Fits a scalar to the batches and records the sample indices it is given, step by step."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []
        self.crash_at = crash_at

    def training_step(self, batch: TripleBatch, batch_idx: int):
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise Killed
        self.seen.append(batch.index.tolist())
        return ((batch.x1 - self.weight) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


RECORDERS: list[Recorder] = []


def fit(root, ckpt_dir, max_steps, crash_at=None, ckpt_path=None, num_workers=0, in_memory=None):
    module = Recorder(crash_at)
    RECORDERS.append(module)
    data = TriplesDataModule(
        str(root), batch_size=4, shuffle=True, seed=5, num_workers=num_workers, in_memory=in_memory
    )
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("num_workers, in_memory", [(0, False), (2, False), (0, True), (2, True)])
def test_resume_from_a_checkpoint_continues_at_the_exact_sample(tmp_path, num_workers, in_memory):
    """Killed mid-epoch, resumed from the last checkpoint: the same samples in the same order, across epochs."""
    root = write_dataset(tmp_path / "d", count=40, shard_size=8)  # 10 batches per epoch
    run = {"num_workers": num_workers, "in_memory": in_memory}
    full = fit(root, tmp_path / "full", max_steps=24, **run)
    with pytest.raises(Killed):
        fit(root, tmp_path / "run", max_steps=24, crash_at=7, **run)  # last checkpoint: step 6
    interrupted = RECORDERS[-1]
    assert len(interrupted.seen) == 7
    last = str(tmp_path / "run" / "last.ckpt")
    resumed = fit(root, tmp_path / "run", max_steps=24, ckpt_path=last, **run)
    assert interrupted.seen[:6] + resumed.seen == full.seen
    assert torch.equal(resumed.weight, full.weight)
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]
    assert "combined_loader" in state["state_dict"], "the stream position must be in the checkpoint"


def test_a_remote_manifest_is_read_through_litdatas_downloader(tmp_path, monkeypatch):
    """``s3://`` etc.: manifest.json is fetched by litdata's downloader for the scheme, with the shards' credentials."""
    import shutil

    from litdata.streaming import downloader

    from instaflow_pl.data.triples import read_manifest

    root = write_dataset(tmp_path / "bucket" / "pairs", count=8, shard_size=8)
    fetched = []

    class FolderAsBucket(downloader.Downloader):
        def download_file(self, remote_filepath: str, local_filepath: str) -> None:
            fetched.append(remote_filepath)
            shutil.copyfile(remote_filepath.replace("test-store://", f"{tmp_path}/"), local_filepath)

    monkeypatch.setitem(downloader._DOWNLOADERS, "test-store://", FolderAsBucket)
    manifest = read_manifest("test-store://bucket/pairs")
    assert fetched == ["test-store://bucket/pairs/manifest.json"]
    assert manifest.count == 8 and manifest == read_manifest(str(root))
    with pytest.raises(UserError, match=r"cannot read test-store://bucket/nothing/manifest.json .*credentials"):
        read_manifest("test-store://bucket/nothing")


def test_every_rank_gets_a_validation_batch(tmp_path):
    """litdata gives each rank whole batches of the held-out split: with 8 samples, batches of 16 and 2 ranks one rank
    would get none (and skip the metric reduction the other waits for), so the validation batch shrinks to 4."""
    from types import SimpleNamespace

    root = write_dataset(tmp_path / "d", count=40, shard_size=8)  # 8 held out
    data = TriplesDataModule(str(root), batch_size=16, val_fraction=0.2)
    data.trainer = SimpleNamespace(world_size=2)
    data.setup("fit")
    assert data.val_dataloader().batch_size == 4 and data.train_dataloader().batch_size == 16
    crowded = TriplesDataModule(str(root), batch_size=16, val_fraction=0.2)
    crowded.trainer = SimpleNamespace(world_size=9)
    with pytest.raises(UserError, match="has 8 samples, fewer than the 9 ranks, .*raise data.val_fraction"):
        crowded.setup("fit")


def test_regenerated_noise_is_drawn_once_per_seed_when_the_dataset_fits_the_cache(monkeypatch):
    from types import SimpleNamespace

    import instaflow_pl.data.triples as triples

    drawn = []
    monkeypatch.setattr(
        triples, "noise_from_seed", lambda seed, shape: drawn.append(seed) or noise_from_seed(seed, shape)
    )  # noqa: E501
    monkeypatch.setattr(triples, "NOISE_CACHE_MB", 4 * 128 / 2**20)  # room for four samples' noise (128 bytes each)
    for count, expected in [(4, [5, 6, 7, 8]), (5, [5, 6, 7, 8, 5, 6, 8, 8])]:  # fits: drawn once; too big: never kept
        drawn.clear()
        decoder = triples.TripleDecoder(SimpleNamespace(latent_shape=[2, 4, 4], x1_dtype="float16", count=count))
        for seed in [5, 6, 7, 8, 5, 6, 8, 8]:
            assert torch.equal(decoder.noise(seed), noise_from_seed(seed, (2, 4, 4)))
        assert drawn == expected
