"""FLUX.1 [dev] at real size without allocating it: the reflow step's peak memory, and T5's cost against a step.

FLUX.1 [dev]'s transformer has 12B parameters (24 GB in bf16) and its prompts go through T5-XXL (4.8B): neither fits
this machine, so the step is run on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
strides, no data) and every storage an operation creates is counted while it lives (:class:`PeakMemory`, a
``TorchDispatchMode`` that adds a storage's bytes when it appears and subtracts them when it is freed). The step is
the reflow step of ``ReflowModule`` on FLUX.1 [dev]'s architecture (``transformer/config.json``, random weights):
the project's LoRA adapters (``modules/lora.py``, peft) on the attention projections, the transformer's gradient
checkpointing, Flux's call (``families/flux.py``: packed latents, guidance input), the velocity-matching loss in
fp32, backward and an AdamW step, twice (the second step holds the optimizer state). Two precision layouts:

* ``bf16-true`` (Lightning's ``precision: bf16-true``): every weight, adapter, gradient and AdamW moment in bf16.
* ``bf16-mixed`` (``precision: bf16-mixed``): weights in fp32 (the frozen 12B too: the module keeps one dtype),
  activations in bf16 under autocast.

Attention on fake CPU tensors takes PyTorch's flash kernel for CPUs, which keeps what CUDA's flash attention keeps
(output and log-sum-exp, no N x N matrix). The frozen text encoders (T5-XXL and CLIP-L in bf16, ``text_dtype:
bf16``) are resident beside the step: their weights are added, counted exactly on the meta device.

**Validation.** The same counting on real tensors, at a size that fits here (FLUX.1's full widths, 1 double and 1
single block, fp32, 256 px, 128 T5 tokens), is checked two ways in a fresh child process: the count on real tensors
equals the count on fake ones (the fake run is the real run's bookkeeping), and the process's peak RSS growth during
the step (``VmHWM``, reset before the step) is within a few percent of the count (the count leaves out only the
allocator's slack). ``--tiny`` runs everything at tiny widths in seconds (a smoke test; numbers mean nothing).

**T5 against a step.** FLOPs of T5-XXL's forward on 512 tokens and CLIP-L's on 77 against the LoRA reflow step
(forward, checkpoint recomputation, backward), counted with ``FlopCounterMode`` on fake tensors at full depth.

Usage::

    .venv/bin/python -m bench.flux_memory [--tiny] [--json FILE] [--skip-validation]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from bench.prompt_cost import SD3_MEDIUM

GiB = 2**30
GB = 1e9
GPUS_GB = (24, 40, 80)
"""GPU memory sizes of the "what fits" table (decimal GB, as vendors state them)."""
HEADROOM = 0.95
"""Share of a GPU's memory a run may plan on (the CUDA context and the allocator's fragmentation take the rest)."""

FLUX_DEV: dict[str, Any] = {
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
TINY_FLUX: dict[str, Any] = {
    **FLUX_DEV,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "num_layers": 2,
    "num_single_layers": 4,
    "axes_dims_rope": [4, 4, 8],
}
T5_XXL: dict[str, Any] = dict(SD3_MEDIUM.t5)
"""google/t5-v1_1-xxl's encoder: FLUX.1's text_encoder_2 is the T5 SD3 uses (bench/prompt_cost.py states it)."""
CLIP_L: dict[str, Any] = {k: v for k, v in SD3_MEDIUM.clip_l.items() if k != "projection_dim"}
"""openai/clip-vit-large-patch14's text tower: FLUX.1's text_encoder (its pooled output only)."""
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
"""The adapters of configs/flux/reflow_lora.yaml: the attention projections of both streams."""
VAE_FACTOR = 8


# ---- counting live storages ----------------------------------------------------------------------------------------


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, while the mode is active.

    A storage counts from the operation that creates it (or from the start, for ``existing`` tensors) until it is
    freed; views and in-place results share their storage and count once. Works on fake and real tensors alike.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        for tensor in existing:
            self._track(tensor)
        self.start = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._known:
            return
        size = storage.nbytes()
        self._known[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


# ---- the reflow step -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured step.

    Attributes:
        pixels: Image side (latents pixels / 8, packed into (pixels / 16) ** 2 tokens).
        batch: Samples per step.
        rank: LoRA rank (alpha = rank).
        layout: ``bf16-true``, ``bf16-mixed`` or ``fp32``.
        tokens: T5 tokens of a prompt (``max_sequence_length``).
    """

    pixels: int
    batch: int
    rank: int
    layout: str = "bf16-true"
    tokens: int = 512


