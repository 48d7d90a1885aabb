"""One GPU, Stable Diffusion 1.5 shapes, nothing downloaded: throughput, memory and latency of every stage.

Builds the random SD 1.5 folder on the machine (``bench.scale.sd15_folder``), then measures:

1. pair generation images/s in fp16 (DPM-Solver++ 25 steps, guidance 6), the project's teacher against diffusers'
   ``StableDiffusionPipeline`` on the same GPU and latents, plain and with ``compile`` (goals >= 1.0x and >= 1.2x);
2. reflow and distill-l2 samples/s in bf16 autocast at per-GPU batch 8 and 16 (full fine-tuning, UNet gradient
   checkpointing, fused AdamW, EMA), peak memory, and model FLOPs utilisation: the UNet's forward + backward FLOPs
   per sample counted with ``torch.utils.flop_counter`` (checkpointing's recomputation not counted), divided by the
   GPU's dense bf16 peak (``--peak-tflops``; 989 for H100/H200 SXM);
3. distill-lpips peak memory at 512 px, naive against lean (decoder checkpointing, bf16 decode, resize 224);
4. latency of the one-step student against the 25-step guided teacher at batch 1 and 8 (goal >= 40x).

It prints one markdown table and writes JSON. ``--tiny`` runs every part on the CPU at tiny shapes (the tests do);
the goals only mean something on a GPU.

Usage::

    python -m bench.gpu [--out outputs/bench/gpu.json] [--peak-tflops 989] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
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


def main(argv: list[str] | None = None) -> None:
    """Run every part; print the table; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a quick check, no goals)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "gpu.json", help="results JSON")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="instaflow-gpu-") as tmp:
        setup = make_setup(opts.tiny, Path(tmp))
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name() if setup.device == "cuda" else platform.processor() or "CPU"
        rows: list[Row] = []
        for part in (
            lambda: pairs(setup),
            lambda: training(setup, opts.peak_tflops),
            lambda: lpips_memory(setup),
            lambda: latency(setup),
        ):
            rows += [row.quick() if opts.tiny else row for row in part()]  # tiny figures: goals not applied
            print(markdown_table(rows[-1:]), flush=True)
    table = markdown_table(rows)
    print(f"\n## {name}, torch {torch.__version__}\n\n{table}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(
        json.dumps(
            {"device": name, "torch": torch.__version__, "table": table, "rows": [r.__dict__ for r in rows]}, indent=2
        )
    )


if __name__ == "__main__":
    main()
