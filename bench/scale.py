"""Memory and step time of every stage at Stable Diffusion 1.5 shapes (``make bench-scale``).

Builds a folder with SD 1.5's architecture and random weights once (cached in
``$XDG_CACHE_HOME/instaflow-pl/sd15-random``), then runs each case as the real command (``instaflow-pl pairs / fit /
export``) on the shipped ``configs/sd15/*.yaml`` with only device, size, batch and step overrides, each in a fresh
child process. A child reports its peak memory (RSS high-water mark ``VmHWM`` on the CPU;
``torch.cuda.max_memory_allocated`` on a GPU), its wall time and the time of each training or generation step.

Cases (``--only`` picks some):

* ``pairs``: the fp32 teacher, 4 samples, batch 2, DPM-Solver++ 2 steps, guidance 6.
* ``reflow``: ``fit`` for ``--steps`` steps (1: memory peaks in the first), a checkpoint and 1 validation batch
  (val_steps 1 and 2); the UNet mostly frozen (92M of 860M parameters train, as in the issue that asked for this) or
  LoRA (rank 4 on the attention projections).
* ``export``: the reflow checkpoint to a diffusers folder.
* ``distill-l2`` / ``distill-lpips``: the one-step student with ``{l2: 1}`` or ``{lpips: 1, l2: 1}``, naive or lean
  LPIPS (VAE decoder gradient checkpointing, bf16 decode, ``lpips_resize`` 224), batch 1 and 2;
  ``distill-lpips-lean-fp32`` the lean options without bf16.
* ``dmd`` / ``dmd-lora``: distribution-matching distillation (``configs/sd15/dmd.yaml``), ``fit`` for ``--steps``
  iterations (iteration 0 updates the generator and the fake score) and a checkpoint: the generator mostly frozen
  (as reflow) with the fake score trained in full, or LoRA rank 4 for both (``lora``, ``fake_lora``). Each is first
  counted (:mod:`bench.dmd_count`: two iterations with every live tensor counted on fake tensors, at the fits'
  precision, and in bf16-mixed with AdamW's multi-tensor path as on a GPU); the real fit runs only when the count
  plus the runtime stays under ``--max-real-gib`` (default 17: the full fake score's ~24 GiB in fp32 is counted
  only, and its peak RSS estimated as its count plus the runtime the LoRA case's real run showed). ``--tiny`` also
  counts on real tensors, which must equal the fake count.

Activations per sample are the difference between batch 2 and batch 1. Results go to ``--out`` (JSON) and a
markdown table on stdout; the exit status is 1 when a case failed. At SD size each fit step takes tens of seconds on
a CPU: the whole run is about half an hour on 2 cores. ``--tiny`` runs every case the same way on the tiny SD folder
(latents 4x8x8, fp32, batch 1 unless ``--batches`` says otherwise) in about three minutes with the DMD cases (they
took five alone on cores other agents kept busy): a check that every case still runs (the tests do), whose figures
mean nothing. The DMD cases at SD size add about ten minutes at batch 1 (each count builds the module for real
first: about 10 GiB, for a minute; the LoRA fit took 4 minutes on one busy core).

Usage::

    .venv/bin/python -m bench.scale [--tiny] [--only reflow export] [--batches 1 2] [--src OTHER_CHECKOUT/src]
                                    [--max-real-gib 17] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from bench.common import REPO
from bench.memory import _peak_rss

GiB = 2**30
FROZEN_MOST = [
    "network.conv_in",
    "network.down_blocks",
    "network.mid_block",
    "network.up_blocks.0",
    "network.up_blocks.1",
]
"""Freezing that leaves 92M of SD 1.5's 860M UNet parameters to train (up_blocks 2-3, time embedding, output)."""
LORA = {"rank": 4, "alpha": 4.0}
LEAN_LPIPS = {"lpips_checkpointing": True, "lpips_dtype": "bf16", "lpips_resize": 224}
CASES = (
    "pairs",
    "reflow",
    "reflow-lora",
    "export",
    "distill-l2",
    "distill-lpips",
    "distill-lpips-lean",
    "distill-lpips-lean-fp32",
    "unet-step",
    "lpips-naive",
    "lpips-lean",
    "lpips-lean-fp32",
    "dmd",
    "dmd-lora",
)
MICRO = ("unet-step", "lpips-naive", "lpips-lean", "lpips-lean-fp32")
"""Parts measured alone, at each batch size, for the memory each sample adds (no Trainer, no validation)."""
DMD = {
    "dmd-lora": ({"lora": LORA, "fake_lora": LORA}, "dmd, LoRA rank 4 generator and fake score"),
    "dmd": ({"freeze": FROZEN_MOST}, "dmd, generator 92M of 860M, fake score full"),
}
"""The DMD cases: ``configs/sd15/dmd.yaml`` with these model options (LoRA first: its real run, when it runs, tells
the full case's estimate what the runtime adds to the count)."""
RUNTIME_GIB = 1.5
"""What a process holds beyond its live tensors (libraries, allocator slack), before a real run has measured it."""


