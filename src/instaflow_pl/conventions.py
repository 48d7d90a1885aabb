"""The project's fixed conventions, stated once (docs/architecture.md says which module owns each).

* Time runs from noise to data: ``t = 0`` is noise (X0), ``t = 1`` is data (X1).
* A UNet-based velocity is called with timestep ``(1 - t) * 1000``: noise sits at timestep 1000, as in Stable
  Diffusion, so teacher weights are a good initialisation.
* Sample ``i`` of a generated dataset uses the noise ``randn(shape, generator=Generator("cpu").manual_seed(seed + i))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

UNET_TIME_SCALE = 1000.0
"""UNet timestep that corresponds to ``t = 0`` (pure noise)."""


def unet_timestep(t: torch.Tensor) -> torch.Tensor:
    """Map flow time ``t`` in [0, 1] (0 = noise) to the UNet timestep ``(1 - t) * 1000``."""
    return (1.0 - t) * UNET_TIME_SCALE


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` in a dataset generated with base ``seed``."""
    return int(seed) + int(index)


def noise_from_seed(sample_seed_: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the CPU from a generator seeded with ``sample_seed_``.

    Drawing on the CPU makes the noise identical on every machine and device.
    """
    generator = torch.Generator("cpu").manual_seed(int(sample_seed_))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(dtype)


def noise_for_indices(
    seed: int, indices: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stack the noises of several samples: row ``k`` is the noise of sample ``indices[k]``."""
    return torch.stack([noise_from_seed(sample_seed(seed, i), shape, dtype) for i in indices])


def images_to_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to the VAE's scaled latents: ``(latent_dist.sample() - shift) * scaling_factor``."""
    config = vae.config
    latents = vae.encode(images.to(vae.dtype)).latent_dist.sample()
    shift = getattr(config, "shift_factor", None) or 0.0
    return (latents - shift) * getattr(config, "scaling_factor", 1.0)


def latents_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents back to images (about [-1, 1]): the inverse of :func:`images_to_latents`."""
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    unscaled = latents / getattr(config, "scaling_factor", 1.0) + shift
    return vae.decode(unscaled.to(vae.dtype), return_dict=False)[0]
