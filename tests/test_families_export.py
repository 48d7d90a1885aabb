"""Exports of SDXL and SD3 velocity models: stock diffusers loads them with the family's classes, InstaFlowPipeline,
``instaflow-pl sample`` and the velocity teacher reproduce the module's own sampler exactly, and one family's data or
checkpoint is refused by another family's model."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import write_dataset
from PIL import Image
from test_export import run_main, train

from instaflow_pl.checkpoints import checkpoint_safe_globals
from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.export import export_checkpoint
from instaflow_pl.modules import ReflowModule
from instaflow_pl.pipeline import InstaFlowPipeline
from instaflow_pl.teachers import load_teacher

PROMPTS = ["a photo of a cat", "a red car in the city"]
FAMILIES = {
    # family: (builder, latent shape, stock pipeline, network folder, stock network class)
    "sdxl": ("build_tiny_sdxl", (4, 8, 8), "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel"),
    "sd3": ("build_tiny_sd3", (16, 8, 8), "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    """(family, base folder, trained module, checkpoint folder, export folder, its InstaFlowPipeline)."""
    from instaflow_pl import tiny

    family = request.param
    builder, shape, *_ = FAMILIES[family]
    root = tmp_path_factory.mktemp(f"export-{family}")
    base = getattr(tiny, builder)(root / "base")
    data = write_dataset(root / "pairs", count=16, shard_size=8, shape=shape, family=family)
    module = ReflowModule(base_model=str(base), ema_decay=0.9, val_steps=[1])
    train(module, data, root / "fit")
    export_checkpoint(root / "fit" / "checkpoints", root / "2rf")
    pipe = InstaFlowPipeline.from_pretrained(root / "2rf")
    pipe.set_progress_bar_config(disable=True)
    return family, base, module.eval(), root / "fit" / "checkpoints", root / "2rf", pipe


def test_export_loads_in_stock_diffusers_with_the_family_classes(run):
    family, _, module, _, out, _ = run
    _, _, pipeline_class, network_folder, network_class = FAMILIES[family]
    stock = getattr(diffusers, pipeline_class).from_pretrained(out)
    assert type(stock).__name__ == pipeline_class
    network = getattr(diffusers, network_class).from_pretrained(out, subfolder=network_folder)
    with module.sampling_weights() as velocity:
        expected = velocity.network.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in network.state_dict().items()), "the EMA weights are exported"


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_pipeline_and_teacher_equal_the_module_sampler_exactly(run, steps, guidance):
    family, _, module, _, out, pipe = run
    x0 = noise_for_indices(0, range(2), pipe.latent_shape())
    ours = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x0, output_type="latent").images
    reference = module.sample(x0.clone(), PROMPTS, steps, guidance).x
    assert (ours - reference).abs().max().item() == 0.0
    teacher = load_teacher(out, steps=steps)
    assert teacher.family.name == family and teacher.kind == "velocity"
    assert torch.equal(teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x, ours)


def test_sample_command_writes_the_pipeline_images(run, tmp_path, capsys):
    _, _, _, _, out, pipe = run
    png = tmp_path / "cat.png"
    args = ["sample", "--model", out, "--prompt", "a photo of a cat", "--n", "1", "--seed", "5", "--out", png]
    code, _, err = run_main([*args, "--steps", "4", "--guidance", "3"], capsys)
    assert code == 0, err
    x0 = noise_for_indices(5, range(1), pipe.latent_shape())
    expected = pipe(["a photo of a cat"], num_inference_steps=4, guidance_scale=3.0, latents=x0).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected))


def test_other_family_data_and_checkpoints_are_refused(run, tiny_sd, tmp_path):
    family, _, _, ckpt_dir, _, _ = run
    import lightning as L

    from instaflow_pl.data import TriplesDataModule

    data = write_dataset(tmp_path / "sd-pairs", count=8, shard_size=8, shape=FAMILIES[family][1], family="sd")
    module = ReflowModule(base_model=str(run[1]), ema_decay=0.0, val_steps=[1])
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(UserError, match=f"come from an sd teacher, but the model being trained is an {family} model"):
        trainer.fit(module, TriplesDataModule(str(data), batch_size=4, val_fraction=0.25))
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd_module = ReflowModule(base_model=str(tiny_sd), ema_decay=0.0, val_steps=[1])
    with pytest.raises(UserError, match=f"the checkpoint holds an {family} model, but this run's base_model is an sd"):
        sd_module.on_load_checkpoint(state)


def test_lora_file_loads_in_the_family_pipeline_and_equals_the_merged_export(run, tmp_path):
    """LoRA on SDXL's UNet and SD3's transformer: stock ``load_lora_weights`` (the family's pipeline class) gives the
    velocity of the merged export and of the module's own EMA model (relative error <= 1e-5, alpha != rank)."""
    from test_scale import adam
    from test_scale import fit as fit_lora

    from instaflow_pl.velocity import NetworkVelocity

    family, base, *_ = run
    _, shape, pipeline_class, network_folder, network_class = FAMILIES[family]
    data = write_dataset(tmp_path / "pairs", count=12, shard_size=4, shape=shape, family=family)
    module = ReflowModule(str(base), lora={"rank": 2, "alpha": 3.0}, ema_decay=0.5, val_steps=[1], optimizer=adam)
    trainer = fit_lora(module, data, tmp_path / "fit")
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "merged")
    export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "lora", lora_format="file")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.7])
    cond = module.condition(PROMPTS)
    with torch.no_grad():
        merged = NetworkVelocity(
            getattr(diffusers, network_class).from_pretrained(tmp_path / "merged", subfolder=network_folder)
        )
        pipe = getattr(diffusers, pipeline_class).from_pretrained(base)
        network = getattr(pipe, network_folder)
        before = NetworkVelocity(network, pixels_per_latent=2)(x, t, cond)
        pipe.load_lora_weights(tmp_path / "lora")
        loaded = NetworkVelocity(network, pixels_per_latent=2)(x, t, cond)
        exported = NetworkVelocity(merged.network, pixels_per_latent=2)(x, t, cond)
        with module.sampling_weights() as velocity:
            ours = velocity(x, t, cond)
    scale = ours.abs().max()
    assert (exported - ours).abs().max() / scale <= 1e-5, "the merged export is the EMA LoRA model"
    assert (loaded - exported).abs().max() / scale <= 1e-5, "stock load_lora_weights gives the merged velocity"
    assert (before - loaded).abs().max() / scale > 1e-4, "the adapters changed the velocity"