def latent_shape(folder: Path) -> list[int]:
    """(C, H, W) of the latents the folder's UNet takes natively (from its config)."""
    config = json.loads((folder / "unet" / "config.json").read_text())
    return [int(config["in_channels"]), int(config["sample_size"]), int(config["sample_size"])]


def cache_folder() -> Path:
    """Where the random SD 1.5 folder is kept between runs."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "instaflow-pl" / "sd15-random"


def sd15_folder() -> Path:
    """The random SD 1.5 folder, built on first use (about a minute and 4.3 GB)."""
    folder = cache_folder()
    if not (folder / "model_index.json").is_file():
        from instaflow_pl.families.sd_tiny import build_sd15_random

        print(f"building a random SD 1.5 folder in {folder} (once) ...", flush=True)
        tmp = folder.with_name(folder.name + ".tmp")
        build_sd15_random(tmp)
        tmp.rename(folder)
    return folder


# ---- the child: one real command, measured --------------------------------------------------------------------


STEP_TIMES: list[float] = []


class StepTimer(Callback):
    """Records the wall time of every training and prediction batch (in ``STEP_TIMES``)."""

    def __init__(self) -> None:
        self._start = 0.0

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        STEP_TIMES.append(time.perf_counter() - self._start)

    on_train_batch_start = on_predict_batch_start = _begin
    on_train_batch_end = on_predict_batch_end = _end


def child(result_file: Path, args: list[str]) -> None:
    """Run ``instaflow-pl ARGS`` in this process and write its peak memory, wall time and step times."""
    import torch

    from instaflow_pl.cli import main

    start = time.perf_counter()
    status = 0
    try:
        main(args)
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    result = {
        "status": status,
        "wall_s": time.perf_counter() - start,
        "peak_rss_gib": _peak_rss() / GiB,
        "step_s": importlib.import_module("bench.scale").STEP_TIMES,  # the module the CLI imported StepTimer from
    }
    if torch.cuda.is_available():
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    result_file.write_text(json.dumps(result))


def micro(result_file: Path, name: str, batch: int, folder: Path) -> None:
    """Measure what one part adds at ``batch``: RSS high-water mark over the loaded state, for one forward and backward.

    ``unet-step``: the UNet velocity's loss and backward in bf16 autocast with gradient checkpointing, 92M parameters
    trainable (as the fits). ``lpips-naive`` / ``lpips-lean`` / ``lpips-lean-fp32``: the LPIPS distance alone (VAE
    decode at 512 px with grad on the student's side, then VGG), naive, with the lean options, or with them but fp32.
    ``folder`` is the model folder (the random SD 1.5 one, or the tiny one); latents and text embeddings take its
    shapes.
    """
    import torch

    from bench.memory import _reset_peak_rss
    from instaflow_pl.modules.losses import LPIPSDistance
    from instaflow_pl.velocity import TextCondition
    from instaflow_pl.velocity.pretrained import PretrainedVelocity

    generator = torch.Generator().manual_seed(0)
    shape = latent_shape(folder)
    x = torch.randn(batch, *shape, generator=generator)
    if name == "unet-step":
        velocity = PretrainedVelocity(str(folder), gradient_checkpointing=True)
        for param_name, param in velocity.named_parameters():
            param.requires_grad_(not any(param_name.startswith(prefix) for prefix in FROZEN_MOST))
        width = int(velocity.network.config.cross_attention_dim)
        cond = TextCondition(torch.randn(batch, 77, width, generator=generator))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = velocity(x, torch.full((batch,), 0.5), cond)
            out.float().pow(2).mean().backward()

    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        # lpips-lean-fp32: checkpointing and resize without bf16 (CPUs without bf16 units emulate it, slowly)
        options = {"lpips-lean": LEAN_LPIPS, "lpips-lean-fp32": {**LEAN_LPIPS, "lpips_dtype": "fp32"}}.get(name, {})
        distance = LPIPSDistance(
            vae,
            pretrained=False,
            checkpointing=options.get("lpips_checkpointing", False),
            dtype=options.get("lpips_dtype", "fp32"),
            resize=options.get("lpips_resize"),
        )
        pred = x.clone().requires_grad_(True)
        target = torch.randn(batch, *shape, generator=generator)

        def step() -> None:
            distance(pred, target).sum().backward()

    base = _peak_rss()
    _reset_peak_rss()
    base = min(base, _peak_rss())
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    result_file.write_text(
        json.dumps(
            {
                "status": 0,
                "wall_s": seconds,
                "peak_rss_gib": _peak_rss() / GiB,
                "added_gib": (_peak_rss() - base) / GiB,
                "step_s": [seconds],
            }
        )
    )


# ---- the parent: cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One measured command.

    Attributes:
        name: Row name.
        stage: ``pairs``, ``fit`` or ``export``.
        batch: Samples per step.
        args: The command's arguments.
        kind: ``""`` (the command), ``count`` (its live tensors counted on fake tensors), ``count-gpu`` (the same in
            bf16-mixed with AdamW's multi-tensor path, a GPU's layout) or ``count-real`` (on real tensors).
        result: What the child reported.
    """

    name: str
    stage: str
    batch: int
    args: list[str]
    kind: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _write_yaml(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit_config(
    base: str,
    work: Path,
    name: str,
    batch: int,
    model_args: dict[str, Any],
    accel: str,
    steps: int,
    precision: str,
    shape: list[int],
) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "configs" / "sd15" / base).read_text())
    root = str(work / name)
    trainer = config["trainer"]
    trainer.update(
        accelerator=accel,
        devices=1,
        strategy="auto",
        max_steps=steps,
        val_check_interval=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root,
        accumulate_grad_batches=1,
        precision=precision,
    )
    trainer["callbacks"][0]["init_args"].update(dirpath=f"{root}/checkpoints", every_n_train_steps=steps)
    trainer["callbacks"].append({"class_path": "bench.scale.StepTimer"})
    init = config["model"]["init_args"]
    init.update(warmup_steps=0, val_steps=[1, 2], **model_args)
    config["data"]["init_args"].update(batch_size=batch, num_workers=0, val_fraction=0.25, expected_latent_shape=shape)
    return config


