"""Pair generation speed: the project's teacher and ``Trainer.predict`` path against diffusers' pipeline.

Measures, on the tiny Stable-Diffusion-format folder (random weights, latents 4x8x8), samples/s of

* the baseline: a loop over ``StableDiffusionPipeline(prompts, latents=X0, output_type="latent")`` with the
  DPM-Solver++ (multistep) scheduler;
* ``load_teacher(folder, solver="dpm++").sample(x0, prompts, guidance=w)`` in a loop over the same batches;
* the full pair-generation path: ``PairGenerator`` + ``PromptDataModule`` under ``lightning.Trainer.predict``,
  including writing and committing the litdata shards and the index (teacher loading excluded, as the
  pipeline's is);
* once, informational: ``instaflow-pl predict --config configs/tiny/sd/pairs.yaml`` through ``cli_main``, end to
  end (config parsing and teacher loading included).

All use the same prompts, the same per-sample noise (``noise_for_indices``), steps, guidance and batch size.
The teacher's latents are checked against the pipeline's (max relative error), as are the stored X1 (fp16
storage). The floor is ``NFE x`` the time of one batched UNet forward at the guided batch size 2B, timed
directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    PROMPTS_FILE,
    REPO,
    Row,
    best_of_interleaved,
    fmt_times,
    read_dataset,
    read_prompts,
    timed,
)


@dataclass(frozen=True)
class PairsConfig:
    """Sizes of the pair-generation benchmark.

    Attributes:
        steps: Solver steps.
        guidance: Classifier-free guidance weight.
        batch_size: Prompts per teacher call.
        repeats: Samples per tiny prompt (10 prompts), so ``10 * repeats`` samples per run.
        shard_size: Samples per shard written by the Trainer path.
        rounds: Interleaved timing rounds (best is kept).
        seed: Base noise seed.
    """

    steps: int = 8
    guidance: float = 6.0
    batch_size: int = 8
    repeats: int = 12
    shard_size: int = 16
    rounds: int = 5
    seed: int = 0


QUICK = PairsConfig(steps=2, repeats=2, rounds=1)
"""``bench/run.py --quick``: 20 samples, 2 solver steps, one round (checks that every path runs, in seconds)."""


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (b is the reference)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _unet_forward_seconds(unet, batch: int, latent_shape: tuple[int, ...], embed, calls: int = 30) -> float:
    """Best time of one UNet forward at ``batch`` (timestep and text embeddings as in a guided solve)."""
    x = torch.randn(batch, *latent_shape)
    hidden = embed.expand(batch, -1, -1).contiguous()
    timestep = torch.tensor(500)
    best = float("inf")
    with torch.no_grad():
        for _ in range(5):
            unet(x, timestep, encoder_hidden_states=hidden, return_dict=False)
        for _ in range(calls):
            seconds, _ = timed(lambda: unet(x, timestep, encoder_hidden_states=hidden, return_dict=False))
            best = min(best, seconds)
    return best


def run(workdir: Path, folder: Path | None = None, cfg: PairsConfig = PairsConfig()) -> list[Row]:
    """Run the pair-generation benchmark in ``workdir``; print details; return the table rows.

    Args:
        workdir: Scratch folder.
        folder: A tiny SD folder (built in ``workdir`` when None).
        cfg: Sizes.
    """
    import lightning as L
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from instaflow_pl.cli import cli_main
    from instaflow_pl.conventions import noise_for_indices
    from instaflow_pl.data.prompt_stream import PromptDataModule
    from instaflow_pl.families import FAMILIES
    from instaflow_pl.modules import PairGenerator
    from instaflow_pl.teachers import load_teacher

    if folder is None:
        folder = FAMILIES["sd"].build_tiny(workdir / "tiny-sd-pairs")
    prompts = read_prompts(cfg.repeats)
    count = len(prompts)
    batches = _batches(count, cfg.batch_size)

    teacher = load_teacher(folder, solver="dpm++", steps=cfg.steps)
    latent_shape = teacher.latent_shape
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def pipeline_loop() -> torch.Tensor:
        out = []
        for idx in batches:
            x0 = noise_for_indices(cfg.seed, idx, latent_shape)
            result = pipe(
                prompt=[prompts[i] for i in idx],
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                latents=x0,
                output_type="latent",
            )
            out.append(result.images)
        return torch.cat(out)

    def teacher_loop() -> torch.Tensor:
        out = []
        for idx in batches:
            x0 = noise_for_indices(cfg.seed, idx, latent_shape)
            out.append(teacher.sample(x0, [prompts[i] for i in idx], guidance=cfg.guidance).x)
        return torch.cat(out)

    generator = PairGenerator(
        teacher=str(folder),
        output_dir=str(workdir / "unused"),
        solver="dpm++",
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        shard_size=cfg.shard_size,
    )
    outputs: list[Path] = []

    def trainer_predict() -> Path:
        out = workdir / f"pairs-{len(outputs)}"
        outputs.append(out)
        generator.output_dir = str(out)
        data = PromptDataModule(str(PROMPTS_FILE), repeats=cfg.repeats, batch_size=cfg.batch_size)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.predict(generator, datamodule=data, return_predictions=False)
        return out

    # Warm up every path once (allocator, lazy imports, oneDNN kernels) before timing.
    teacher_loop()
    pipeline_loop()
    times, results = best_of_interleaved(
        {"pipeline": pipeline_loop, "teacher": teacher_loop, "trainer": trainer_predict}, cfg.rounds
    )

    cli_out = workdir / "pairs-cli"
    cli_seconds, _ = timed(
        lambda: cli_main(
            [
                "predict",
                "--config",
                str(REPO / "configs" / "tiny" / "sd" / "pairs.yaml"),
                f"--model.init_args.teacher={folder}",
                f"--model.init_args.output_dir={cli_out}",
                f"--model.init_args.steps={cfg.steps}",
                f"--model.init_args.guidance={cfg.guidance}",
                f"--model.init_args.shard_size={cfg.shard_size}",
                f"--data.init_args.prompts={PROMPTS_FILE}",
                f"--data.init_args.repeats={cfg.repeats}",
                f"--data.init_args.batch_size={cfg.batch_size}",
            ]
        )
    )

    reference = results["pipeline"][-1]
    err_teacher = max(_max_rel_err(x1, reference) for x1 in results["teacher"])
    stored_x0, stored_x1, _ = read_dataset(results["trainer"][-1])
    err_stored = _max_rel_err(stored_x1, reference)
    err_x0 = _max_rel_err(stored_x0, noise_for_indices(cfg.seed, range(count), latent_shape))
    _, cli_x1, _ = read_dataset(cli_out)
    err_cli = _max_rel_err(cli_x1, reference)

    nfe = int(teacher.solver.nfe)
    guided = cfg.guidance > 1.0
    unet_batch = cfg.batch_size * (2 if guided else 1)
    null = teacher.encoder.condition([""], with_null=False).embeds
    unet_seconds = _unet_forward_seconds(teacher.model.network, unet_batch, latent_shape, null)
    floor_per_batch = nfe * unet_seconds

    best = {name: min(ts) for name, ts in times.items()}
    rate = {name: count / seconds for name, seconds in best.items()}
    per_batch = {name: seconds / len(batches) for name, seconds in best.items()}
    cli_rate = count / cli_seconds

    print(f"## 1. pair generation ({count} samples, batch {cfg.batch_size}, latents {list(latent_shape)})")
    print(f"   DPM-Solver++ {cfg.steps} steps, guidance {cfg.guidance}, {torch.get_num_threads()} threads")
    for name, label in (
        ("pipeline", "diffusers StableDiffusionPipeline loop"),
        ("teacher", "Teacher.sample loop"),
        ("trainer", "Trainer.predict + shard writing"),
    ):
        print(
            f"   {label:<40} {rate[name]:8.1f} samples/s  {per_batch[name] * 1e3:7.2f} ms/batch  "
            f"{per_batch[name] / floor_per_batch:5.2f}x floor   {fmt_times(times[name])}"
        )
    print(f"   {'cli_main predict (incl. parse + load)':<40} {cli_rate:8.1f} samples/s  total {cli_seconds:.3f} s")
    print(
        f"   NFE per sample {nfe} (UNet batch {unet_batch} per evaluation, "
        f"{'with' if guided else 'no'} CFG); "
        f"one UNet forward at batch {unet_batch}: {unet_seconds * 1e3:.2f} ms -> floor "
        f"{floor_per_batch * 1e3:.2f} ms/batch"
    )
    print(
        f"   max rel. error vs pipeline: teacher {err_teacher:.2e}, stored X1 (fp16) {err_stored:.2e}, "
        f"cli X1 {err_cli:.2e}; stored X0 vs noise {err_x0:.2e}"
    )

    rows = [
        Row(
            "pairs: Teacher.sample samples/s",
            f"{rate['teacher']:.1f}/s",
            f"{rate['pipeline']:.1f}/s (SD pipeline)",
            rate["teacher"] / rate["pipeline"],
            goal_min=1.05,
        ),
        Row(
            "pairs: Trainer.predict + shards samples/s",
            f"{rate['trainer']:.1f}/s",
            f"{rate['pipeline']:.1f}/s (SD pipeline)",
            rate["trainer"] / rate["pipeline"],
            goal_min=1.05,
        ),
        Row(
            "pairs: cli_main predict end-to-end samples/s",
            f"{cli_rate:.1f}/s",
            f"{rate['pipeline']:.1f}/s (SD pipeline)",
            cli_rate / rate["pipeline"],
            goal_min=1.0,
        ),
        Row(
            "pairs: Teacher latents max rel. err vs pipeline",
            f"{err_teacher:.1e}",
            "1e-05",
            err_teacher / 1e-5,
            goal_max=1.0,
            timing=False,
        ),
        Row(
            "pairs: stored X1 (fp16) max rel. err vs pipeline",
            f"{err_stored:.1e}",
            "1e-03 (fp16)",
            err_stored / 1e-3,
            goal_max=1.0,
            timing=False,
        ),
        Row(
            f"pairs: NFE per sample (UNet batch {unet_batch})",
            str(nfe),
            f"{cfg.steps} steps",
            nfe / cfg.steps,
            goal_max=1.0,
            timing=False,
        ),
        Row(
            "pairs: Teacher.sample time per batch / floor",
            f"{per_batch['teacher'] * 1e3:.2f} ms",
            f"{floor_per_batch * 1e3:.2f} ms ({nfe} x UNet)",
            per_batch["teacher"] / floor_per_batch,
        ),
        Row(
            "pairs: Trainer.predict time per batch / floor",
            f"{per_batch['trainer'] * 1e3:.2f} ms",
            f"{floor_per_batch * 1e3:.2f} ms ({nfe} x UNet)",
            per_batch["trainer"] / floor_per_batch,
        ),
    ]
    return rows
