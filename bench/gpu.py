"""One GPU, Stable Diffusion 1.5 shapes and every family's, nothing downloaded: throughput, memory and latency.

Builds the random SD 1.5 folder on the machine (``bench.scale.sd15_folder``), then measures:

1. pair generation images/s in fp16 (DPM-Solver++ 25 steps, guidance 6), the project's teacher against diffusers'
   ``StableDiffusionPipeline`` on the same GPU and latents, plain and with ``compile`` (goals >= 1.0x and >= 1.2x);
2. reflow and distill-l2 samples/s in bf16 autocast at per-GPU batch 8 and 16 (full fine-tuning, UNet gradient
   checkpointing, fused AdamW, EMA), peak memory, and model FLOPs utilisation: the UNet's forward + backward FLOPs
   per sample counted with ``torch.utils.flop_counter`` (checkpointing's recomputation not counted), divided by the
   GPU's dense bf16 peak (``--peak-tflops``; 989 for H100/H200 SXM);
3. distill-lpips peak memory at 512 px, naive against lean (decoder checkpointing, bf16 decode, resize 224);
4. latency of the one-step student against the 25-step guided teacher at batch 1 and 8 (goal >= 40x);
5. a reflow training step of each family's network (SD 1.5 and SDXL UNets, SD3.5 Large and FLUX.1 [dev]
   transformers; the digits MLP has no real size) at its native latents, built from its published config with random
   weights but a few blocks (UNets: one ResNet and one transformer layer per level; transformers: 2 blocks, FLUX 1
   double and 2 single), bf16 autocast, gradient checkpointing, fused AdamW, EMA: step time, samples/s, peak memory
   and MFU of what ran, its FLOPs and the full network's counted by ``torch.utils.flop_counter`` on the meta device,
   and the full-depth step time that the FLOP ratio gives at the same MFU;
6. with 2+ GPUs visible, ``instaflow-pl fit`` of ``configs/sd15/reflow.yaml`` with ``--trainer.strategy=sharded`` on
   them (random pairs): step time, samples/s, peak memory per rank, MFU (on 1 GPU: "skipped: needs 2+ GPUs").

Each part runs under a time guard (:data:`GUARDS_S`), and the whole run within ``--budget-s`` (8 minutes): a part
that runs past its guard or fails becomes one FAILED row, the others still run, and the exit status is 1. It prints
one markdown table and writes JSON (with each part's seconds). ``--tiny`` runs every part on the CPU at tiny shapes,
the family rows on each family's tiny fixture, without guards and with errors raised (the tests run it); the goals
only mean something on a GPU.

Usage::

    python -m bench.gpu [--out outputs/bench/gpu.json] [--peak-tflops 989] [--budget-s 480] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO, Row, markdown_table, read_prompts

GiB = 2**30


@dataclass
class Setup:
    """What the run uses.

    Attributes:
        folder: The model folder (random SD 1.5, or tiny).
        device: ``cuda`` or ``cpu``.
        teacher_dtype: Teacher weights (fp16 on a GPU).
        batches: Training batch sizes.
        latency_batches: Sampling batch sizes.
        steps: Timed training steps (after warm-up).
        teacher_steps: DPM-Solver++ steps of the teacher.
        compile_backend: torch.compile backend (``inductor``; ``eager`` for the quick CPU check).
        lpips_batch: Batch of the LPIPS memory check.
        bf16: Train under bf16 autocast (on a GPU; CPUs without bf16 units emulate it, slowly).
        rounds: Timed repetitions of each measurement (the best counts).
    """

    folder: Path
    device: str
    teacher_dtype: str
    batches: tuple[int, ...]
    latency_batches: tuple[int, ...]
    steps: int
    teacher_steps: int
    compile_backend: str
    lpips_batch: int
    bf16: bool = True
    rounds: int = 3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], device: str, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None


def _noise(setup: Setup, batch: int, shape) -> torch.Tensor:
    from instaflow_pl.conventions import noise_for_indices

    return noise_for_indices(0, range(batch), shape).to(setup.device)


# ---- 1. pair generation ---------------------------------------------------------------------------------------------


def pairs(setup: Setup, batch: int = 8) -> list[Row]:
    """Images/s of the teacher (plain, compiled) against diffusers' pipeline, same latents."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from instaflow_pl.speed import speed_up
    from instaflow_pl.teachers import load_teacher

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[setup.teacher_dtype]
    prompts = read_prompts(batch)[:batch]
    teacher = load_teacher(setup.folder, solver="dpm++", steps=setup.teacher_steps, dtype=setup.teacher_dtype)
    teacher.to(setup.device)
    x0 = _noise(setup, batch, teacher.latent_shape)
    pipe = StableDiffusionPipeline.from_pretrained(setup.folder, dtype=dtype, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(setup.device)

    def ours() -> torch.Tensor:
        return teacher.sample(x0, prompts, guidance=6.0).x

    def theirs() -> torch.Tensor:
        return pipe(
            prompt=prompts,
            guidance_scale=6.0,
            num_inference_steps=setup.teacher_steps,
            latents=x0.to(dtype),
            output_type="latent",
        ).images

    ours(), theirs()  # warm-up
    t_pipe, t_ours = _best(theirs, setup.device, setup.rounds), _best(ours, setup.device, setup.rounds)
    error = ((ours().float() - theirs().float()).abs().max() / theirs().float().abs().max()).item()
    speed_up(teacher.model.network, compile=True, backend=setup.compile_backend)
    ours()  # compile
    t_compiled = _best(ours, setup.device, setup.rounds)
    rate = {name: batch / t for name, t in (("pipe", t_pipe), ("ours", t_ours), ("compiled", t_compiled))}
    label = f"pairs {setup.teacher_dtype}, DPM++ {setup.teacher_steps} steps, CFG 6, batch {batch}, images/s"
    return [
        Row(
            f"{label} (rel. err {error:.1e})",
            f"{rate['ours']:.2f}",
            f"{rate['pipe']:.2f} (diffusers)",
            rate["ours"] / rate["pipe"],
            goal_min=1.0,
        ),
        Row(
            f"{label}, compile",
            f"{rate['compiled']:.2f}",
            f"{rate['pipe']:.2f} (diffusers)",
            rate["compiled"] / rate["pipe"],
            goal_min=1.2,
        ),
    ]


# ---- 2. training throughput and MFU ------------------------------------------------------------------------------


def unet_train_flops(folder: Path, device: str, shape) -> float:
    """Forward + backward FLOPs of the UNet per sample (no checkpointing recomputation), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from instaflow_pl.model_folder import ModelFolder

    unet = ModelFolder.open(folder).load_network().to(device)
    x = torch.randn(1, *shape, device=device)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500.0], device=device), encoder_hidden_states=embeds).sample.sum().backward()
    del unet
    return float(counter.get_total_flops())


def _module(kind: str, folder: Path, **extra: Any):
    from instaflow_pl.modules import DistillModule, ReflowModule

    cls = ReflowModule if kind == "reflow" else DistillModule
    return cls(str(folder), gradient_checkpointing=True, ema_decay=0.9999, val_steps=[1], **extra)


def _batch(setup: Setup, size: int, shape):
    from instaflow_pl.data.triples import TripleBatch

    prompts = read_prompts(size)[:size]
    x0 = _noise(setup, size, shape)
    return TripleBatch(x0, torch.randn_like(x0), prompts, torch.arange(size))


def train_steps(setup: Setup, module, size: int, steps: int) -> tuple[float, float | None]:
    """Seconds per step (best of ``steps`` timed steps after 2 warm-up steps) and peak memory."""
    module.to(setup.device).train()
    params = [p for p in module.velocity.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=setup.device == "cuda")
    batch = _batch(setup, size, _shape(module))

    def step() -> None:
        with torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.bf16):
            loss = module.compute_loss(batch, module.condition(batch.prompts)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(module.velocity)

    _reset_peak(setup.device)
    step()
    seconds = _best(step, setup.device, rounds=steps)
    return seconds, _peak_gib(setup.device)


def _shape(module) -> tuple[int, int, int]:
    from instaflow_pl.families import latent_geometry

    return latent_geometry(module.velocity.network).shape


def training(setup: Setup, peak_tflops: float) -> list[Row]:
    """Reflow and distill-l2 samples/s, memory and MFU at each batch size."""
    rows = []
    flops = None
    for kind in ("reflow", "distill"):
        for size in setup.batches:
            module = _module(kind, setup.folder)
            if flops is None:
                flops = unet_train_flops(setup.folder, setup.device, _shape(module))
            seconds, peak = train_steps(setup, module, size, setup.steps)
            rate = size / seconds
            mfu = flops * rate / (peak_tflops * 1e12)
            memory = f"{peak:.1f} GiB" if peak is not None else "(CPU)"
            precision = "bf16" if setup.bf16 else "fp32"
            label = f"{kind}{'-l2' if kind == 'distill' else ''} {precision}, batch {size}: samples/s, peak memory, MFU"
            rows.append(Row(f"{label} vs {peak_tflops:g} TFLOPS", f"{rate:.2f}/s, {memory}", f"MFU {mfu:.1%}", None))
            del module
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---- 3. lean LPIPS ----------------------------------------------------------------------------------------------


def lpips_memory(setup: Setup) -> list[Row]:
    """Peak memory of a distill-lpips step, naive against lean (GPU memory; on CPU only that both run)."""
    lean = {"lpips_checkpointing": True, "lpips_dtype": "bf16" if setup.bf16 else "fp32", "lpips_resize": 224}
    peaks = {}
    for name, options in (("naive", {}), ("lean", lean)):
        module = _module("distill", setup.folder, distance={"lpips": 1.0, "l2": 1.0}, lpips_pretrained=False, **options)
        module.velocity.requires_grad_(False)
        module.velocity.network.conv_out.requires_grad_(True)  # the student's path still needs grad, the UNet state not
        _, peak = train_steps(setup, module, setup.lpips_batch, 1)
        peaks[name] = peak
        del module
    if setup.device != "cuda":
        return [Row(f"distill-lpips step, batch {setup.lpips_batch}: naive and lean run", "ran", "ran", None)]
    return [
        Row(
            f"distill-lpips peak memory, batch {setup.lpips_batch} (UNet frozen but conv_out)",
            f"{peaks['lean']:.1f} GiB (lean)",
            f"{peaks['naive']:.1f} GiB (naive)",
            peaks["naive"] / peaks["lean"],
            goal_min=3.0,
        )
    ]


# ---- 4. latency ---------------------------------------------------------------------------------------------------


def _latency_at(setup: Setup, teacher, size: int) -> Row:
    from instaflow_pl.solver import LatentODE
    from instaflow_pl.velocity import ClassifierFreeGuidance

    prompts = read_prompts(size)[:size]
    x0 = _noise(setup, size, teacher.latent_shape)

    def student() -> torch.Tensor:
        field = ClassifierFreeGuidance(teacher.model, 1.0)
        return LatentODE("euler", 1).solve(field, x0, teacher.encoder.condition(prompts)).x

    def guided() -> torch.Tensor:
        return teacher.sample(x0, prompts, guidance=6.0).x

    student(), guided()
    t_student, t_teacher = _best(student, setup.device, setup.rounds), _best(guided, setup.device, setup.rounds)
    return Row(
        f"latency batch {size}: 1-step student vs {setup.teacher_steps}-step CFG teacher",
        f"{t_student * 1e3:.1f} ms",
        f"{t_teacher * 1e3:.1f} ms",
        t_teacher / t_student,
        goal_min=40.0,
    )


def latency(setup: Setup) -> list[Row]:
    """One-step student (Euler, 1 UNet call) against the 25-step guided teacher, same network and dtype."""
    from instaflow_pl.teachers import load_teacher

    teacher = load_teacher(setup.folder, solver="dpm++", steps=setup.teacher_steps, dtype=setup.teacher_dtype)
    teacher.to(setup.device)
    return [_latency_at(setup, teacher, size) for size in setup.latency_batches]


# ---- 5. every family at native shapes, few blocks ----------------------------------------------------------------


SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
}  # fmt: skip
"""Stable Diffusion 1.5's UNet (as ``build_sd15_random`` builds it: diffusers' defaults are SD 1.x's)."""
UNET_FEW = {"layers_per_block": 1, "transformer_layers_per_block": 1}
"""A UNet with one ResNet (and one transformer layer) per level: every level, every resolution, fewer blocks."""


@dataclass(frozen=True)
class FamilySpec:
    """One family row: a network at its native shapes, and the overrides that leave it a few blocks.

    Attributes:
        family: The family's name in :data:`instaflow_pl.families.FAMILIES`.
        title: The network in the table.
        config: The full-depth network config (``_class_name`` and the published keys).
        few: Config overrides that keep every shape but remove blocks (what runs; FLOPs are scaled to ``config``).
        batch: Samples per training step.
        text_tokens: Prompt tokens of the condition (77 CLIP; SD3 77 + 256 T5; FLUX 512 T5).
    """

    family: str
    title: str
    config: dict[str, Any]
    few: dict[str, Any]
    batch: int
    text_tokens: int


def _real_specs() -> list[FamilySpec]:
    from bench.sharding_memory import FLUX1, SD35_LARGE, SDXL_UNET

    return [
        FamilySpec("sd", "SD 1.5 UNet", SD15_UNET, UNET_FEW, 16, 77),
        FamilySpec("sdxl", "SDXL UNet", SDXL_UNET, UNET_FEW, 8, 77),
        FamilySpec("sd3", "SD3.5 Large", SD35_LARGE, {"num_layers": 2}, 4, 333),
        FamilySpec("flux", "FLUX.1 [dev]", FLUX1, {"num_layers": 1, "num_single_layers": 2}, 4, 512),
    ]


TINY_FULL_DEPTH = {
    "sd": {"layers_per_block": 2},
    "sdxl": {"layers_per_block": 2, "transformer_layers_per_block": [1, 2]},
    "sd3": {"num_layers": 4},
    "flux": {"num_layers": 2, "num_single_layers": 4},
}
"""The tiny fixtures' networks made deeper, so ``--tiny`` scales FLOPs from few blocks to more, as a GPU run does."""


def tiny_specs(workdir: Path, names: tuple[str, ...] = tuple(TINY_FULL_DEPTH)) -> list[FamilySpec]:
    """The family rows on the tiny fixtures (``build_tiny``) of ``names``, deepened by :data:`TINY_FULL_DEPTH`."""
    from instaflow_pl.families import FAMILIES
    from instaflow_pl.model_folder import ModelFolder

    few = {spec.family: spec.few for spec in _real_specs()}
    specs = []
    for name in names:
        folder = ModelFolder.open(FAMILIES[name].build_tiny(workdir / f"tiny-{name}"))
        config = {**folder.network_config, **TINY_FULL_DEPTH[name]}
        specs.append(FamilySpec(name, f"tiny {name}", config, few[name], 2, 8))
    return specs


def build_network(config: dict[str, Any], device: str | torch.device) -> torch.nn.Module:
    """A freshly initialised network of ``config`` made directly on ``device`` (``meta``: shapes only)."""
    from instaflow_pl.families import network_from_config

    with torch.device(device):
        return network_from_config(dict(config), "bench")


def family_condition(spec: FamilySpec, network: torch.nn.Module, batch: int, device, dtype=torch.float32):
    """Random text conditioning of the family's shapes (what its prompt encoder would give)."""
    from instaflow_pl.velocity.condition import TextCondition

    config = network.config
    like = {"device": device, "dtype": dtype}
    if spec.family == "sd":
        return TextCondition(torch.randn(batch, spec.text_tokens, config.cross_attention_dim, **like))
    if spec.family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return TextCondition(
            torch.randn(batch, spec.text_tokens, config.cross_attention_dim, **like),
            pooled=torch.randn(batch, pooled, **like),
        )
    guidance = None
    if config.get("guidance_embeds"):
        guidance = torch.full((batch,), 3.5, device=device)
    return TextCondition(
        torch.randn(batch, spec.text_tokens, config.joint_attention_dim, **like),
        pooled=torch.randn(batch, config.pooled_projection_dim, **like),
        guidance=guidance,
    )


def _velocity(network: torch.nn.Module):
    from instaflow_pl.families import family_of_network
    from instaflow_pl.velocity.network import NetworkVelocity

    return NetworkVelocity(network, family_of_network(network))


def _latent_shape(network: torch.nn.Module) -> tuple[int, int, int]:
    from instaflow_pl.families import latent_geometry

    return latent_geometry(network).shape


@dataclass
class Counted:
    """A network's size and cost, counted on the meta device."""

    flops: float
    """Forward + backward FLOPs of one sample's reflow step (no checkpointing recomputation)."""
    params: int
    """Parameters."""
    latent_shape: tuple[int, int, int]
    """Its native latents (C, H, W)."""


def velocity_train_flops(spec: FamilySpec, config: dict[str, Any]) -> Counted:
    """Forward + backward FLOPs of one sample's reflow step, parameters and latents of a network of ``config``.

    FLOPs are counted by ``torch.utils.flop_counter`` on the meta device (no memory, no weights; attention counted as
    its matmuls, which a CPU's flash kernel would hide from the counter).
    """
    from torch.utils.flop_counter import FlopCounterMode

    network = build_network(config, "meta")
    velocity = _velocity(network)
    x = torch.randn(1, *_latent_shape(network), device="meta")
    cond = family_condition(spec, network, 1, "meta")
    with FlopCounterMode(display=False) as counter:
        velocity(x, torch.full((1,), 0.5, device="meta"), cond).sum().backward()
    params = sum(p.numel() for p in network.parameters())
    return Counted(float(counter.get_total_flops()), params, tuple(x.shape[1:]))


@dataclass
class StepFigures:
    """What one family row measured."""

    seconds: float
    """Best step time (s)."""
    peak_gib: float | None
    """Peak GPU memory (None on a CPU)."""
    steps: int
    """Timed steps."""


def reflow_steps(setup: Setup, spec: FamilySpec, config: dict[str, Any], deadline: float) -> StepFigures:
    """Reflow training steps of a network of ``config``: the velocity on the straight line from noise to random
    "data" (``ReflowModule.compute_loss``'s arithmetic), backward, fused AdamW, EMA, bf16 autocast and gradient
    checkpointing as the configs train; timed steps stop early at ``deadline`` (``time.perf_counter``)."""
    from instaflow_pl.modules.ema import EMA
    from instaflow_pl.modules.reflow import interpolate

    _reset_peak(setup.device)
    torch.manual_seed(0)
    network = build_network(config, setup.device)
    network.enable_gradient_checkpointing()
    velocity = _velocity(network).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5, fused=setup.device == "cuda")
    ema = EMA(velocity, 0.9999)
    x1 = torch.randn(spec.batch, *_latent_shape(network), device=setup.device)
    cond = family_condition(spec, network, spec.batch, setup.device)

    def step() -> None:
        x0 = torch.randn_like(x1)
        t = torch.rand(spec.batch, device=setup.device)
        with torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.bf16):
            prediction = velocity(interpolate(x0, x1, t), t, cond)
        loss = (prediction.float() - (x1 - x0)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(velocity)

    step()  # warm-up (kernel selection, allocator)
    times = []
    while len(times) < setup.steps and (not times or time.perf_counter() < deadline):
        times.append(_best(step, setup.device, rounds=1))
    return StepFigures(min(times), _peak_gib(setup.device), len(times))


def family_row(setup: Setup, spec: FamilySpec, peak_tflops: float, guard_s: float) -> Row:
    """Step time, samples/s, peak memory and MFU of a few-block network, with its FLOPs scaled to full depth."""
    start = time.perf_counter()
    config = {**spec.config, **spec.few}
    few, full = velocity_train_flops(spec, config), velocity_train_flops(spec, spec.config)
    figures = reflow_steps(setup, spec, config, deadline=start + 0.6 * guard_s)
    _free(setup.device)  # the network and its optimizer went with reflow_steps
    rate = spec.batch / figures.seconds
    mfu = few.flops * rate / (peak_tflops * 1e12)
    scale = full.flops / few.flops
    memory = f"{figures.peak_gib:.1f} GiB" if figures.peak_gib is not None else "(CPU)"
    precision = "bf16" if setup.bf16 else "fp32"
    latents = "x".join(map(str, few.latent_shape))
    return Row(
        f"{spec.title} reflow {precision}, latents {latents}, batch {spec.batch}, few blocks "
        f"({_params(few.params)} of {_params(full.params)} params): step, samples/s, peak memory, MFU "
        f"vs {peak_tflops:g} TFLOPS",
        f"{figures.seconds * 1e3:.0f} ms, {rate:.2f}/s, {memory}, MFU {mfu:.1%}",
        f"full depth ({_flops(full.flops)}/sample, {scale:.1f}x): "
        f"~{figures.seconds * scale * 1e3:.0f} ms, ~{rate / scale:.2f}/s at that MFU",
        None,
    )


def _flops(count: float) -> str:
    return f"{count / 1e12:.3g} TFLOP" if count >= 1e11 else f"{count / 1e9:.3g} GFLOP"


def _params(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"


# ---- 6. sharded training on 2+ GPUs ----------------------------------------------------------------------------


SHARDED_SKIP = "skipped: needs 2+ GPUs"


def sharded(setup: Setup, peak_tflops: float, guard_s: float, devices: int, accelerator: str = "gpu") -> list[Row]:
    """``instaflow-pl fit`` of ``configs/sd15/reflow.yaml`` with ``--trainer.strategy=sharded`` on ``devices``
    ranks (a child process group, killed at ``guard_s``): step time, samples/s over all ranks, peak memory of a rank
    and MFU. Random pairs; no checkpoint, no validation."""
    import yaml

    from bench.scale import _fit_config
    from instaflow_pl.data.synthetic import write_random_triples
    from instaflow_pl.model_folder import ModelFolder

    label = f"reflow sharded (FSDP2), {devices} ranks: step, samples/s (all ranks), peak memory / rank, MFU"
    folder = ModelFolder.open(setup.folder)
    shape = list(folder.family.latent_geometry(folder.network_config).shape)
    batch, steps = setup.batches[0], setup.steps + 1
    with tempfile.TemporaryDirectory(prefix="instaflow-sharded-") as tmp:
        work = Path(tmp)
        data = write_random_triples(work / "pairs", 2 * devices * batch * (steps + 1), 64, shape)
        precision = "bf16-mixed" if setup.bf16 else "32-true"
        config = _fit_config("reflow.yaml", work, "sharded", batch, {}, accelerator, steps, precision, shape)
        config["trainer"].update(
            strategy="sharded", devices=devices, enable_checkpointing=False, limit_val_batches=0, num_nodes=1
        )
        config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "StepTimer" in c["class_path"]]
        config["model"]["init_args"]["base_model"] = str(setup.folder)
        config["data"]["init_args"]["path"] = str(data)
        yaml_file = work / "sharded.yaml"
        yaml_file.write_text(yaml.safe_dump(config, sort_keys=False))
        result = _run_child(work, ["fit", "--config", str(yaml_file)], guard_s)
    step_s = sorted(result.get("step_s", [])[1:])
    if result.get("status") != 0 or not step_s:
        reason = "over its guard" if result.get("status") == "timeout" else f"status {result.get('status')}"
        return [Row(f"{label}: FAILED ({reason})", "-", "-", None, failed=True)]
    seconds = step_s[len(step_s) // 2]
    rate = devices * batch / seconds
    counted = velocity_train_flops(FamilySpec("sd", "", folder.network_config, {}, 1, 77), folder.network_config)
    mfu = counted.flops * rate / (devices * peak_tflops * 1e12)
    peak = result.get("cuda_peak_gib")
    memory = f"{peak:.1f} GiB" if peak is not None else "(CPU)"
    return [
        Row(
            f"{label}, batch {batch}/rank vs {peak_tflops:g} TFLOPS/GPU",
            f"{seconds * 1e3:.0f} ms, {rate:.2f}/s, {memory}, MFU {mfu:.1%}",
            "-",
            None,
        )
    ]


def _run_child(work: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """``instaflow-pl ARGS`` through ``bench.scale --child`` in a session of its own (every rank killed at the
    timeout); its result record."""
    import os
    import subprocess

    result_file = work / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    command = [sys.executable, "-m", "bench.scale", "--child", str(result_file), "--", *args]
    with (work / "child.log").open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            return {"status": "timeout"}
        finally:  # also when the part's own guard interrupts the wait: no rank outlives it
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if not result_file.is_file():
        print((work / "child.log").read_text()[-3000:], file=sys.stderr)
        return {"status": "crashed"}
    return json.loads(result_file.read_text())


# ---- time guards --------------------------------------------------------------------------------------------


GUARDS_S = {"pairs": 150, "training": 90, "family": 30, "sharded": 90, "lpips": 45, "latency": 30}
"""Seconds each part may take on a GPU (a family row each; the sharded row only with 2+ GPUs): 435 s in all on one
GPU. Pairs include inductor's compile of the UNet. Nothing here has run on a GPU yet: the figures are estimates, and
the JSON's ``seconds`` give the measured ones to resize them."""
BUDGET_S = 480.0
"""The whole GPU run's budget in seconds (``--budget-s``; the SD 1.5 folder's one-time build included): each part's
guard is cut to what is left, and a part that would start with under 5 s left is skipped."""


class RowTimeout(Exception):
    """A part ran past its time guard."""


@contextlib.contextmanager
def time_guard(seconds: float | None) -> Iterator[None]:
    """Raise :class:`RowTimeout` in the block once it has run ``seconds`` (SIGALRM: Python code between GPU calls
    is interrupted, a single long kernel is waited for); None: no guard."""
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RowTimeout(f"over its {seconds:.3g} s guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, part: Callable[[float], list[Row]], limit_s: float | None, device: str) -> list[Row]:
    """The rows of ``part`` (called with its time limit), under a guard of ``limit_s`` seconds; a part that fails or
    runs past it becomes one FAILED row and the run goes on. ``limit_s`` None (``--tiny``): no guard, and errors
    propagate, so the tests see them."""
    if limit_s is None:
        return part(float("inf"))
    try:
        with time_guard(limit_s):
            return part(limit_s)
    except Exception as error:  # a GPU session should still measure the other parts
        traceback.print_exc()
        _free(device)
        reason = str(error) if isinstance(error, RowTimeout) else type(error).__name__
        return [Row(f"{name}: FAILED ({reason})", "-", "-", None, failed=True)]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- main ---------------------------------------------------------------------------------------------------------


def make_setup(tiny: bool, workdir: Path) -> Setup:
    """The GPU setup (random SD 1.5), or the tiny CPU one."""
    if tiny:
        from instaflow_pl.families import FAMILIES

        folder = FAMILIES["sd"].build_tiny(workdir / "tiny-sd")
        return Setup(folder, "cpu", "fp32", (2, 4), (1,), 1, 2, "eager", 1, bf16=False, rounds=1)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA GPU; use --tiny for the CPU check")
    from bench.scale import sd15_folder

    return Setup(sd15_folder(), "cuda", "fp16", (8, 16), (1, 8), 10, 25, "inductor", 4)


Part = tuple[str, float, Callable[[float], list[Row]]]
"""(name, time guard in seconds, the part called with its time limit)."""


def parts(setup: Setup, opts: argparse.Namespace, workdir: Path) -> list[Part]:
    """Every part, in the table's order."""
    peak = opts.peak_tflops
    specs = tiny_specs(workdir) if opts.tiny else _real_specs()
    gpus = torch.cuda.device_count() if setup.device == "cuda" else 0
    out: list[Part] = [
        ("pairs", GUARDS_S["pairs"], lambda _: pairs(setup)),
        ("training", GUARDS_S["training"], lambda _: training(setup, peak)),
    ]
    for spec in specs:
        out.append((spec.title, GUARDS_S["family"], lambda limit, spec=spec: [family_row(setup, spec, peak, limit)]))
    if gpus >= 2:
        devices = min(gpus, 8)
        out.append(("sharded", GUARDS_S["sharded"], lambda limit: sharded(setup, peak, limit - 5, devices)))
    else:
        label = "reflow sharded (FSDP2), --trainer.strategy=sharded"
        out.append(("sharded", 1.0, lambda _: [Row(label, SHARDED_SKIP, "-", None)]))
    out += [
        ("lpips", GUARDS_S["lpips"], lambda _: lpips_memory(setup)),
        ("latency", GUARDS_S["latency"], lambda _: latency(setup)),
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every part under its time guard; print the table; write the JSON; exit 1 if a part failed."""
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a quick check, no goals)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds the whole GPU run may take")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "gpu.json", help="results JSON")
    opts = parser.parse_args(argv)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="instaflow-gpu-") as tmp:
        setup = make_setup(opts.tiny, Path(tmp))
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name() if setup.device == "cuda" else platform.processor() or "CPU"
        for part_name, guard, part in parts(setup, opts, Path(tmp)):
            left = opts.budget_s - (time.perf_counter() - start)
            begin = time.perf_counter()
            if opts.tiny:
                new = run_part(part_name, part, None, setup.device)  # no guards: CPU times mean nothing
                new = [row.quick() for row in new]  # tiny figures: goals not applied
            elif left < 5:
                spent = f"{part_name}: skipped, the {opts.budget_s:g} s budget is spent"
                new = [Row(spent, "-", "-", None, failed=True)]
            else:
                new = run_part(part_name, part, min(guard, left), setup.device)
            seconds[part_name] = round(time.perf_counter() - begin, 1)
            rows += new
            print(f"{part_name}: {seconds[part_name]:.1f} s", flush=True)
            print(markdown_table(new), flush=True)
    table = markdown_table(rows)
    print(f"\n## {name}, torch {torch.__version__}\n\n{table}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "torch": torch.__version__, "table": table, "rows": [r.__dict__ for r in rows]}
    record["seconds"] = {**seconds, "total": round(time.perf_counter() - start, 1)}
    opts.out.write_text(json.dumps(record, indent=2))
    if any(row.failed for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
