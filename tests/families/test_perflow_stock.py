"""A piecewise rectified flow's export of a flow family (SD3, Flux) samples with the family's stock diffusers pipeline.

With K windows and n steps the sampler steps uniformly inside each window (:func:`~instaflow_pl.solver.piecewise_grid`).
At n = K, and at every multiple of K, that grid is the uniform one, so the exported scheduler (FlowMatchEuler, shift 1)
with the model card's uniform ``sigmas = [1 - i / n ...]`` (Flux: its stock default grid, the same one) samples what
InstaFlowPipeline (and ``instaflow-pl sample``, which runs it) samples. At other n the grid is not uniform: the stock
pipeline then needs the piecewise grid's own sigmas.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import write_dataset
from helpers import two_step_checkpoint

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.export import export_checkpoint
from instaflow_pl.families import FAMILIES
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.modules import ReflowModule
from instaflow_pl.pipeline import InstaFlowPipeline
from instaflow_pl.solver import piecewise_grid

PROMPTS = ["a photo of a cat", "a red car in the city"]
WINDOWS = 2
FLOW_FAMILIES = [name for name, f in FAMILIES.items() if f.pipeline_classes and not f.standalone_pipeline]
"""Families whose stock diffusers pipeline samples an export (no shipped pipeline file): SD3, Flux."""


def windowed_fit(base: Path, family: str, root: Path) -> Path:
    """Two CPU steps of a piecewise reflow (``WINDOWS`` windows, the base folder as its teacher) on random latents."""
    shape = ModelFolder.open(base).geometry.shape
    data = write_dataset(root / "data", count=8, shard_size=8, shape=shape, family=family)
    module = ReflowModule(
        str(base), teacher=str(base), windows=WINDOWS, window_solver_steps=1, ema_decay=0.5, val_steps=[WINDOWS]
    )
    return two_step_checkpoint(module, data, root)


@pytest.fixture(scope="module", params=FLOW_FAMILIES)
def windowed_export(request, tmp_path_factory) -> tuple[str, Path]:
    """(family name, the export of a tiny piecewise reflow of that family with ``WINDOWS`` windows)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"perflow-{name}")
    base = FAMILIES[name].build_tiny(root / "base")
    export_checkpoint(windowed_fit(base, name, root / "fit"), root / "export")
    return name, root / "export"


def uniform_sigmas(steps: int) -> list[float]:
    """The model card's sigmas: ``1 - i / n``, the uniform grid from noise."""
    return [1 - i / steps for i in range(steps)]


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_stock_pipeline_samples_a_windowed_export_at_multiples_of_k(windowed_export, guidance):
    name, out = windowed_export
    family = FAMILIES[name]
    info = json.loads((out / "instaflow.json").read_text())
    assert info["windows"] == WINDOWS
    pipe = InstaFlowPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.windows == WINDOWS
    stock = getattr(diffusers, family.lora_pipeline).from_pretrained(out)
    stock.set_progress_bar_config(disable=True)
    scheduler = stock.scheduler.config
    assert type(stock.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.shift == 1.0 and not scheduler.get("use_dynamic_shifting", False), dict(scheduler)
    shape = pipe.latent_shape()
    x0 = noise_for_indices(0, range(len(PROMPTS)), shape)

    def sample_ours(steps: int) -> torch.Tensor:
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent"}
        return pipe(PROMPTS, latents=x0.clone(), **kwargs).images

    def sample_stock(steps: int, **extra) -> torch.Tensor:
        args = family.stock_sampling_args(x0.clone(), guidance, info, pipe.vae_scale_factor)
        images = stock(PROMPTS, num_inference_steps=steps, output_type="latent", **args, **extra).images
        return family.stock_latents(images, shape)

    exact = 0.0 if guidance <= 1 else 1e-5  # guided: the null prompt's separate or batched call, last bits
    for steps in (WINDOWS, 2 * WINDOWS):
        assert np.allclose(piecewise_grid(steps, WINDOWS), [i / steps for i in range(steps + 1)], rtol=0, atol=1e-12)
        expected = sample_ours(steps)
        scale = expected.abs().max().item()
        gaps = {"card sigmas": (sample_stock(steps, sigmas=uniform_sigmas(steps)) - expected).abs().max().item()}
        if family.flow_sigmas(steps) is not None:  # Flux: the stock default grid, linspace(1, 1/n, n), is uniform
            gaps["stock default"] = (sample_stock(steps) - expected).abs().max().item()
        print(f"{name} K={WINDOWS} n={steps} guidance {guidance}: max |stock - InstaFlowPipeline| "
              f"{ {k: f'{v:.1e}' for k, v in gaps.items()} } (latents' max |x| {scale:.2f})")  # fmt: skip
        for what, gap in gaps.items():
            assert gap <= exact * scale, (steps, what, gap)

    # n = K + 1 is no multiple of K: the extra step goes to the first window, so the grid is not uniform and the
    # card's uniform sigmas sample something else; the piecewise grid's own sigmas still sample the export
    steps = WINDOWS + 1
    grid = piecewise_grid(steps, WINDOWS)
    expected = sample_ours(steps)
    piecewise = (sample_stock(steps, sigmas=[1 - t for t in grid[:-1]]) - expected).abs().max().item()
    uniform = (sample_stock(steps, sigmas=uniform_sigmas(steps)) - expected).abs().max().item()
    print(f"{name} K={WINDOWS} n={steps}: piecewise sigmas {piecewise:.1e}, uniform sigmas {uniform:.1e}")
    assert piecewise <= exact * expected.abs().max().item(), piecewise
    assert uniform > 1e-3 * expected.abs().max().item(), uniform