def plan(
    work: Path,
    folder: Path,
    batches: list[int],
    only: list[str],
    accel: str,
    steps: int = 1,
    precision: str = "bf16-mixed",
) -> list[Case]:
    """The cases to run, in order (reflow's checkpoint feeds export; reflow's pairs feed the fits)."""
    pairs_dir = work / "pairs"
    shape = latent_shape(folder)
    cases = [
        Case(
            "pairs (fp32 teacher, DPM++ 2 steps, guidance 6)",
            "pairs",
            2,
            [
                "pairs",
                "--config",
                str(REPO / "configs/sd15/pairs.yaml"),
                f"--trainer.accelerator={accel}",
                "--trainer.devices=1",
                f"--model.init_args.teacher={folder}",
                f"--model.init_args.output_dir={pairs_dir}",
                "--model.init_args.steps=2",
                "--model.init_args.teacher_dtype=fp32",
                f"--model.init_args.latent_shape={shape}",
                "--model.init_args.shard_size=4",
                f"--data.init_args.prompts={REPO / 'configs/tiny/prompts.txt'}",
                "--data.init_args.batch_size=2",
                "--data.init_args.limit=4",
                "--trainer.callbacks+=bench.scale.StepTimer",
            ],
        )
    ]
    fits = {
        "reflow": ("reflow.yaml", {"freeze": FROZEN_MOST}, "reflow, 92M of 860M trainable"),
        "reflow-lora": ("reflow.yaml", {"lora": LORA}, "reflow, LoRA rank 4"),
        "distill-l2": ("distill.yaml", {"freeze": FROZEN_MOST, "distance": {"l2": 1.0}}, "distill l2, 92M"),
        "distill-lpips": (
            "distill.yaml",
            {"freeze": FROZEN_MOST, "distance": {"lpips": 1.0, "l2": 1.0}, "lpips_pretrained": False},
            "distill lpips naive, 92M",
        ),
        "distill-lpips-lean": (
            "distill.yaml",
            {"freeze": FROZEN_MOST, "distance": {"lpips": 1.0, "l2": 1.0}, "lpips_pretrained": False, **LEAN_LPIPS},
            "distill lpips lean, 92M",
        ),
        "distill-lpips-lean-fp32": (  # checkpointing and resize without bf16 (emulated, slowly, on CPUs without bf16)
            "distill.yaml",
            {
                "freeze": FROZEN_MOST,
                "distance": {"lpips": 1.0, "l2": 1.0},
                "lpips_pretrained": False,
                **LEAN_LPIPS,
                "lpips_dtype": "fp32",
            },
            "distill lpips lean fp32 (checkpointing + resize 224), 92M",
        ),
    }
    for key in MICRO:
        for batch in batches:
            cases.append(Case(f"{key} alone, batch {batch}", key, batch, ["--micro", key, str(batch), str(folder)]))
    for key, (base, model_args, label) in fits.items():
        for batch in batches:
            name = f"{key}-b{batch}"
            model = {"base_model": str(folder), **model_args}
            config = _fit_config(base, work, name, batch, model, accel, steps, precision, shape)
            config["data"]["init_args"].update(path=str(pairs_dir))
            yaml_file = _write_yaml(work / f"{name}.yaml", config)
            cases.append(Case(f"{label}, batch {batch}", key, batch, ["fit", "--config", str(yaml_file)]))
        if key == "reflow":
            ckpt = work / f"reflow-b{batches[0]}" / "checkpoints"
            cases.append(
                Case(
                    "export (reflow checkpoint)",
                    "export",
                    0,
                    ["export", "--ckpt", str(ckpt), "--out", str(work / "export")],
                )
            )
    for key in DMD:
        for batch in batches:
            cases += _dmd_cases(key, batch, work, folder, pairs_dir, accel, steps, precision, shape)
    return [c for c in cases if c.stage in only]


