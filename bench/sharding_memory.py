"""Per-GPU memory of full-parameter reflow for the large teachers, DDP against sharded (FSDP2), LoRA beside them.

The networks are built from their published configs on the meta device (no weights, no memory), so the parameter
counts are exact. The per-rank training state comes from the counts, at these bytes per parameter (AdamW,
``precision: bf16-mixed``, EMA on):

* trained parameter: fp32 weight 4 + fp32 gradient 4 + two fp32 Adam moments 8 + fp32 EMA 4 = **20 B**;
* frozen parameter (LoRA's base): fp32 weight **4 B** (bf16-true would halve it);
* sharded: every trained and frozen byte divided by the number of GPUs, plus the gathered bf16 weights of the two
  largest FSDP units (the one computing and the one prefetched).

Activations are measured, not estimated: one forward at the native resolution, batch 1, bf16, on meta tensors,
counting the bytes autograd saves for the backward (``saved_tensors_hooks``) in total and inside each of the
family's shard blocks, with attention counted as a fused GPU kernel saves it (q, k, v, output, log-sum-exp; no
attention matrix). With gradient checkpointing the live activations are about the largest block's plus each
block's input (the "ckpt" column); without it, the total. Both are per sample. The frozen text encoders are not in the
table: they are replicated per GPU under either strategy (SD3's T5-XXL is 9.5 GB in bf16, FLUX's 9.5 GB).

``python -m bench.sharding_memory`` prints the table for 1, 8 and 64 GPUs; ``--quick`` runs the same code on the
tiny folders' networks (the test).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

GiB = 2**30
TRAINED_BYTES = 20
"""fp32 weight + gradient + two Adam moments + EMA."""
FROZEN_BYTES = 4
"""fp32 frozen weight (bf16-mixed keeps weights in fp32)."""
GATHERED_BYTES = 2
"""bf16 gathered weights of an FSDP unit (MixedPrecisionPolicy param_dtype)."""
LORA_RANK = 64
GPUS = (1, 8, 64)

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
"""stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults)."""
SD35_LARGE = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}  # fmt: skip
"""stabilityai/stable-diffusion-3.5-large, transformer/config.json."""
FLUX1 = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True,
}  # fmt: skip
"""black-forest-labs/FLUX.1-dev, transformer/config.json."""


@dataclass
class Model:
    """One network of the table: its family, config and input size."""

    name: str
    family: str
    config: dict
    resolution: int
    """Image pixels per side (the latents are 1/8 of it)."""


MODELS = (
    Model("SDXL UNet", "sdxl", SDXL_UNET, 1024),
    Model("SD3.5 Large", "sd3", SD35_LARGE, 1024),
    Model("FLUX.1 [dev]", "flux", FLUX1, 1024),
)


@dataclass
class Measured:
    """What one network costs, from its parameter counts and one meta forward."""

    name: str
    params: int
    lora_params: int
    largest_unit: int
    activations: int
    """Bytes saved for the backward, per sample, without checkpointing."""
    checkpointed: int
    """Largest block's saved bytes plus every block's input, per sample, with gradient checkpointing."""


def build(model: Model) -> nn.Module:
    from instaflow_pl.families import family_named, network_from_config

    family_named(model.family, "bench")
    with torch.device("meta"):
        return network_from_config(dict(model.config), "bench").to(torch.bfloat16)


def lora_count(network: nn.Module) -> int:
    """Parameters LoRA rank ``LORA_RANK`` adds with the project's default targets (counted on a meta copy)."""
    import copy

    from instaflow_pl.modules.lora import LoraOptions, add_lora

    clone = copy.deepcopy(network)
    before = sum(p.numel() for p in clone.parameters())
    add_lora(clone, LoraOptions.parse({"rank": LORA_RANK, "alpha": LORA_RANK}))
    return sum(p.numel() for p in clone.parameters()) - before


def measure(model: Model, batch: int = 1) -> Measured:
    from instaflow_pl.families import family_named
    from instaflow_pl.velocity.condition import TextCondition

    family = family_named(model.family, "bench")
    network = build(model)
    params = sum(p.numel() for p in network.parameters())
    blocks = [m for m in network.modules() if type(m).__name__ in family.shard_blocks]
    largest_unit = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    root = params - sum(sum(p.numel() for p in b.parameters()) for b in blocks if not _nested(b, blocks))
    largest_unit = max(largest_unit, root)
    lora = lora_count(network)

    saved = {"total": 0, "block": 0, "largest": 0, "inputs": 0}

    def pack(tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        saved["total"] += size
        saved["block"] += size
        return tensor

    def before(module, args, kwargs):
        saved["block"] = 0
        first = next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
        if first is not None:
            saved["inputs"] += first.numel() * first.element_size()

    def after(module, args, kwargs, output):
        saved["largest"] = max(saved["largest"], saved["block"])

    outer = [b for b in blocks if not _nested(b, blocks)]
    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in outer]
    handles += [b.register_forward_hook(after, with_kwargs=True) for b in outer]
    latent = model.resolution // 8
    geometry = family.latent_geometry({**network.config, "_class_name": type(network).__name__})
    x = torch.randn(batch, geometry.channels, latent, latent, device="meta", dtype=torch.bfloat16)
    cond = _condition(model, network, batch, TextCondition)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _trainable(network):
            family.call(network, x, torch.full((batch,), 500.0, device="meta"), cond, 8)
    finally:
        for handle in handles:
            handle.remove()
    per_sample = 1 / batch
    return Measured(
        model.name,
        params,
        lora,
        largest_unit,
        int(saved["total"] * per_sample),
        int((saved["largest"] + saved["inputs"]) * per_sample),
    )


