"""Shared fixtures: the tiny SD-format folder (built once per session), prompt files, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# W&B runs as the configs have it, less the pip listing each run saves (0.7 s of reading package metadata a run).
os.environ.setdefault("WANDB__SAVE_REQUIREMENTS", "false")
# FID reference caches and the like go to a fresh folder, never the user's ~/.cache or the checkout.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="instaflow-pl-test-cache-")
# One intra-op thread per process: tiny tensors gain nothing from more, and on a 2-core machine a busy neighbour
# makes OpenMP threads spin (seen here: 50x slower steps). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a photo of a cat",
    "a red car in the city",
    "a painting of a horse by the river",
    "a small bird sitting on a tree",
    "a drawing of an old house",
]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """The tiny Stable-Diffusion-format folder (random weights), built by the package's own builder."""
    from instaflow_pl.families import FAMILIES

    return FAMILIES["sd"].build_tiny(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_velocity(tiny_sd, tmp_path_factory) -> Path:
    """A velocity (k-RF) folder: the tiny SD folder marked as a rectified flow."""
    import shutil

    from instaflow_pl.model_folder import mark_velocity_folder

    out = tmp_path_factory.mktemp("tiny") / "rf"
    shutil.copytree(tiny_sd, out)
    mark_velocity_folder(out, stage="test")
    return out


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """A text file with five prompts."""
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def pairs_args(teacher: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments of a small pair-generation run on the tiny config."""
    return [
        "predict",
        "--config",
        str(REPO / "configs/tiny/sd/pairs.yaml"),
        f"--model.init_args.teacher={teacher}",
        f"--model.init_args.output_dir={out}",
        f"--data.init_args.prompts={prompts}",
        *extra,
    ]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``instaflow-pl`` in a fresh process."""
    cmd = [sys.executable, "-m", "instaflow_pl.cli", *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def write_dataset(
    root: Path, count: int = 40, shard_size: int = 8, shape=(4, 8, 8), seed: int = 0, family: str = "sd"
) -> Path:
    """A finished triples dataset with random X1 (written through the package's store)."""
    from instaflow_pl.data.synthetic import write_random_triples

    return write_random_triples(root, count, shard_size, shape, seed, family)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A local FID Inception weights file with random weights, in the real file's format (torch-fidelity's network)."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    extractor = inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as patch:  # build the network without its download
        patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(extractor, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        weights = extractor("inception-v3-compat", ["64"]).state_dict()
    from instaflow_pl.metrics import INCEPTION_WEIGHTS_FILE

    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(weights, path)
    return path