def _dmd_cases(
    key: str,
    batch: int,
    work: Path,
    folder: Path,
    pairs_dir: Path,
    accel: str,
    steps: int,
    precision: str,
    shape: list[int],
) -> list[Case]:
    """A DMD case: its counts (fake tensors at the fit's precision and a GPU's layout; real ones on a tiny folder),
    then the fit, which ``main`` skips when the count says it does not fit ``--max-real-gib``."""
    model_args, label = DMD[key]
    name = f"{key}-b{batch}"
    config = _fit_config("dmd.yaml", work, name, batch, {"base_model": str(folder), **model_args}, accel, steps,
                         precision, shape)  # fmt: skip
    config["data"]["init_args"].update(path=str(pairs_dir))
    yaml_file = str(_write_yaml(work / f"{name}.yaml", config))
    counts = [("count", f"counted on fake tensors ({precision})", ["--precision", precision])]
    counts.append(("count-gpu", "counted on fake tensors (bf16-mixed, foreach AdamW)",
                   ["--precision", "bf16-mixed", "--foreach"]))  # fmt: skip
    if latent_shape(folder)[-1] <= 16:  # a tiny folder: the real count, which must equal the fake one
        counts.append(("count-real", f"counted on real tensors ({precision})", ["--precision", precision, "--real"]))
    cases = [Case(f"{label}, batch {batch}, {what}", key, batch, [yaml_file, *extra], kind)
             for kind, what, extra in counts]  # fmt: skip
    cases.append(Case(f"{label}, batch {batch}", key, batch, ["fit", "--config", yaml_file]))
    return cases