def _nested(block: nn.Module, blocks: list[nn.Module]) -> bool:
    return any(other is not block and any(m is block for m in other.modules()) for other in blocks)


class _FusedAttention(torch.autograd.Function):
    """What a fused (flash / memory-efficient) attention kernel saves for its backward: q, k, v, the output and one
    log-sum-exp per query, never the attention matrix (the math path meta tensors would take saves it)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def _trainable(network: nn.Module):
    import torch.nn.functional as F

    network.requires_grad_(True)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.enable_grad():
            yield
    finally:
        F.scaled_dot_product_attention = original


def _condition(model: Model, network: nn.Module, batch: int, TextCondition):
    """Text embeddings of the family's shapes (77 CLIP tokens; SD3 and FLUX: 333 / 512 tokens with T5)."""
    config = network.config
    meta = {"device": "meta", "dtype": torch.bfloat16}
    if model.family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim  # CLIP-G's 1280
        return TextCondition(
            torch.randn(batch, 77, config.cross_attention_dim, **meta),
            pooled=torch.randn(batch, pooled, **meta),
        )
    if model.family == "sd3":
        return TextCondition(
            torch.randn(batch, 333, config.joint_attention_dim, **meta),
            pooled=torch.randn(batch, config.pooled_projection_dim, **meta),
        )
    return TextCondition(
        torch.randn(batch, 512, config.joint_attention_dim, **meta),
        pooled=torch.randn(batch, config.pooled_projection_dim, **meta),
        guidance=torch.full((batch,), 3.5, device="meta"),
    )


def per_gpu(m: Measured, gpus: int) -> dict[str, float]:
    """GiB per GPU of each setup (training state plus checkpointed activations at batch 1)."""
    act = m.checkpointed
    ddp = m.params * TRAINED_BYTES + act
    gathered = 2 * m.largest_unit * GATHERED_BYTES
    sharded = m.params * TRAINED_BYTES / gpus + gathered + act
    lora = m.params * FROZEN_BYTES + m.lora_params * TRAINED_BYTES + act
    return {"ddp": ddp / GiB, "sharded": sharded / GiB, "lora": lora / GiB}


def table(rows: list[Measured], gpus: tuple[int, ...] = GPUS) -> str:
    lines = [
        "| model | params | LoRA r64 params | activations / sample (no ckpt / ckpt) | "
        + " | ".join(f"DDP, sharded @{n} GPUs" for n in gpus)
        + " | LoRA DDP |",
        "|---" * (5 + len(gpus)) + "|",
    ]
    for m in rows:
        cells = []
        for n in gpus:
            fig = per_gpu(m, n)
            cells.append(f"{fig['ddp']:.1f} / {fig['sharded']:.1f}")
        lines.append(
            f"| {m.name} | {m.params / 1e9:.2f} B | {m.lora_params / 1e6:.1f} M | "
            f"{m.activations / GiB:.1f} / {m.checkpointed / GiB:.2f} GiB | "
            + " | ".join(cells)
            + f" | {per_gpu(m, 1)['lora']:.1f} |"
        )
    lines.append(
        f"GiB per GPU at batch 1 with gradient checkpointing; {TRAINED_BYTES} B per trained parameter (fp32 weight, "
        f"gradient, 2 Adam moments, EMA), {FROZEN_BYTES} B per frozen one, sharded adds 2 gathered bf16 units."
    )
    return "\n".join(lines)


def quick_rows() -> list[Measured]:
    """The same measurement on the tiny families' networks (seconds; what the test runs)."""
    import tempfile
    from pathlib import Path

    from instaflow_pl.families import FAMILIES
    from instaflow_pl.model_folder import ModelFolder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, resolution in (("sdxl", 64), ("sd3", 64)):
            folder = ModelFolder.open(FAMILIES[family].build_tiny(Path(tmp) / family))
            config = dict(folder.network_config)
            rows.append(measure(Model(f"tiny {family}", family, config, resolution)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny folders' networks (a few seconds)")
    args = parser.parse_args(argv)
    rows = quick_rows() if args.quick else [measure(m) for m in MODELS]
    print(table(rows))


if __name__ == "__main__":
    main()