def _weights_dtype(layout: str) -> torch.dtype:
    return torch.bfloat16 if layout == "bf16-true" else torch.float32


def build_network(config: dict[str, Any], case: Case, fake: torch._subclasses.FakeTensorMode | None) -> nn.Module:
    """The transformer with the project's LoRA adapters and gradient checkpointing: built on the meta device, then
    given fake CPU storages (``fake``) or real, initialised ones."""
    from diffusers import FluxTransformer2DModel

    from instaflow_pl.modules.lora import LoraOptions, add_lora

    default = torch.get_default_dtype()
    torch.set_default_dtype(_weights_dtype(case.layout))
    try:
        with torch.device("meta"):
            network = FluxTransformer2DModel(**config)
        add_lora(network, LoraOptions(rank=case.rank, alpha=float(case.rank), target_modules=TARGETS))
    finally:
        torch.set_default_dtype(default)
    network.enable_gradient_checkpointing()
    network.train()
    if fake is None:
        network.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in [*network.parameters(), *network.buffers()]:  # touch every page: RSS counts it
                tensor.copy_(torch.randn(tensor.shape, generator=generator).mul_(0.02))
        return network
    converter = fake.fake_tensor_converter
    cpu = torch.device("cpu")
    for module in network.modules():  # assigned directly: fake tensors cannot be swapped in by Module._apply
        for name, param in list(module._parameters.items()):
            if param is not None:
                fake_param = converter.from_meta_and_device(fake, param, cpu)
                module._parameters[name] = nn.Parameter(fake_param, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = converter.from_meta_and_device(fake, buffer, cpu)
    return network


def _inputs(config: dict[str, Any], case: Case) -> dict[str, torch.Tensor]:
    side = case.pixels // VAE_FACTOR
    channels = config["in_channels"] // 4
    dtype = torch.float32 if case.layout == "fp32" else torch.bfloat16
    generator = torch.Generator().manual_seed(1)
    return {
        "x0": torch.randn(case.batch, channels, side, side, generator=generator),
        "x1": torch.randn(case.batch, channels, side, side, generator=generator),
        "embeds": torch.randn(case.batch, case.tokens, config["joint_attention_dim"], generator=generator).to(dtype),
        "pooled": torch.randn(case.batch, config["pooled_projection_dim"], generator=generator).to(dtype),
    }


def reflow_steps(network: nn.Module, inputs: dict[str, torch.Tensor], case: Case, steps: int = 2) -> None:
    """``steps`` reflow steps as ``ReflowModule`` takes them: X_t = t X1 + (1 - t) X0, the network's velocity (Flux's
    call), mean squared error against X1 - X0 in fp32, backward, AdamW."""
    from instaflow_pl.families import FAMILIES
    from instaflow_pl.velocity.condition import TextCondition

    flux = FAMILIES["flux"]
    trained = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, foreach=True)
    cond = TextCondition(inputs["embeds"], pooled=inputs["pooled"]).with_guidance(3.5)
    dtype = next(network.parameters()).dtype
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.layout == "bf16-mixed")
    for _ in range(steps):
        t = torch.full((case.batch, 1, 1, 1), 0.5)
        x = (t * inputs["x1"] + (1 - t) * inputs["x0"]).to(dtype)
        with autocast:
            out = flux.call(network, x, (1 - t.flatten()) * 1000, cond, VAE_FACTOR)
        loss = (flux.velocity_sign * out.float() - (inputs["x1"] - inputs["x0"])).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, loss, x