def run_case(case: Case, work: Path, src: Path | None) -> None:
    """Run one case in a fresh child process."""
    result_file = work / f"result-{case.stage}{'-' + case.kind if case.kind else ''}-b{case.batch}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src) if src else "", str(REPO)) if p)
    if case.kind.startswith("count"):
        command = [sys.executable, "-m", "bench.dmd_count", case.args[0], str(result_file), *case.args[1:]]
    elif case.stage in MICRO:
        command = [sys.executable, "-m", "bench.scale", *case.args, str(result_file)]
    else:
        command = [sys.executable, "-m", "bench.scale", "--child", str(result_file), "--", *case.args]
    log = work / "child.log"
    with log.open("a") as handle:
        handle.write(f"\n==== {case.name}\n")
        handle.flush()
        subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    case.result = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "crashed"}
    if case.stage in DMD and not case.kind and case.result.get("status") == 0:
        case.result.update(_dmd_record(work / f"{case.stage}-b{case.batch}" / "checkpoints"))
    if case.result.get("status") != 0:
        print(f"  {case.name}: FAILED (see {log})", flush=True)


def _dmd_record(checkpoints: Path) -> dict[str, Any]:
    """The DMD fit's checkpoint: its iteration count and generator updates (the fit must have taken both steps)."""
    import torch

    files = sorted(checkpoints.glob("*.ckpt"))
    if not files:
        return {"status": "no checkpoint"}
    checkpoint = torch.load(files[-1], map_location="cpu", mmap=True, weights_only=True)
    record = {"global_step": int(checkpoint["global_step"]),
              "generator_updates": int(checkpoint.get("dmd", {}).get("generator_updates", 0))}  # fmt: skip
    if record["global_step"] < 1 or record["generator_updates"] < 1:
        record["status"] = "no generator or fake-score update"
    return record


def _dmd_runtime(batch: int, done: list[Case]) -> float:
    """What a real DMD fit's peak RSS showed over its count (one of batch ``batch`` if any ran; RUNTIME_GIB if
    none)."""
    measured = {}
    for fit in done:
        count = next((c for c in done if (c.stage, c.batch, c.kind) == (fit.stage, fit.batch, "count")), None)
        if fit.stage in DMD and not fit.kind and "peak_rss_gib" in fit.result and count and "peak_gib" in count.result:
            measured[fit.batch] = fit.result["peak_rss_gib"] - count.result["peak_gib"]
    return measured.get(batch, next(iter(measured.values()), RUNTIME_GIB))


def skip_if_too_big(case: Case, done: list[Case], limit_gib: float) -> bool:
    """For a DMD fit: whether its count plus the runtime exceeds ``limit_gib``; then its result is the estimate
    (the count plus the runtime a real DMD fit showed over its count, see ``_dmd_runtime``)."""
    if case.stage not in DMD or case.kind:
        return False
    counts = {c.kind: c.result for c in done if c.stage == case.stage and c.batch == case.batch and c.kind}
    counted = counts.get("count", {}).get("peak_gib")
    if counted is None:
        return False
    runtime = _dmd_runtime(case.batch, done)
    estimate = counted + runtime
    if estimate <= limit_gib:
        return False
    case.result = {"status": 0, "skipped": True, "estimate_gib": estimate, "runtime_gib": runtime, "step_s": [],
                   "peak_text": f"~{estimate:.2f} (not run: count {counted:.2f} + runtime {runtime:.2f})"}  # fmt: skip
    return True


