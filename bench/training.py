"""Training and sampling speed of the reflow module: Lightning's ``Trainer.fit`` against a plain loop, and one step.

1. Training throughput, samples/s of

   * ``lightning.Trainer(max_steps=S).fit(ReflowModule(...), TriplesDataModule(...))`` (CPU, no logger, no
     checkpointing, no progress bar, no validation);
   * the baseline: a plain PyTorch loop over ``TriplesDataModule.train_dataloader()`` doing the same work per
     step with the same module: ``module.condition(prompts, dropout)`` (prompt encoding with prompt dropout) and
     ``module.compute_loss(batch, cond)`` (the reflow loss) under ``seeded_rng(batch_seed(0, step))`` (the
     per-batch generator seeding ``training_step`` does), ``backward``, ``AdamW.step``, ``zero_grad`` and
     ``module.ema.update(module.velocity)``.

   Each path builds a fresh ``ReflowModule(base_model=tiny folder, ema_decay=0.999, val_steps=[1])`` after the
   same ``torch.manual_seed``, with ``optimizer=AdamW(lr=1e-4)`` and a fresh ``TriplesDataModule(batch_size=16,
   shuffle=True, num_workers=0)`` over the same random triples dataset (one epoch holds every step, so no epoch
   restart falls inside a run). Only the steady state is timed: each path records ``time.perf_counter()`` when a
   step begins (Lightning: a callback's ``on_train_batch_start``; the loop: right after the batch is taken from
   the loader) and the rate is ``B (S - 1 - W) / (start[S - 1] - start[W])``, i.e. the ``S - 1 - W`` whole steps
   after ``W`` warm-up steps, each including fetching its successor batch and every hook (for Lightning also the
   module's ``self.log`` calls, the loop and hook machinery: that is the overhead measured). Module and Trainer
   construction, ``fit`` set-up and tear-down are not timed (a fixed cost, not a rate). The paths alternate for
   several rounds and the best round of each is kept. Both paths draw the same random numbers in the same order
   and read the same shuffled stream, so their per-step losses must agree: a second row checks that they do.

2. Sampling latency of a batch: the one-step student ``FlowModule.sample(x0, prompts, steps=1, guidance=1.0)``
   (Euler, EMA weights, one UNet call at batch B) against the Stable Diffusion teacher ``load_teacher(folder,
   solver="dpm++", steps=25).sample(x0, prompts, guidance=7.5)`` (25 UNet calls at batch 2B, batched
   classifier-free guidance). Both include prompt encoding; the same prompts and noise; interleaved, best of
   several rounds. The student is a ``ReflowModule`` on the same tiny folder, so both UNets are the same size.
   An informational row gives the ratio the parts allow: prompt encoding plus one call of the teacher's network at
   B, against prompt encoding plus 25 guided calls (``ClassifierFreeGuidance`` around the same network: uncond and
   cond batched at 2B), each part timed directly (on the tiny UNet a call at 2B costs well under twice one at B, so
   this floor ratio sits below 25 x 2 = 50). The same is measured again at batch 64, where the tiny UNet's cost
   grows closer to linearly with the batch.

``run_training`` and ``run_sampling`` run each part alone (``bench/run.py`` runs them as the benchmarks
``training`` and ``sampling``); ``QUICK_TRAINING`` and ``QUICK_SAMPLING`` are the sizes of ``bench/run.py --quick``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, best_of_interleaved, fmt_times, read_prompts, timed


@dataclass(frozen=True)
class TrainingConfig:
    """Sizes of the training benchmark.

    Attributes:
        count: Samples in the random triples dataset (at least ``batch_size * steps``: one epoch per run).
        shard_size: Samples per shard.
        latent_shape: (C, H, W) of the latents (the tiny UNet's native shape).
        batch_size: Triples per step.
        steps: Optimisation steps per run (``Trainer(max_steps=steps)``).
        warmup: Steps per run left out of the timing.
        rounds: Interleaved rounds (best is kept).
        lr: AdamW learning rate.
        ema_decay: EMA decay of the module.
        seed: ``torch.manual_seed`` before each module is built.
    """

    count: int = 1024
    shard_size: int = 256
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    batch_size: int = 16
    steps: int = 50
    warmup: int = 8
    rounds: int = 5
    lr: float = 1e-4
    ema_decay: float = 0.999
    seed: int = 0


@dataclass(frozen=True)
class SamplingConfig:
    """Sizes of the sampling benchmark.

    Attributes:
        batch_size: Prompts per batch.
        teacher_steps: DPM-Solver++ steps of the teacher.
        guidance: Classifier-free guidance weight of the teacher.
        rounds: Interleaved rounds (best is kept).
        seed: Seed of the noise.
        large_batch: A second, larger batch measured as well (None: none), where the tiny UNet's cost grows closer
            to linearly with the batch.
        large_rounds: Rounds at the larger batch (about 3 s per teacher call at 64).
    """

    batch_size: int = 8
    teacher_steps: int = 25
    guidance: float = 7.5
    rounds: int = 15
    seed: int = 0
    large_batch: int | None = 64
    large_rounds: int = 3


QUICK_TRAINING = TrainingConfig(count=32, shard_size=16, batch_size=4, steps=8, warmup=2, rounds=1)
"""``bench/run.py --quick``: 8 steps of batch 4 per path, one round."""

QUICK_SAMPLING = SamplingConfig(rounds=2, large_batch=None)
"""``bench/run.py --quick``: batch 8 (the goal's), two rounds, no larger batch."""


@dataclass
class FitRun:
    """One timed training run.

    Attributes:
        starts: ``time.perf_counter()`` at the start of each step.
        losses: The loss of each step.
    """

    starts: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the whole steps after ``warmup`` (start to next start)."""
        if len(self.starts) < warmup + 2:
            raise RuntimeError(f"{len(self.starts)} steps ran; need more than {warmup + 1} to time a steady state")
        return [b - a for a, b in zip(self.starts[warmup:-1], self.starts[warmup + 1 :], strict=True)]

    def steady_rate(self, batch_size: int, warmup: int) -> float:
        """Samples/s over the whole steps after ``warmup`` (from the start of step ``warmup`` to the last start)."""
        return batch_size * len(self.step_seconds(warmup)) / (self.starts[-1] - self.starts[warmup])


def _best_seconds(fn: Callable[[], Any], calls: int) -> float:
    """Best time of ``calls`` calls of ``fn``."""
    return min(timed(fn)[0] for _ in range(calls))


def _new_module(folder: Path, cfg: TrainingConfig) -> Any:
    """A fresh ReflowModule on the tiny folder, built after ``torch.manual_seed(cfg.seed)``."""
    from instaflow_pl.modules import ReflowModule

    torch.manual_seed(cfg.seed)
    return ReflowModule(
        base_model=str(folder),
        ema_decay=cfg.ema_decay,
        val_steps=[1],
        optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr),
    )


def _new_data(path: Path, cfg: TrainingConfig) -> Any:
    """A fresh TriplesDataModule over the dataset (``setup`` not yet called)."""
    from instaflow_pl.data import TriplesDataModule

    return TriplesDataModule(str(path), batch_size=cfg.batch_size, shuffle=True, num_workers=0)


def _fit_lightning(folder: Path, data_path: Path, cfg: TrainingConfig) -> FitRun:
    """``Trainer.fit`` for ``cfg.steps`` steps; a callback records step starts and losses."""
    import lightning as L

    run = FitRun()

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
            run.starts.append(time.perf_counter())

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
        ) -> None:
            run.losses.append(float(outputs["loss"]))

    module = _new_module(folder, cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepClock()],
    )
    trainer.fit(module, datamodule=_new_data(data_path, cfg))
    return run


def _fit_plain(folder: Path, data_path: Path, cfg: TrainingConfig) -> FitRun:
    """The same steps in a plain PyTorch loop (no Lightning Trainer)."""
    module = _new_module(folder, cfg)
    module.train()  # as Trainer.fit does
    optimizer = module.configure_optimizers()  # the factory's AdamW over the trainable velocity parameters
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RuntimeError(f"expected a bare optimizer from configure_optimizers, got {type(optimizer).__name__}")
    data = _new_data(data_path, cfg)
    data.setup("fit")
    from instaflow_pl.modules.base import batch_seed, seeded_rng

    dropout = module.hparams.prompt_dropout
    run = FitRun()
    for step, batch in enumerate(data.train_dataloader()):
        if step == cfg.steps:
            break
        run.starts.append(time.perf_counter())
        with seeded_rng(batch_seed(0, step), module.device):  # what training_step does (same random draws)
            cond = module.condition(batch.prompts, dropout=dropout)
            loss = module.compute_loss(batch, cond).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        module.ema.update(module.velocity)
        run.losses.append(float(loss.detach()))
    return run


def _training(workdir: Path, folder: Path, cfg: TrainingConfig) -> list[Row]:
    from instaflow_pl.data.synthetic import write_random_triples

    if cfg.count < cfg.batch_size * cfg.steps:
        raise ValueError(f"count {cfg.count} < batch_size * steps: a run would cross an epoch boundary")
    data_path = write_random_triples(workdir / "triples", cfg.count, cfg.shard_size, cfg.latent_shape)
    runs: dict[str, Callable[[], FitRun]] = {
        "lightning": lambda: _fit_lightning(folder, data_path, cfg),
        "plain": lambda: _fit_plain(folder, data_path, cfg),
    }
    times, results = best_of_interleaved(runs, cfg.rounds)
    for name, fit_runs in results.items():
        if any(len(run.starts) != cfg.steps or len(run.losses) != cfg.steps for run in fit_runs):
            raise RuntimeError(f"{name} ran {[len(run.starts) for run in fit_runs]} steps, expected {cfg.steps}")
    rates = {
        name: [run.steady_rate(cfg.batch_size, cfg.warmup) for run in fit_runs] for name, fit_runs in results.items()
    }
    loss_diff = max(
        abs(a - b)
        for lightning_run, plain_run in zip(results["lightning"], results["plain"], strict=True)
        for a, b in zip(lightning_run.losses, plain_run.losses, strict=True)
    )
    best = {name: max(rs) for name, rs in rates.items()}
    median_step = {
        name: statistics.median(s for run in fit_runs for s in run.step_seconds(cfg.warmup))
        for name, fit_runs in results.items()
    }
    timed_steps = cfg.steps - 1 - cfg.warmup

    print(
        f"## training: ReflowModule, tiny UNet, batch {cfg.batch_size}, latents {list(cfg.latent_shape)}, "
        f"{cfg.steps} steps per run ({timed_steps} timed after {cfg.warmup} warm-up), "
        f"{torch.get_num_threads()} thread(s)"
    )
    for name, label in (("lightning", "Trainer.fit"), ("plain", "plain PyTorch loop")):
        all_rates = ", ".join(f"{r:.0f}" for r in rates[name])
        print(
            f"   {label:<20} {best[name]:7.1f} samples/s  {cfg.batch_size / best[name] * 1e3:6.2f} ms/step, "
            f"median step {median_step[name] * 1e3:6.2f} ms (all rounds: {all_rates} samples/s; "
            f"whole runs incl. set-up {fmt_times(times[name])})"
        )
    overhead = cfg.batch_size / best["lightning"] - cfg.batch_size / best["plain"]
    print(
        f"   Trainer.fit overhead per step: {overhead * 1e3:.2f} ms (best rounds), "
        f"{(median_step['lightning'] - median_step['plain']) * 1e3:.2f} ms (median steps)"
    )
    print(f"   per-step losses, Trainer.fit vs loop: max abs difference {loss_diff:.1e} (same computation)")
    return [
        Row(
            f"training: Trainer.fit samples/s (B={cfg.batch_size}, EMA, AdamW)",
            f"{best['lightning']:.1f}/s",
            f"{best['plain']:.1f}/s (plain loop)",
            best["lightning"] / best["plain"],
            goal_min=0.95,
        ),
        Row(
            "training: per-step loss max abs diff, fit vs loop",
            f"{loss_diff:.1e}",
            "1e-05",
            loss_diff / 1e-5,
            goal_max=1.0,
            timing=False,
        ),
    ]


def _sampling(folder: Path, cfg: SamplingConfig) -> list[Row]:
    from instaflow_pl.conventions import noise_for_indices
    from instaflow_pl.modules import ReflowModule
    from instaflow_pl.teachers import load_teacher
    from instaflow_pl.velocity import ClassifierFreeGuidance

    teacher = load_teacher(folder, solver="dpm++", steps=cfg.teacher_steps)
    student = ReflowModule(base_model=str(folder), ema_decay=0.999, val_steps=[1]).eval()
    prompts = read_prompts(1 + cfg.batch_size // 10)[: cfg.batch_size]
    x0 = noise_for_indices(cfg.seed, range(cfg.batch_size), teacher.latent_shape)

    def student_batch() -> torch.Tensor:
        return student.sample(x0, prompts, steps=1, guidance=1.0).x

    def teacher_batch() -> torch.Tensor:
        return teacher.sample(x0, prompts, guidance=cfg.guidance).x

    for fn in (student_batch, teacher_batch):  # warm-up: oneDNN kernels, the cached null embedding
        fn()
    times, _ = best_of_interleaved({"student": student_batch, "teacher": teacher_batch}, cfg.rounds)
    best = {name: min(ts) for name, ts in times.items()}

    # Where the time goes: prompt encoding, one network call at B (the student's) and one guided call (uncond and
    # cond batched at 2B, through the package's one guidance wrapper, as the teacher's solver calls it).
    cond = teacher.encoder.condition(prompts, with_null=True)
    guided = ClassifierFreeGuidance(teacher.model, cfg.guidance)
    timestep = torch.tensor(500.0)
    with torch.no_grad():
        encode_s = _best_seconds(lambda: teacher.encoder.encode(prompts), cfg.rounds)
        unet_b = _best_seconds(lambda: teacher.model(x0, timestep, cond), cfg.rounds)
        unet_2b = _best_seconds(lambda: guided(x0, timestep, cond), cfg.rounds)
    nfe = int(teacher.solver.nfe)
    student_floor = encode_s + unet_b
    teacher_floor = encode_s + nfe * unet_2b

    print(
        f"## sampling latency: batch {cfg.batch_size}, tiny UNet, latents {list(teacher.latent_shape)}, "
        f"prompt encoding included, {torch.get_num_threads()} thread(s)"
    )
    print(f"   one-step student (Euler, 1 UNet call at B={cfg.batch_size}): {fmt_times(times['student'])}")
    print(
        f"   teacher DPM-Solver++ {cfg.teacher_steps} steps, CFG {cfg.guidance} ({nfe} UNet calls at "
        f"B={2 * cfg.batch_size}): {fmt_times(times['teacher'])}"
    )
    print(
        f"   parts: prompt encoding {encode_s * 1e3:.2f} ms, UNet at B={cfg.batch_size} {unet_b * 1e3:.2f} ms, "
        f"guided at B={2 * cfg.batch_size} {unet_2b * 1e3:.2f} ms ({unet_2b / unet_b:.2f}x) -> floors: student "
        f"{student_floor * 1e3:.2f} ms, teacher {teacher_floor * 1e3:.2f} ms"
    )
    return [
        Row(
            f"sampling: 1-step student vs {cfg.teacher_steps}-step CFG teacher, ms/batch (B={cfg.batch_size})",
            f"{best['student'] * 1e3:.2f} ms",
            f"{best['teacher'] * 1e3:.2f} ms (teacher)",
            best["teacher"] / best["student"],
            goal_min=40.0,
        ),
        Row(
            f"sampling: same ratio from the parts (encode + UNet calls, B={cfg.batch_size})",
            f"{student_floor * 1e3:.2f} ms",
            f"{teacher_floor * 1e3:.2f} ms ({nfe} x guided UNet at 2B)",
            teacher_floor / student_floor,
        ),
    ]


def run_training(workdir: Path, folder: Path, cfg: TrainingConfig = TrainingConfig()) -> list[Row]:
    """Run the training benchmark (``Trainer.fit`` against a plain loop) in ``workdir``; print details; return rows.

    Args:
        workdir: Scratch folder.
        folder: A tiny SD folder.
        cfg: Sizes.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    return _training(workdir, folder, cfg)


def run_sampling(folder: Path, cfg: SamplingConfig = SamplingConfig()) -> list[Row]:
    """Run the sampling-latency benchmark (one-step student against the guided teacher); print details; return rows.

    Args:
        folder: A tiny SD folder.
        cfg: Sizes (and whether to measure ``cfg.large_batch`` too).
    """
    rows = _sampling(folder, cfg)
    if cfg.large_batch is not None:
        rows += _sampling(folder, replace(cfg, batch_size=cfg.large_batch, rounds=cfg.large_rounds))
    return rows


def run(
    workdir: Path,
    folder: Path | None = None,
    training: TrainingConfig = TrainingConfig(),
    sampling: SamplingConfig = SamplingConfig(),
) -> list[Row]:
    """Run the training and sampling benchmarks in ``workdir``; print details; return the table rows.

    Args:
        workdir: Scratch folder.
        folder: A tiny SD folder (built in ``workdir`` when None).
        training: Sizes of the training benchmark.
        sampling: Sizes of the sampling benchmark.
    """
    from instaflow_pl.families import FAMILIES

    workdir.mkdir(parents=True, exist_ok=True)
    if folder is None:
        folder = FAMILIES["sd"].build_tiny(workdir / "tiny-sd-training")
    return run_training(workdir, folder, training) + run_sampling(folder, sampling)
