"""LoRA on every family with a stock diffusers pipeline: the exported adapter file, loaded with the family's own
pipeline class (``load_lora_weights``), gives the velocity of the merged export and of the module's own EMA model
(relative error <= 1e-5, alpha != rank)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import write_dataset
from helpers import adam, fit_quietly

from instaflow_pl.export import export_checkpoint
from instaflow_pl.families import FAMILIES
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.modules import ReflowModule
from instaflow_pl.velocity import NetworkVelocity

PROMPTS = ["a photo of a cat", "a red car in the city"]


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if family.pipeline_classes])
def test_lora_file_loads_in_the_family_pipeline_and_equals_the_merged_export(name, tmp_path):
    family = FAMILIES[name]
    base = ModelFolder.open(family.build_tiny(tmp_path / "base"))
    shape, ppl = base.geometry.shape, base.pixels_per_latent
    data = write_dataset(tmp_path / "pairs", count=12, shard_size=4, shape=shape, family=name)
    module = ReflowModule(str(base.root), lora={"rank": 2, "alpha": 3.0}, ema_decay=0.5, val_steps=[1], optimizer=adam)
    trainer = fit_quietly(module, data, tmp_path / "fit")
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "merged")
    export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "lora", lora_format="file")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.7])
    cond = module.condition(PROMPTS)
    with torch.no_grad():
        merged = ModelFolder.open(tmp_path / "merged").load_network()
        pipe = getattr(diffusers, family.lora_pipeline).from_pretrained(base.root)
        network = getattr(pipe, family.network_folder)
        before = NetworkVelocity(network, family, pixels_per_latent=ppl)(x, t, cond)
        pipe.load_lora_weights(tmp_path / "lora")
        loaded = NetworkVelocity(network, family, pixels_per_latent=ppl)(x, t, cond)
        exported = NetworkVelocity(merged, family, pixels_per_latent=ppl)(x, t, cond)
        with module.sampling_weights() as velocity:
            ours = velocity(x, t, cond)
    scale = ours.abs().max()
    assert (exported - ours).abs().max() / scale <= 1e-5, "the merged export is the EMA LoRA model"
    assert (loaded - exported).abs().max() / scale <= 1e-5, "stock load_lora_weights gives the merged velocity"
    assert (before - loaded).abs().max() / scale > 1e-4, "the adapters changed the velocity"
