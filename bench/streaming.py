"""Streaming read speed of a generated triples dataset, against an in-memory read and a tiny training step.

Measures samples/s of

* ``TriplesDataModule(path, shuffle=True, in_memory=False)`` with ``num_workers`` 0 and 2: a whole epoch of
  ``train_dataloader()`` (worker start-up included), X0 regenerated from its seed and X1 decoded from fp16, as
  training sees them;
* the same DataModule holding the decoded dataset in memory (``in_memory=True``, what a small local dataset gets by
  default): the same batches in the same order, gathered from one table (its one-time read is not timed);
* the in-memory baseline: ``safetensors.torch.load`` of one file (already in memory) holding every X1 (fp16)
  and the regenerated X0 (fp32) stacked, then shuffled batches sliced out and cast to float32, with their
  prompts;
* a tiny training step: the tiny folder's UNet as ``NetworkVelocity``, prompts encoded by ``PromptEncoder``,
  reflow loss ``|| (X1 - X0) - v(X_t, t) ||^2``, backward and an AdamW step, on batches of the same size.

Streaming / training is the headroom of the reader over what training consumes (goal >= 20x): the reader must
never be the bottleneck. The dataset is written directly with ``PairStore`` (``instaflow_pl.data.synthetic``)
using random X1 (the reader does not care where X1 came from).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import Row, best_of_interleaved, fmt_times, read_dataset, timed


@dataclass(frozen=True)
class StreamingConfig:
    """Sizes of the streaming benchmark.

    Attributes:
        count: Samples in the dataset.
        latent_shape: (C, H, W) of the latents (the tiny UNet's native shape).
        batch_size: Samples per batch, for reading and for the training step.
        shard_size: Samples per shard.
        rounds: Interleaved timing rounds (best is kept).
        train_steps: Timed training steps (after two warm-up steps); the median is kept.
    """

    count: int = 4000
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    batch_size: int = 64
    shard_size: int = 256
    rounds: int = 3
    train_steps: int = 12


QUICK = StreamingConfig(count=512, rounds=1, train_steps=2)
"""``bench/run.py --quick``: 512 samples, one round, two timed training steps."""


@dataclass
class Epoch:
    """One streamed epoch.

    Attributes:
        samples: Samples read.
        first_batch_s: Seconds from asking for the loader to holding the first batch (worker start-up in).
        total_s: Seconds for the whole epoch, loader creation included.
        first_batch_size: Samples in the first batch.
    """

    samples: int
    first_batch_s: float
    total_s: float
    first_batch_size: int

    @property
    def steady_rate(self) -> float:
        """Samples/s after the first batch (what a long epoch approaches)."""
        return (self.samples - self.first_batch_size) / max(self.total_s - self.first_batch_s, 1e-12)


def _stream_epoch(path: Path, batch_size: int, num_workers: int, in_memory: bool = False) -> Epoch:
    """Read one shuffled epoch through the project's DataModule."""
    from instaflow_pl.data import TriplesDataModule

    dm = TriplesDataModule(str(path), batch_size=batch_size, num_workers=num_workers, shuffle=True, in_memory=in_memory)
    dm.setup("fit")
    start = time.perf_counter()
    seen, first_s, first_size = 0, 0.0, 0
    for batch in dm.train_dataloader():
        if not seen:
            first_s, first_size = time.perf_counter() - start, len(batch)
        seen += len(batch)
    return Epoch(seen, first_s, time.perf_counter() - start, first_size)


def _in_memory_file(path: Path) -> tuple[bytes, list[str]]:
    """One safetensors file (bytes) with the dataset's X1 (fp16) and regenerated X0 (fp32); the prompts."""
    from safetensors.torch import save

    x0, x1, prompts = read_dataset(path)
    return save({"x0": x0.contiguous(), "x1": x1.half().contiguous()}), prompts


def _read_in_memory(blob: bytes, prompts: list[str], batch_size: int) -> Epoch:
    """Load the file from memory and slice shuffled float32 batches (with their prompts) out of it."""
    from safetensors.torch import load

    start = time.perf_counter()
    tensors = load(blob)
    x0, x1 = tensors["x0"], tensors["x1"]
    order = torch.randperm(x0.shape[0])
    seen, first_s, first_size = 0, 0.0, 0
    for begin in range(0, x0.shape[0], batch_size):
        idx = order[begin : begin + batch_size]
        batch_x0, batch_x1 = x0[idx].float(), x1[idx].float()
        batch_prompts = [prompts[i] for i in idx.tolist()]
        if not seen:
            first_s, first_size = time.perf_counter() - start, len(batch_prompts)
        seen += min(batch_x0.shape[0], batch_x1.shape[0], len(batch_prompts))
    return Epoch(seen, first_s, time.perf_counter() - start, first_size)


def _training_step_seconds(
    folder: Path, x0: torch.Tensor, x1: torch.Tensor, prompts: list[str], steps: int
) -> tuple[float, list[float]]:
    """Median seconds of one reflow training step of the tiny UNet (forward, backward, AdamW) on one batch."""
    from diffusers import UNet2DConditionModel

    from instaflow_pl.families import FAMILIES
    from instaflow_pl.model_folder import ModelFolder
    from instaflow_pl.velocity import NetworkVelocity

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    model = NetworkVelocity(unet, FAMILIES["sd"]).train()
    encoder = ModelFolder.open(folder).load_encoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> float:
        cond = encoder.condition(prompts, with_null=False)
        t = torch.rand(x0.shape[0])
        tt = t.view(-1, 1, 1, 1)
        xt = tt * x1 + (1.0 - tt) * x0
        loss = torch.nn.functional.mse_loss(model(xt, t, cond), x1 - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for _ in range(2):
        step()
    times = [timed(step)[0] for _ in range(steps)]
    return sorted(times)[len(times) // 2], times


def run(workdir: Path, folder: Path | None = None, cfg: StreamingConfig = StreamingConfig()) -> list[Row]:
    """Run the streaming benchmark in ``workdir``; print details; return the table rows.

    Args:
        workdir: Scratch folder.
        folder: A tiny SD folder (built in ``workdir`` when None) whose UNet the training step trains.
        cfg: Sizes.
    """
    from instaflow_pl.families import FAMILIES

    if folder is None:
        folder = FAMILIES["sd"].build_tiny(workdir / "tiny-sd-streaming")
    from instaflow_pl.data.synthetic import write_random_triples

    data = write_random_triples(workdir / "triples", cfg.count, cfg.shard_size, cfg.latent_shape)
    blob, prompts = _in_memory_file(data)

    _stream_epoch(data, cfg.batch_size, 0)  # warm-up: page cache, lazy imports
    times, results = best_of_interleaved(
        {
            "memory": lambda: _read_in_memory(blob, prompts, cfg.batch_size),
            "stream0": lambda: _stream_epoch(data, cfg.batch_size, 0),
            "stream2": lambda: _stream_epoch(data, cfg.batch_size, 2),
            "held": lambda: _stream_epoch(data, cfg.batch_size, 0, in_memory=True),
        },
        cfg.rounds,
    )
    for name, epochs in results.items():
        if any(e.samples != cfg.count for e in epochs):
            raise RuntimeError(f"{name} read {[e.samples for e in epochs]} samples, expected {cfg.count}")
    rate = {name: cfg.count / min(ts) for name, ts in times.items()}
    steady = {name: max(e.steady_rate for e in epochs) for name, epochs in results.items()}
    first = {name: min(e.first_batch_s for e in epochs) for name, epochs in results.items()}

    from safetensors.torch import load

    tensors = load(blob)
    batch = slice(0, cfg.batch_size)
    step_s, step_times = _training_step_seconds(
        folder, tensors["x0"][batch], tensors["x1"][batch].float(), prompts[batch], cfg.train_steps
    )
    train_rate = cfg.batch_size / step_s

    print(
        f"## 2. streaming read ({cfg.count} samples, latents {list(cfg.latent_shape)}, "
        f"batch {cfg.batch_size}, "
        f"shuffle, X0 from seed, X1 fp16, {len(blob) / 2**20:.1f} MiB in memory)"
    )
    for name, label in (
        ("memory", "safetensors in memory + shuffled slicing"),
        ("stream0", "TriplesDataModule num_workers=0"),
        ("stream2", "TriplesDataModule num_workers=2"),
        ("held", "TriplesDataModule in_memory=True"),
    ):
        print(
            f"   {label:<42} {rate[name]:9.0f} samples/s per epoch, "
            f"{steady[name]:9.0f} after the first batch "
            f"(first batch {first[name] * 1e3:.1f} ms)   {fmt_times(times[name])}"
        )
    print(
        f"   {'training step (tiny UNet, fwd+bwd+AdamW)':<42} {train_rate:9.0f} samples/s   "
        f"median {step_s * 1e3:.1f} ms/step "
        f"(min {min(step_times) * 1e3:.1f}, max {max(step_times) * 1e3:.1f})"
    )

    rows = []
    for name, workers in (("stream0", 0), ("stream2", 2)):
        rows += [
            Row(
                f"stream: nw={workers} epoch samples/s / training (B={cfg.batch_size})",
                f"{rate[name]:.0f}/s",
                f"{train_rate:.0f}/s (train step)",
                rate[name] / train_rate,
                goal_min=20.0,
            ),
            Row(
                f"stream: nw={workers} after 1st batch samples/s / training",
                f"{steady[name]:.0f}/s",
                f"{train_rate:.0f}/s (train step)",
                steady[name] / train_rate,
                goal_min=20.0,
            ),
        ]
    for name, workers in (("stream0", 0), ("stream2", 2)):
        rows.append(
            Row(
                f"stream: nw={workers} epoch samples/s / in-memory safetensors",
                f"{rate[name]:.0f}/s",
                f"{rate['memory']:.0f}/s (in memory)",
                rate[name] / rate["memory"],
            )
        )
    rows.append(
        Row(
            "stream: held in memory / streamed (nw=0), after 1st batch samples/s",
            f"{steady['held']:.0f}/s",
            f"{steady['stream0']:.0f}/s (streamed)",
            steady["held"] / steady["stream0"],
            goal_min=3.0,
        )
    )
    return rows
