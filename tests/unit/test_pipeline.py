"""InstaFlowPipeline is the self-contained pipeline (the file exports ship) with the project's families in its two
seams: one sampling loop, latent shape, noise and decode. The self-contained class also samples a pixel-space folder
(the digits demo's: no VAE, an MLP network), exactly as InstaFlowPipeline does."""

from __future__ import annotations

import pytest
import torch

from instaflow_pl import standalone_pipeline
from instaflow_pl.data.digits import DIGIT_PROMPTS
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES
from instaflow_pl.pipeline import InstaFlowPipeline

SHARED = ("__call__", "sample_latents", "latent_shape", "default_size", "decode")
"""What InstaFlowPipeline takes from the self-contained pipeline unchanged."""


def test_instaflow_pipeline_builds_on_the_self_contained_pipeline():
    assert issubclass(InstaFlowPipeline, standalone_pipeline.InstaFlowPipeline)
    for name in SHARED:
        assert name not in InstaFlowPipeline.__dict__, f"InstaFlowPipeline must not write its own {name}"
    seams = {"condition", "velocity"}
    assert seams <= set(InstaFlowPipeline.__dict__) and seams <= set(standalone_pipeline.InstaFlowPipeline.__dict__)


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    return FAMILIES["digits"].build_tiny(tmp_path_factory.mktemp("digits") / "base")


def test_self_contained_pipeline_samples_a_pixel_space_folder_as_instaflow_pipeline(digits_base):
    ours = InstaFlowPipeline.from_pretrained(digits_base)
    standalone = standalone_pipeline.InstaFlowPipeline.from_pretrained(digits_base)
    assert type(standalone) is standalone_pipeline.InstaFlowPipeline and standalone.vae is None
    assert standalone.vae_scale_factor == 1 and standalone.latent_shape() == ours.latent_shape() == (1, 8, 8)
    prompts = list(DIGIT_PROMPTS[:2])
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, guidance, output_type in ((1, 0.0, "latent"), (3, 2.5, "latent"), (2, 2.0, "pt")):
        args = dict(num_inference_steps=steps, guidance_scale=guidance, output_type=output_type)
        expected = ours(prompts, latents=x0.clone(), **args).images
        assert torch.equal(standalone(prompts, latents=x0.clone(), **args).images, expected)
    with pytest.raises(ValueError, match="must be 8, got 16 x 16"):
        standalone.latent_shape(16, 16)
    with pytest.raises(UserError, match="must be 8, got 16 x 16"):
        ours.latent_shape(16, 16)
