"""Stable Diffusion 3 (medium) prompt encoding against the network's training step: time, FLOPs, memory, bytes.

For every training sample, SD3 encodes its prompt with three frozen text encoders, as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` does: T5-XXL (``T5EncoderModel``, 24 layers, d_model 4096, 256 tokens:
``max_sequence_length=256``), CLIP-L and CLIP-G (``CLIPTextModelWithProjection``, 12 and 32 layers, 77 tokens; the
sequence embedding is ``hidden_states[-2]``, the pooled one the projection, so every layer runs). The network step is
forward + backward of ``SD3Transformer2DModel`` (SD3-medium: 24 joint blocks, 24 heads x 64, 1536 wide) on one
latent, its 333 text tokens (77 CLIP + 256 T5) and pooled vector as inputs without grad (the encoders are frozen).

What runs, and how it is scaled:

* Each model is built at SD3-medium's real widths with random weights but only ``--layers`` layers (default 2), in
  fp32, and timed per sample (batch 1), interleaved, best of ``--repeats`` rounds, in this process. Ratios compare
  timings taken side by side, so the machine's noise mostly cancels.
* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the same models built on the ``meta`` device (no
  memory, nothing computed) at 1 and 2 layers, extended linearly to ``--layers`` and to the real depth (exact for
  these architectures, see ``flops_and_params``); attention counts through its math path (the CPU flash kernel has
  no FLOP formula). Backward FLOPs are model FLOPs (no recomputation).
* A measured time is scaled to the real depth by FLOPs(real depth) / FLOPs(``--layers``): the layer ratio, with
  the parts outside the layers (embeddings, relative position bias, patchify, final projection) counted once. The
  scale factors are printed. Parameter counts (memory of the weights in bf16) are exact, from the real-depth models.
* fp32 because this kind of CPU has no bf16 units (bf16 is emulated, ~10x slower, which would distort the timings);
  on a GPU both sides run in bf16 and the ratios hold to first order (same matmuls, same FLOPs).

The table also gives the bytes of one stored embedding (T5 256 x 4096 and CLIP 77 x 4096 zero-padded, bf16, plus
the pooled 2048) against one stored X1 latent (16 x H/8 x W/8, fp16), and how many prompts a GB of LRU cache
(``prompt_cache_mb`` of ``PromptEncoder``) holds, so the three options can be weighed: encode on the fly (frozen
encoders resident in bf16), cache per prompt, or store embeddings beside the triples. The last line recommends one,
from the numbers. ``--tiny`` runs the same code at tiny widths in a few seconds (a smoke test; its numbers mean
nothing).

Usage::

    .venv/bin/python -m bench.prompt_cost [--layers 2] [--repeats 2] [--resolutions 512 1024] [--threads 1]
                                          [--cheap 0.1] [--json FILE] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import Row, best_of_interleaved, fmt_times, markdown_table, set_threads

GB = 1e9
MB = 1e6
BF16_BYTES = 2
FP16_BYTES = 2


# ---- configurations ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Architectures and sequence lengths of one setting (SD3-medium, or tiny for the smoke test).

    Attributes:
        name: Shown in the output.
        t5: ``T5Config`` keyword arguments (``num_layers`` is the real depth).
        clip_l: ``CLIPTextConfig`` keyword arguments of CLIP-L (``num_hidden_layers`` is the real depth).
        clip_g: ``CLIPTextConfig`` keyword arguments of CLIP-G.
        network: ``SD3Transformer2DModel`` keyword arguments (``num_layers`` is the real depth).
        t5_tokens: T5 sequence length (the pipeline's ``max_sequence_length``).
        clip_tokens: CLIP sequence length (the tokenizers' ``model_max_length``).
        vae_factor: Pixels per latent pixel along a side.
    """

    name: str
    t5: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    network: dict[str, Any]
    t5_tokens: int = 256
    clip_tokens: int = 77
    vae_factor: int = 8

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent (the network's ``in_channels``)."""
        return int(self.network["in_channels"])

    @property
    def joint_dim(self) -> int:
        """Width of the text sequence the network reads (T5's d_model; CLIP is zero-padded to it)."""
        return int(self.network["joint_attention_dim"])

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector (CLIP-L projection + CLIP-G projection)."""
        return int(self.clip_l["projection_dim"] + self.clip_g["projection_dim"])


SD3_MEDIUM = Sizes(
    name="SD3-medium",
    # google/t5-v1_1-xxl's encoder (SD3's text_encoder_3)
    t5={
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
    },
    # openai/clip-vit-large-patch14's text tower (text_encoder)
    clip_l={
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    # OpenCLIP ViT-bigG/14's text tower (text_encoder_2)
    clip_g={
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    network={
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
)

TINY = Sizes(
    name="tiny (smoke test; the numbers mean nothing)",
    t5={**SD3_MEDIUM.t5, "vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 160, "num_heads": 4},
    clip_l={
        **SD3_MEDIUM.clip_l,
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
    clip_g={
        **SD3_MEDIUM.clip_g,
        "vocab_size": 1000,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_attention_heads": 3,
        "projection_dim": 48,
    },
    network={
        **SD3_MEDIUM.network,
        "sample_size": 16,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 80,
        "pos_embed_max_size": 32,
    },
)


# ---- the measured parts --------------------------------------------------------------------------------------------


def _random(shape: Sequence[int], device: str, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise (an empty tensor on the meta device)."""
    if device == "meta":
        return torch.empty(*shape, device="meta")
    return torch.randn(*shape, generator=generator)


def _token_ids(length: int, vocab: int, device: str, generator: torch.Generator) -> torch.Tensor:
    """One random prompt's token ids, shape (1, length) (zeros on the meta device)."""
    if device == "meta":
        return torch.zeros(1, length, dtype=torch.long, device="meta")
    return torch.randint(vocab, (1, length), generator=generator)


@dataclass
class Part:
    """One model whose per-sample cost is measured.

    Attributes:
        key: Short name (JSON key, timing key).
        label: Name in the output.
        full_layers: The real depth.
        build: ``(layers, device) -> module`` with random weights.
        make_run: ``(module, device) -> callable`` doing one per-sample pass on inputs made once.
        model: Name of the model; parts with the same one time the same built model (the network at each size).
    """

    key: str
    label: str
    full_layers: int
    build: Callable[[int, str], nn.Module]
    make_run: Callable[[nn.Module, str], Callable[[], Any]]
    model: str


def t5_part(sizes: Sizes) -> Part:
    """T5-XXL encoder forward on ``t5_tokens`` tokens, frozen (no grad), as ``_get_t5_prompt_embeds``."""
    from transformers import T5Config, T5EncoderModel

    def build(layers: int, device: str) -> nn.Module:
        config = T5Config(**{**sizes.t5, "num_layers": layers}, is_encoder_decoder=False, use_cache=False)
        with torch.device(device):
            return T5EncoderModel(config).eval().requires_grad_(False)

    def make_run(model: nn.Module, device: str) -> Callable[[], Any]:
        ids = _token_ids(sizes.t5_tokens, sizes.t5["vocab_size"], device, torch.Generator().manual_seed(1))

        @torch.no_grad()
        def run() -> torch.Tensor:
            return model(ids)[0]

        return run

    return Part("t5", f"T5-XXL fwd ({sizes.t5_tokens} tok)", sizes.t5["num_layers"], build, make_run, "T5-XXL")


def clip_part(sizes: Sizes, which: str) -> Part:
    """CLIP-L or CLIP-G text forward on ``clip_tokens`` tokens, frozen, as ``_get_clip_prompt_embeds``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    settings = sizes.clip_l if which == "l" else sizes.clip_g

    def build(layers: int, device: str) -> nn.Module:
        config = CLIPTextConfig(**{**settings, "num_hidden_layers": layers})
        with torch.device(device):
            return CLIPTextModelWithProjection(config).eval().requires_grad_(False)

    def make_run(model: nn.Module, device: str) -> Callable[[], Any]:
        ids = _token_ids(sizes.clip_tokens, settings["vocab_size"], device, torch.Generator().manual_seed(2))

        @torch.no_grad()
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            out = model(ids, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

        return run

    name = "CLIP-L" if which == "l" else "CLIP-G"
    return Part(f"clip_{which}", f"{name} fwd", settings["num_hidden_layers"], build, make_run, name)


def network_part(sizes: Sizes, pixels: int) -> Part:
    """SD3Transformer2DModel forward + backward on one latent (all weights trained, inputs without grad)."""
    from diffusers import SD3Transformer2DModel

    side = pixels // sizes.vae_factor

    def build(layers: int, device: str) -> nn.Module:
        with torch.device(device):
            return SD3Transformer2DModel(**{**sizes.network, "num_layers": layers}).train()

    def make_run(model: nn.Module, device: str) -> Callable[[], Any]:
        generator = torch.Generator().manual_seed(3)
        x = _random((1, sizes.latent_channels, side, side), device, generator)
        target = _random((1, sizes.latent_channels, side, side), device, generator)
        text = _random((1, sizes.clip_tokens + sizes.t5_tokens, sizes.joint_dim), device, generator)
        pooled = _random((1, sizes.pooled_dim), device, generator)
        timestep = torch.full((1,), 500.0, device=device if device == "meta" else "cpu")

        def run() -> float:
            model.zero_grad(set_to_none=True)
            out = model(x, text, pooled, timestep).sample
            loss = (out - target).square().mean()
            loss.backward()
            return 0.0 if device == "meta" else float(loss)

        return run

    label = f"SD3 step @{pixels}px"
    return Part(f"step_{pixels}", label, sizes.network["num_layers"], build, make_run, "SD3 network")


# ---- counting and timing -------------------------------------------------------------------------------------------


@dataclass
class Cost:
    """What one part costs per sample.

    Attributes:
        label: Name in the output.
        layers: Layers built for timing.
        full_layers: The real depth.
        flops_measured: FLOPs of one pass at ``layers``.
        flops_full: FLOPs of one pass at the real depth.
        params_full: Parameters at the real depth.
        times: Every measured time at ``layers`` (seconds).
    """

    label: str
    layers: int
    full_layers: int
    flops_measured: float
    flops_full: float
    params_full: int
    times: list[float] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """FLOPs(real depth) / FLOPs(measured layers): what a measured time is multiplied by."""
        return self.flops_full / self.flops_measured

    @property
    def seconds_full(self) -> float:
        """Best measured time scaled to the real depth."""
        return min(self.times) * self.scale

    @property
    def gflops_per_s(self) -> float:
        """Throughput this CPU reached on this part."""
        return self.flops_measured / min(self.times) / 1e9


def count(part: Part, layers: int) -> float:
    """FLOPs of one pass at ``layers``, on the meta device (nothing allocated or computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = part.make_run(part.build(layers, "meta"), "meta")
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def flops_and_params(part: Part, layers: int) -> tuple[float, float, int]:
    """FLOPs of one pass at ``layers`` and at the real depth; parameters at the real depth.

    Counted at 1 and 2 layers and extended linearly: FLOPs(n) = FLOPs(1) + (n - 1) (FLOPs(2) - FLOPs(1)). That is
    exact here, because only one layer differs from the rest and it is present at every depth: T5's first layer
    (it alone computes the relative position bias) and SD3's last block (``context_pre_only``: it alone drops the
    text stream's feed-forward). Counting the real depth directly gives the same number, ten times slower.
    """
    one, two = count(part, 1), count(part, 2)

    def at(depth: int) -> float:
        return one + (depth - 1) * (two - one)

    with torch.device("meta"):
        params = sum(p.numel() for p in part.build(part.full_layers, "meta").parameters())
    return at(layers), at(part.full_layers), params


def measure(parts: Sequence[Part], layers: int, repeats: int) -> dict[str, Cost]:
    """Count every part's FLOPs (timed and real depth) and time it at ``layers``, interleaved, best of ``repeats``."""
    costs: dict[str, Cost] = {}
    runs: dict[str, Callable[[], Any]] = {}
    models: dict[str, nn.Module] = {}
    for part in parts:
        depth = min(layers, part.full_layers)
        flops_timed, flops_full, params_full = flops_and_params(part, depth)
        costs[part.key] = Cost(part.label, depth, part.full_layers, flops_timed, flops_full, params_full)
        if part.model not in models:
            torch.manual_seed(0)
            start = time.perf_counter()
            models[part.model] = part.build(depth, "cpu")
            print(f"  built {part.model} with {depth} layer(s) in {time.perf_counter() - start:.1f} s", flush=True)
        runs[part.key] = part.make_run(models[part.model], "cpu")
    print(f"  timing {', '.join(runs)}: {repeats} interleaved round(s) ...", flush=True)
    times, _ = best_of_interleaved(runs, repeats)
    for key, measured in times.items():
        costs[key].times = measured
        print(f"    {costs[key].label} ({costs[key].layers} layer(s)): {fmt_times(measured)}", flush=True)
    return costs


# ---- storage and the report ----------------------------------------------------------------------------------------


def embedding_bytes(sizes: Sizes) -> dict[str, int]:
    """Bytes of one prompt's stored embedding, as the pipeline returns it and compact (CLIP not padded)."""
    t5 = sizes.t5_tokens * sizes.joint_dim * BF16_BYTES
    clip_width = sizes.clip_l["hidden_size"] + sizes.clip_g["hidden_size"]
    pooled = sizes.pooled_dim * BF16_BYTES
    return {
        "padded": t5 + sizes.clip_tokens * sizes.joint_dim * BF16_BYTES + pooled,
        "compact": t5 + sizes.clip_tokens * clip_width * BF16_BYTES + pooled,
    }


def latent_bytes(sizes: Sizes, pixels: int) -> int:
    """Bytes of one stored X1 latent in fp16."""
    side = pixels // sizes.vae_factor
    return sizes.latent_channels * side * side * FP16_BYTES


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def _flops(value: float) -> str:
    return f"{value / 1e12:.3g} TFLOP" if value >= 1e11 else f"{value / 1e9:.3g} GFLOP"


def _bytes(value: float) -> str:
    for unit, size in (("GB", GB), ("MB", MB), ("kB", 1e3)):
        if value >= 0.5 * size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def silence() -> None:
    """Hide diffusers' and transformers' warnings (``bench.common.silence_libraries`` without importing Lightning,
    which this benchmark does not use and which takes seconds to import)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    diffusers_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def rows_of(sizes: Sizes, costs: dict[str, Cost], resolutions: Sequence[int]) -> list[Row]:
    """The table: encoders' time and FLOPs against the step at each resolution; weights; bytes.

    Every ratio is measured / baseline.
    """
    t5, clip_l, clip_g = costs["t5"], costs["clip_l"], costs["clip_g"]
    clip_seconds = clip_l.seconds_full + clip_g.seconds_full
    clip_flops = clip_l.flops_full + clip_g.flops_full
    rows: list[Row] = []
    for pixels in resolutions:
        step = costs[f"step_{pixels}"]
        for name, seconds, flops in (
            (t5.label, t5.seconds_full, t5.flops_full),
            ("CLIP-L + CLIP-G fwd", clip_seconds, clip_flops),
        ):
            rows += [
                Row(
                    f"{name} vs step @{pixels}px, CPU time",
                    f"{_seconds(seconds)} ({seconds / step.seconds_full:.1%})",
                    _seconds(step.seconds_full),
                    seconds / step.seconds_full,
                ),
                Row(
                    f"{name} vs step @{pixels}px, FLOPs",
                    f"{_flops(flops)} ({flops / step.flops_full:.1%})",
                    _flops(step.flops_full),
                    flops / step.flops_full,
                ),
            ]
    network_bf16 = costs[f"step_{resolutions[0]}"].params_full * BF16_BYTES
    net = f"{_bytes(network_bf16)} (SD3 network)"
    t5_bf16 = t5.params_full * BF16_BYTES
    clip_bf16 = (clip_l.params_full + clip_g.params_full) * BF16_BYTES
    rows += [
        Row(f"T5-XXL weights, bf16 ({t5.params_full / 1e9:.3g}B params)", _bytes(t5_bf16), net, t5_bf16 / network_bf16),
        Row("CLIP-L + CLIP-G weights, bf16", _bytes(clip_bf16), net, clip_bf16 / network_bf16),
    ]
    embedding = embedding_bytes(sizes)["padded"]
    for pixels in resolutions:
        latent = latent_bytes(sizes, pixels)
        side = pixels // sizes.vae_factor
        rows.append(
            Row(
                f"one stored embedding vs X1 latent {sizes.latent_channels}x{side}x{side} fp16",
                _bytes(embedding),
                _bytes(latent),
                embedding / latent,
            )
        )
    rows.append(Row("prompts one GB of LRU cache holds (padded bf16 embeddings)", f"{GB / embedding:.0f}", "-", None))
    return rows


def encoder_share(costs: dict[str, Cost], pixels: int) -> tuple[float, float]:
    """All three encoders' forward per sample / the network step at ``pixels``: by CPU time, by FLOPs."""
    step = costs[f"step_{pixels}"]
    encoders = [costs[key] for key in ("t5", "clip_l", "clip_g")]
    by_time = sum(c.seconds_full for c in encoders) / step.seconds_full
    return by_time, sum(c.flops_full for c in encoders) / step.flops_full


def recommend(
    sizes: Sizes, costs: dict[str, Cost], resolutions: Sequence[int], cheap: float
) -> tuple[str, dict[str, Any]]:
    """Two lines from the numbers: what each option costs, then encode on the fly, cache per prompt, or store.

    The choice is made at the native (largest) resolution: on the fly when the encoders cost less than ``cheap`` of a
    step by time and by FLOPs; otherwise precomputed. Within 20 % of ``cheap`` the line says it is borderline.
    """
    native = max(resolutions)
    shares = {pixels: encoder_share(costs, pixels) for pixels in resolutions}
    by_time, by_flops = shares[native]
    encoders = [costs[key] for key in ("t5", "clip_l", "clip_g")]
    params = costs[f"step_{native}"].params_full
    encoder_gb = sum(c.params_full for c in encoders) * BF16_BYTES / GB
    network_gb, training_gb = params * BF16_BYTES / GB, params * 16 / GB  # 16: fp32 weights, grads, AdamW moments
    embedding = embedding_bytes(sizes)["padded"]
    per_latent = embedding / latent_bytes(sizes, native)
    figures = {
        "encoders_vs_step": {str(pixels): {"time": t, "flops": f} for pixels, (t, f) in shares.items()},
        "encoders_bf16_gb": encoder_gb,
        "network_bf16_gb": network_gb,
        "network_training_state_gb": training_gb,
        "embedding_vs_latent": per_latent,
        "prompts_per_gb": GB / embedding,
    }
    per_size = "; ".join(f"@{pixels}px +{t:.0%} by time, +{f:.0%} by FLOPs" for pixels, (t, f) in shares.items())
    head = (
        f"encoding on the fly (T5 + CLIP-L + CLIP-G per sample) adds to a step {per_size}, and keeps "
        f"{_bytes(encoder_gb * GB)} of bf16 encoder weights resident ({encoder_gb / network_gb:.1f}x the network's "
        f"bf16 weights, {encoder_gb / training_gb:.0%} of its {_bytes(training_gb * GB)} fp32 + AdamW training state); "
        f"a stored embedding ({_bytes(embedding)}) is {per_latent:.1f}x an X1 latent at {native}px; an LRU cache holds "
        f"{GB / embedding:.0f} prompts per GB"
    )
    overhead = max(by_time, by_flops)
    borderline = " (borderline: within 20% of the threshold)" if abs(overhead - cheap) < 0.2 * cheap else ""
    if overhead >= cheap:
        advice = (
            f"RECOMMENDATION @{native}px: precompute, not on the fly (+{overhead:.0%} >= {cheap:.0%} of a step"
            f"{borderline}): repeating prompts -> prompt_cache_mb LRU; unique prompts -> store embeddings beside "
            f"the triples (+{per_latent:.1f}x dataset bytes); either way the encoders leave the training device"
        )
    else:
        advice = (
            f"RECOMMENDATION @{native}px: encode on the fly, frozen, bf16 (+{overhead:.0%} < {cheap:.0%} of a step"
            f"{borderline}), with prompt_cache_mb when prompts repeat; store embeddings (+{per_latent:.1f}x dataset "
            f"bytes) only to free the {_bytes(encoder_gb * GB)} of encoder weights"
        )
    return f"{head}.\n{advice}.", figures


# ---- main ----------------------------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=2, help="layers built for timing (full width); times are scaled to full depth"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds (the best counts)")
    parser.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=[512, 1024],
        help="image sides in pixels (latent side = /8); the largest is the native one the recommendation uses",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared 2-core machine)"
    )
    parser.add_argument(
        "--cheap",
        type=float,
        default=0.10,
        help="encoding on the fly counts as cheap below this fraction of a step (by time or FLOPs, whichever is more)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny widths and resolutions 128 256: a smoke test of a few seconds"
    )
    opts = parser.parse_args(argv)
    if opts.layers < 1 or opts.repeats < 1:
        parser.error("--layers and --repeats must be at least 1")
    if opts.tiny and opts.resolutions == parser.get_default("resolutions"):
        opts.resolutions = [128, 256]
    opts.resolutions = sorted(set(opts.resolutions))
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; print the table and the recommendation; write the JSON (with ``--json``); return the results."""
    opts = _parse(argv)
    wall = time.perf_counter()
    silence()
    set_threads(opts.threads)
    sizes = TINY if opts.tiny else SD3_MEDIUM
    load = os.getloadavg()[0]
    print(
        f"# prompt encoding vs network step, {sizes.name}: per sample (batch 1), fp32, random weights, "
        f"{opts.layers} layer(s) timed, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or 'CPU'}, load average {load:.2f}",
        flush=True,
    )
    parts = [t5_part(sizes), clip_part(sizes, "l"), clip_part(sizes, "g")]
    parts += [network_part(sizes, pixels) for pixels in opts.resolutions]
    costs = measure(parts, opts.layers, opts.repeats)
    print("\nscaled to the real depth by FLOPs(real depth) / FLOPs(timed layers); CPU throughput at the timed depth:")
    for cost in costs.values():
        print(
            f"  {cost.label}: {cost.layers} -> {cost.full_layers} layers, x{cost.scale:.2f} "
            f"(layer ratio {cost.full_layers / cost.layers:.2f}); {cost.gflops_per_s:.1f} GFLOP/s"
        )
    rows = rows_of(sizes, costs, opts.resolutions)
    line, figures = recommend(sizes, costs, opts.resolutions, opts.cheap)
    table = markdown_table(rows)
    print(
        "\nratio = measured / baseline. Times: fp32 on this CPU, scaled to full depth (24 T5 layers, 12 CLIP-L, "
        "32 CLIP-G, 24 SD3 blocks); bf16 on a GPU changes both sides alike to first order. Step = SD3 forward + "
        "backward (no optimizer step, no gradient checkpointing: recomputation would add ~1/3 to the step).\n"
    )
    print(table)
    print(f"\n{line}")
    print(f"\n(wall time {time.perf_counter() - wall:.0f} s)")
    result = {
        "sizes": asdict(sizes),
        "layers": opts.layers,
        "repeats": opts.repeats,
        "threads": torch.get_num_threads(),
        "resolutions": opts.resolutions,
        "torch": torch.__version__,
        "load_average_start": load,
        "costs": {
            key: {
                **asdict(cost),
                "scale": cost.scale,
                "seconds_full": cost.seconds_full,
                "gflops_per_s": cost.gflops_per_s,
            }
            for key, cost in costs.items()
        },
        "embedding_bytes": embedding_bytes(sizes),
        "latent_bytes": {str(pixels): latent_bytes(sizes, pixels) for pixels in opts.resolutions},
        "figures": figures,
        "rows": [asdict(row) for row in rows],
        "table": table,
        "recommendation": line,
    }
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(result, indent=2))
        print(f"results: {opts.json}")
    return result


if __name__ == "__main__":
    main()
