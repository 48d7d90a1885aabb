"""The LoRA export (``--lora-format file``): the adapters alone, in the file diffusers' ``load_lora_weights`` reads
onto a pipeline of the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from instaflow_pl.modules.lora import LoraOptions

LORA_KIND = "lora"
"""``instaflow.json``'s kind for a LoRA export (adapters for the base model, not a whole model folder)."""
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads."""


def write_lora_file(
    folder: Path, weights: dict[str, torch.Tensor], lora: LoraOptions, family, info: dict[str, Any]
) -> None:
    """Write the adapters among ``weights`` as :data:`LORA_WEIGHTS_FILE` (with their options as adapter metadata)
    and an ``instaflow.json`` of kind :data:`LORA_KIND` into the empty ``folder``: everything but the model card.

    Args:
        folder: The (temporary) folder to fill.
        weights: The network's state dict as the checkpoint holds it (EMA weights when kept), adapters included.
        lora: The options the adapters were trained with.
        family: The network's family: its pipeline class saves the file, under its network's prefix.
        info: What ``instaflow.json`` records besides the kind (``export_info`` and the LoRA options).
    """
    import diffusers

    from instaflow_pl.modules.lora import diffusers_lora_layers

    metadata = {"r": lora.rank, "lora_alpha": lora.alpha or lora.rank, "target_modules": lora.target_modules}
    pipeline, prefix = family.lora_pipeline, family.network_folder  # e.g. StableDiffusion3Pipeline, transformer
    getattr(diffusers, pipeline).save_lora_weights(
        folder,
        weight_name=LORA_WEIGHTS_FILE,
        **{f"{prefix}_lora_layers": diffusers_lora_layers(weights), f"{prefix}_lora_adapter_metadata": metadata},
    )
    (folder / "instaflow.json").write_text(json.dumps({"kind": LORA_KIND, **info}, indent=2, sort_keys=True) + "\n")