def step_memory(config: dict[str, Any], case: Case, fake: bool = True) -> dict[str, float]:
    """Peak and fixed bytes of two reflow steps (fixed: weights and inputs before the first step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode() if fake else None
    network = build_network(config, case, mode)  # on meta first: peft cannot move fake tensors
    with mode if mode is not None else contextlib.nullcontext():
        inputs = _inputs(config, case)
        tensors = [*network.parameters(), *network.buffers(), *inputs.values()]
        counter = PeakMemory(tensors)
        with counter:
            reflow_steps(network, inputs, case)
    params = sum(p.numel() for p in network.parameters())
    trained = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return {"peak": counter.peak, "fixed": counter.start, "params": params, "trained": trained}


def text_encoder_bytes(t5: dict[str, Any], clip: dict[str, Any]) -> int:
    """Bytes of T5-XXL's encoder and CLIP-L's text tower in bf16 (parameters counted on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5_model = T5EncoderModel(T5Config(**t5, is_encoder_decoder=False, use_cache=False))
        clip_model = CLIPTextModel(CLIPTextConfig(**clip))
    params = sum(p.numel() for m in (t5_model, clip_model) for p in m.parameters())
    return params * 2


# ---- T5 against a step ---------------------------------------------------------------------------------------------


def encoder_flops(t5: dict[str, Any], clip: dict[str, Any], tokens: int) -> dict[str, float]:
    """Forward FLOPs of T5 on ``tokens`` tokens and CLIP-L on 77, one prompt, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    flops = {}
    with FakeTensorMode(), torch.no_grad():
        for name, build, length in (
            ("t5", lambda: T5EncoderModel(T5Config(**t5, is_encoder_decoder=False, use_cache=False)), tokens),
            ("clip_l", lambda: CLIPTextModel(CLIPTextConfig(**clip)), 77),
        ):
            model = build().eval()
            ids = torch.zeros(1, length, dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                model(ids)
            flops[name] = float(counter.get_total_flops())
    return flops


def step_flops(config: dict[str, Any], case: Case) -> float:
    """FLOPs of one LoRA reflow step per sample (forward, checkpoint recomputation, backward), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    mode = FakeTensorMode()
    network = build_network(config, case, mode)
    with mode:
        inputs = _inputs(config, case)
        with FlopCounterMode(display=False) as counter:
            reflow_steps(network, inputs, case, steps=1)
    return float(counter.get_total_flops()) / case.batch


# ---- validation against a real run ---------------------------------------------------------------------------------


def child(config: dict[str, Any], case: Case) -> dict[str, float]:
    """In a fresh process: the count on real tensors and the peak RSS growth during the same steps."""
    from bench.memory import _current_rss, _peak_rss, _reset_peak_rss

    torch.set_num_threads(1)
    network = build_network(config, case, None)
    inputs = _inputs(config, case)
    reflow_steps(network, inputs, case, steps=1)  # warm up kernels and the optimizer; counted below afresh
    _release_free_memory()
    counter = PeakMemory([*network.parameters(), *network.buffers(), *inputs.values()])
    reset = _reset_peak_rss()
    before = _current_rss()
    with counter:
        reflow_steps(network, inputs, case)
    return {"count": counter.peak - counter.start, "rss_growth": _peak_rss() - before, "reset": reset}


def _release_free_memory() -> None:
    """Give memory malloc keeps after frees back to the system (glibc), so RSS growth is new memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def validate(config: dict[str, Any], case: Case) -> dict[str, float]:
    """Fake count, real count and RSS growth of the same steps (the real ones in a child process)."""
    fake = step_memory(config, case, fake=True)
    script = (
        "import json, sys; from bench.flux_memory import Case, child; "
        "print(json.dumps(child(json.loads(sys.argv[1]), Case(**json.loads(sys.argv[2])))))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "MALLOC_MMAP_THRESHOLD_": "65536",  # glibc maps every block >= 64 KiB and unmaps it when freed: RSS follows
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config), json.dumps(asdict(case))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"validation child failed:\n{proc.stderr[-3000:]}")
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fake_count": fake["peak"] - fake["fixed"], **real}


# ---- the report ----------------------------------------------------------------------------------------------------


def largest_batch(one: float, two: float, capacity: float, limit: int = 256) -> int:
    """The largest batch whose peak (linear in the batch through the batch-1 and batch-2 peaks) fits ``capacity``."""
    per_sample = two - one
    fits = 0
    for batch in range(1, limit + 1):
        if one + (batch - 1) * per_sample <= capacity:
            fits = batch
    return fits


def run(tiny: bool, validation: bool) -> dict[str, Any]:
    """Measure everything; print the tables; return the figures."""
    config = TINY_FLUX if tiny else FLUX_DEV
    t5 = {**T5_XXL, "d_model": 64, "d_kv": 16, "d_ff": 160, "num_heads": 4, "vocab_size": 1000} if tiny else T5_XXL
    clip = {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2} if tiny else CLIP_L
    resolutions = (64, 128) if tiny else (512, 1024)
    ranks = (16, 64)
    text = text_encoder_bytes(t5, clip)
    print(f"# FLUX.1 reflow step memory ({'tiny smoke test' if tiny else 'FLUX.1 [dev] architecture'}), fake tensors")
    print(f"frozen text encoders resident (T5-XXL + CLIP-L, bf16): {text / GiB:.2f} GiB", flush=True)
    results: dict[str, Any] = {"text_encoders_bytes": text, "steps": [], "fits": []}
    for layout in ("bf16-true", "bf16-mixed"):
        for pixels in resolutions:
            for rank in ranks if layout == "bf16-true" else ranks[:1]:
                start = time.perf_counter()
                one, two = (step_memory(config, Case(pixels, batch, rank, layout)) for batch in (1, 2))
                row = {"layout": layout, "pixels": pixels, "rank": rank, "peak_1": one["peak"],
                       "peak_2": two["peak"], "fixed": one["fixed"], "params": one["params"],
                       "trained": one["trained"]}  # fmt: skip
                results["steps"].append(row)
                extra = (two["peak"] - one["peak"]) / GiB
                print(
                    f"  {layout} {pixels}px rank {rank}: weights+inputs {one['fixed'] / GiB:.2f} GiB, peak batch 1 "
                    f"{one['peak'] / GiB:.2f} GiB, batch 2 {two['peak'] / GiB:.2f} GiB (+{extra:.2f} per sample); "
                    f"{one['params'] / 1e9:.2f}B params, {one['trained'] / 1e6:.1f}M trained "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    gpus = " | ".join(f"{gb} GB" for gb in GPUS_GB)
    print(f"\n| layout | px | LoRA rank | peak, batch 1 (+ per sample) | {gpus} |")
    print("|---|---|---|---|" + "---|" * len(GPUS_GB))
    for row in results["steps"]:
        cells = []
        for gb in GPUS_GB:
            capacity = gb * GB * HEADROOM
            with_t5 = largest_batch(row["peak_1"] + text, row["peak_2"] + text, capacity)
            without = largest_batch(row["peak_1"], row["peak_2"], capacity)
            results["fits"].append({**{k: row[k] for k in ("layout", "pixels", "rank")}, "gpu_gb": gb,
                                    "batch_with_t5": with_t5, "batch_without_t5": without})  # fmt: skip
            cells.append(f"{with_t5 or '-'} ({without or '-'})")
        per_sample = (row["peak_2"] - row["peak_1"]) / GiB
        print(f"| {row['layout']} | {row['pixels']} | {row['rank']} | {(row['peak_1'] + text) / GiB:.1f} GiB "
              f"(+{per_sample:.2f}) | " + " | ".join(cells) + " |")  # fmt: skip
    print("cells: the largest per-GPU batch with T5 + CLIP-L resident (in brackets: with embeddings precomputed);")
    print(f"planned on {HEADROOM:.0%} of the GPU's memory; '-': not even batch 1.")

    tokens = 512
    encoders = encoder_flops(t5, clip, tokens)
    results["flops"] = {"encoders": encoders, "step": {}}
    print(f"\n# T5 + CLIP-L encoding ({tokens} + 77 tokens) against a LoRA reflow step (per sample, FLOPs)")
    for pixels in resolutions:
        step = step_flops(config, Case(pixels, 1, ranks[0]))
        results["flops"]["step"][str(pixels)] = step
        share = (encoders["t5"] + encoders["clip_l"]) / step
        print(f"  @{pixels}px: T5 {encoders['t5'] / 1e12:.3g} TFLOP + CLIP-L {encoders['clip_l'] / 1e12:.3g} TFLOP "
              f"= {share:.1%} of the step's {step / 1e12:.3g} TFLOP")  # fmt: skip

    if validation:
        small = {**config, "num_layers": 1, "num_single_layers": 1} if not tiny else config
        case = Case(128 if tiny else 256, 1, 16, "fp32", 32 if tiny else 128)
        blocks = f"{small['num_layers']} double + {small['num_single_layers']} single block(s)"
        print(f"\n# validation: {blocks} at the setting's width, fp32, {case.pixels}px, {case.tokens} T5 tokens, "
              "real tensors in a child process", flush=True)  # fmt: skip
        checked = validate(small, case)
        results["validation"] = {"case": asdict(case), **checked}
        ratio = checked["rss_growth"] / max(checked["count"], 1)
        print(f"  step memory above the weights: fake count {checked['fake_count'] / GiB:.3f} GiB, real count "
              f"{checked['count'] / GiB:.3f} GiB, peak RSS growth {checked['rss_growth'] / GiB:.3f} GiB "
              f"(RSS / count = {ratio:.3f}; peak reset: {checked['reset']})")  # fmt: skip
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the options, run, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of seconds")
    parser.add_argument("--skip-validation", action="store_true", help="no real run (the child process)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    opts = parser.parse_args(argv)
    from bench.prompt_cost import silence

    silence()
    start = time.perf_counter()
    results = run(opts.tiny, not opts.skip_validation)
    print(f"\n(wall time {time.perf_counter() - start:.0f} s, torch {torch.__version__})")
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