def table(cases: list[Case]) -> str:
    """The results as a markdown table."""
    lines = ["| stage | peak memory (GiB) | step time (s; median after the first, if any) | wall (s) |"]
    lines.append("|---|---|---|---|")
    for case in cases:
        r = case.result
        steps = sorted(r.get("step_s", [])[1:]) or r.get("step_s", [])  # the first step also warms up
        step = f"{steps[len(steps) // 2]:.1f}" if steps else "-"
        peak = r.get("cuda_peak_gib", r.get("peak_rss_gib"))
        peak_text = f"{peak:.2f}" if isinstance(peak, float) else str(r.get("status"))
        if "peak_text" in r:
            peak_text = r["peak_text"]
        elif case.kind.startswith("count") and r.get("status") == 0:
            peak_text = f"{r['peak_gib']:.2f} counted (fixed {r['fixed_gib']:.2f})"
        lines.append(f"| {case.name} | {peak_text} | {step} | {r.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the cases (or, with ``--child``, one command); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(Path(argv[1]), argv[3:])
        return 0
    if argv[:1] == ["--micro"]:
        micro(Path(argv[4]), argv[1], int(argv[2]), Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="every case on the tiny SD folder (latents 4x8x8; fp32 and batch 1 unless --precision and --batches say "
        "otherwise): a check that each case runs, in about two minutes; its figures mean nothing",
    )
    parser.add_argument("--only", nargs="+", default=list(CASES), choices=CASES, help="cases to run (pairs first)")
    parser.add_argument(
        "--batches", nargs="+", type=int, default=None, help="per-step batch sizes of the fits (default 1 2; --tiny: 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=1, help="training steps per fit (memory peaks in the first; more for times)"
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="trainer precision of the fits (default: the configs' bf16-mixed; --tiny: 32-true. 32-true on CPUs "
        "without bf16 units, where bf16 is emulated and slow: fp32 activations are larger, so its peaks are upper "
        "bounds)",
    )
    parser.add_argument(
        "--max-real-gib",
        type=float,
        default=17.0,
        help="a DMD fit whose counted peak plus the runtime exceeds this is not run (its count stands for it)",
    )
    parser.add_argument("--src", type=Path, default=None, help="measure another checkout's package (its src/)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "scale.json", help="results JSON")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    opts = parser.parse_args(argv)
    work = opts.keep or Path(tempfile.mkdtemp(prefix="instaflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = _tiny_folder(work) if opts.tiny else sd15_folder()
    batches = opts.batches or ([1] if opts.tiny else [1, 2])
    precision = opts.precision or ("32-true" if opts.tiny else "bf16-mixed")
    only = list(opts.only)
    if not (work / "pairs" / "index.json").is_file():
        only.append("pairs")  # every fit reads the pairs
    cases = plan(work, folder, batches, only, opts.accelerator, opts.steps, precision)
    for index, case in enumerate(cases):
        if skip_if_too_big(case, cases[:index], opts.max_real_gib):
            print(f"not running {case.name}: {case.result['peak_text']}", flush=True)
            continue
        print(f"running {case.name} ...", flush=True)
        run_case(case, work, opts.src)
        print(f"  {case.result}", flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps([asdict(c) for c in cases], indent=2))
    print(table(cases))
    print(f"\nresults: {opts.out}; work folder: {work}")
    failed = [case.name for case in cases if case.result.get("status") != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (see {work / 'child.log'})")
    return 1 if failed else 0


def _tiny_folder(work: Path) -> Path:
    """The tiny SD folder, built in the work folder (once)."""
    from instaflow_pl.families import FAMILIES

    folder = work / "tiny-sd"
    return folder if (folder / "model_index.json").is_file() else FAMILIES["sd"].build_tiny(folder)


if __name__ == "__main__":
    raise SystemExit(main())
