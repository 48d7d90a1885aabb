"""Random triples datasets written straight through the store, for tests, benchmarks and storage sizing.

The streaming side does not care where X1 came from, so a dataset of random X1 exercises it exactly as a generated one
(same manifest, shards, index and seed-regenerated X0), in a fraction of the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from instaflow_pl.data.manifest import Manifest
from instaflow_pl.data.prompts import prompts_digest
from instaflow_pl.data.store import PairRecord, PairStore
from instaflow_pl.kinds import RELEASED_KIND


def random_prompts(count: int) -> list[str]:
    """``count`` distinct placeholder prompts."""
    return [f"prompt {i}" for i in range(count)]


def random_triples_manifest(
    count: int, latent_shape: Sequence[int] = (4, 8, 8), shard_size: int = 256, seed: int = 0, family: str = "sd"
) -> Manifest:
    """The manifest of a random-X1 dataset (teacher ``random`` of model family ``family``, no solver)."""
    return Manifest(
        teacher="random",
        teacher_kind=RELEASED_KIND,
        teacher_fingerprint="0" * 64,
        teacher_dtype="fp32",
        solver="none",
        steps=0,
        guidance=1.0,
        seed=seed,
        latent_shape=list(latent_shape),
        x0_format="seed",
        x1_dtype="fp16",
        count=count,
        shard_size=shard_size,
        prompts_sha256=prompts_digest(random_prompts(count)),
        prompts_source="random",
        family=family,
    )


def write_random_triples(
    root: str | Path,
    count: int,
    shard_size: int = 256,
    latent_shape: Sequence[int] = (4, 8, 8),
    seed: int = 0,
    family: str = "sd",
) -> Path:
    """Write a finished dataset of ``count`` triples with standard-normal X1 to ``root``; return ``root``."""
    manifest = random_triples_manifest(count, latent_shape, shard_size, seed, family)
    store = PairStore(root, manifest)
    store.open()
    prompts = random_prompts(count)
    generator = torch.Generator().manual_seed(1234 + seed)
    for shard in range(manifest.num_shards):
        records = [
            PairRecord(i, seed + i, prompts[i], torch.randn(tuple(latent_shape), generator=generator))
            for i in manifest.shard_range(shard)
        ]
        store.write_shard(shard, records)
    store.finalize()
    return Path(root)
