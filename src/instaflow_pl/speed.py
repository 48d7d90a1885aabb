"""Speed options for the velocity network and the teacher: torch.compile, channels-last, TF32, SDPA attention.

One place for all of them, used by the training modules and pair generation alike.
"""

from __future__ import annotations

import torch
from torch import nn


def speed_up(
    network: nn.Module, compile: bool = False, channels_last: bool = False, backend: str = "inductor"
) -> nn.Module:
    """Apply the speed options to ``network`` in place (its state-dict keys do not change) and return it.

    Args:
        network: A UNet-like network (any ``nn.Module``).
        compile: ``torch.compile`` its forward (``nn.Module.compile``, so checkpoints keep their keys).
        channels_last: Store 4-D weights channels-last (diffusers UNets then run their convs channels-last).
        backend: The torch.compile backend.
    """
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        network.compile(backend=backend)
    return network


def set_tf32(enabled: bool, device: torch.device | str | None = None) -> None:
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions (a process-wide setting of torch).

    TF32 is a feature of NVIDIA Ampere+ GPUs: asked for on another ``device`` it is left off, with one line that says
    so (on CPUs, torch's "high" matmul precision would otherwise let oneDNN compute float32 matmuls in bfloat16).
    """
    if enabled and device is not None and torch.device(device).type != "cuda":
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"tf32: true has no effect on {torch.device(device).type} (an Ampere+ GPU feature); ignored")
        enabled = False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def attention_processors(network: nn.Module) -> set[str]:
    """Class names of the attention processors a diffusers network uses (``AttnProcessor2_0`` is SDPA)."""
    processors = getattr(network, "attn_processors", None)
    return {type(p).__name__ for p in processors.values()} if processors else set()
