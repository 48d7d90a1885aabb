"""The fixed conventions (docs/architecture.md), pinned."""

from __future__ import annotations

import torch

from instaflow_pl.conventions import noise_for_indices, noise_from_seed, sample_seed, unet_timestep


def test_noise_at_t0_is_unet_timestep_1000_and_data_at_t1_is_0():
    assert unet_timestep(torch.tensor(0.0)).item() == 1000.0
    assert unet_timestep(torch.tensor(1.0)).item() == 0.0
    assert unet_timestep(torch.tensor(0.25)).item() == 750.0


def test_seed_rule_is_seed_plus_index_on_a_cpu_generator():
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(7 + 3))
    assert sample_seed(7, 3) == 10
    assert torch.equal(noise_from_seed(10, (4, 8, 8)), expected)
    batch = noise_for_indices(7, [5, 3], (4, 8, 8))
    assert torch.equal(batch[1], expected)
    assert not torch.equal(batch[0], expected)


def test_latents_are_the_vaes_scaled_latents(tiny_sd):
    from diffusers import AutoencoderKL

    from instaflow_pl.conventions import images_to_latents, latents_to_images

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    vae.config.scaling_factor = 0.18215  # SD 1.5's
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    ours = images_to_latents(vae, images)
    torch.manual_seed(3)
    expected = vae.encode(images).latent_dist.sample() * 0.18215
    assert torch.allclose(ours, expected)
    assert torch.allclose(latents_to_images(vae, ours), vae.decode(expected / 0.18215).sample, atol=1e-6)
