"""The digits demo's stages, run through the project's own CLI and configs, each cached and checked.

``setup -> 1rf -> pairs-1rf -> 2rf -> pairs-2rf -> distill-2rf -> distill-1rf -> perflow -> dmd -> report``

(``perflow``, piecewise rectified flow from the 1-RF, and ``dmd``, distribution-matching distillation of the 2-RF
against the 1-RF's scores, are read by the report when they are done: the notebook's small run writes the report
without them.)

Each stage runs ``instaflow-pl fit|pairs`` on a YAML in ``configs/demo/`` (in this process, so the libraries load
once), exports what it trained, and writes ``<out>/stages/<name>.json`` with a hash of its config, overrides and
upstream stages. A rerun skips a stage whose record matches and whose outputs exist; a stage interrupted half-way
resumes (pairs from their last committed shard, training from ``last.ckpt``). A stage whose config changed (finished or
interrupted) is refused until ``--force`` redoes it and the stages that depend on it: results are never mixed or
silently overwritten, and an ``--out`` that holds anything but a demo run is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaflow_pl.demo.plan import STAGES, DemoPlan, finished, read_record, student_name
from instaflow_pl.errors import UserError


@dataclass(frozen=True)
class Stage:
    """One step of the demo.

    Attributes:
        name: Its name (``--stage``).
        title: What it does, in words.
        config: Its YAML in ``configs/demo`` (None: no CLI config).
        upstream: Stages whose outputs it reads.
        run: Does the work.
        outputs: Paths that must exist once it is done.
        optional: Stages whose outputs it reads when they are done (not required; they count in its hash then).
    """

    name: str
    title: str
    config: str | None
    upstream: tuple[str, ...]
    run: Callable[[DemoPlan], None]
    outputs: Callable[[DemoPlan], list[Path]]
    optional: tuple[str, ...] = ()


# ---- running the CLI in this process --------------------------------------------------------------------------


def run_cli(args: Sequence[str]) -> None:
    """``instaflow-pl <args>`` (a LightningCLI subcommand) in this process, as the command runs it (quiet library
    output, threads for the machine); ``cli_main`` closes the W&B run it opened."""
    from instaflow_pl.lightning_cli import cli_main
    from instaflow_pl.runtime import command, quiet

    print(f"$ instaflow-pl {' '.join(args)}", flush=True)
    try:
        with command(), quiet():
            cli_main(list(args))
    except SystemExit as exit_:  # the parser's one-line error was printed
        if exit_.code not in (0, None):
            raise UserError(
                f"`instaflow-pl {' '.join(args)}` failed (exit {exit_.code}); see the message above"
            ) from None


def _config_args(plan: DemoPlan, stage: Stage, *extra: str) -> list[str]:
    args = ["--config", str(plan.configs / stage.config), *extra, *plan.overrides.get(stage.name, [])]
    if in_notebook() and stage.config and not stage.config.startswith("pairs"):
        # Rich's live bar recurses in Jupyter; tqdm (the project's step bar) draws a notebook widget or text.
        bar = "instaflow_pl.callbacks.StepProgressBar"
        args += [f"--trainer.callbacks+={bar}", "--trainer.callbacks.init_args.refresh_rate=25"]
    return args


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel."""
    import sys

    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


# ---- the stages ------------------------------------------------------------------------------------------------


def _setup(plan: DemoPlan) -> None:
    from instaflow_pl.data.digits import DIGIT_PROMPTS, load_digits
    from instaflow_pl.demo.classifier import accuracy, save_classifier, train_classifier
    from instaflow_pl.families.digits_tiny import build_digits_base

    base = plan.path("base")
    if base.exists():
        shutil.rmtree(base)
    build_digits_base(base)
    plan.prompts_file.write_text("\n".join(DIGIT_PROMPTS) + "\n")
    print("training the digit classifier (FID features, prompt accuracy) on the 1400 training digits ...")
    classifier = train_classifier(load_digits("train"))
    held_out = accuracy(classifier, load_digits("heldout"))
    save_classifier(classifier, plan.path("classifier"), heldout_accuracy=held_out)
    print(f"classifier accuracy on the 397 held-out digits: {held_out:.1%}")


def _fit(plan: DemoPlan, stage: Stage, base_model: Path, data: Path | None, *args: str) -> None:
    run_dir = plan.run_dir(stage.name)
    extra = ["--trainer.default_root_dir", str(run_dir), "--model.init_args.base_model", str(base_model), *args]
    if data is not None:
        extra += ["--data.init_args.path", str(data)]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        print(f"resuming {stage.name} from {run_dir / 'checkpoints' / 'last.ckpt'}")
        extra += ["--ckpt_path", "last"]
    run_cli(["fit", *_config_args(plan, stage, *extra)])


def _export(checkpoint: Path, out: Path, steps: int) -> None:
    from instaflow_pl.export import export_checkpoint

    info = export_checkpoint(checkpoint, out, force=out.exists())
    if info["training_steps"] != steps:
        raise UserError(
            f"{checkpoint} holds the model after {info['training_steps']} steps, not {steps}; the run's last "
            "checkpoint is written at validation, so make trainer.val_check_interval divide trainer.max_steps"
        )
    print(f"exported {checkpoint.name} ({steps} steps) to {out}")


def setting(plan: DemoPlan, stage: Stage, key: str) -> Any:
    """A stage's setting ``key`` (``trainer.max_steps``, ``model.init_args.windows`` ...): its last ``--key value``
    override (as YAML), else its YAML's value (None when absent)."""
    import yaml
    from omegaconf import OmegaConf

    args = plan.overrides.get(stage.name, [])
    given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == f"--{key}"]
    if given:
        return yaml.safe_load(given[-1])
    return OmegaConf.select(OmegaConf.load(plan.configs / stage.config), key)


def max_steps(plan: DemoPlan, stage: Stage) -> int:
    """``trainer.max_steps`` of a stage: the last override, else its YAML."""
    return int(setting(plan, stage, "trainer.max_steps"))


def _train_flow(plan: DemoPlan, stage: Stage, base_model: Path, data: Path | None, model: str) -> None:
    _fit(plan, stage, base_model, data)
    _export(plan.run_dir(stage.name) / "checkpoints" / "last.ckpt", plan.model(model), max_steps(plan, stage))


def _perflow(plan: DemoPlan) -> None:
    current = stage("perflow")
    _fit(plan, current, plan.model("1rf"), plan.pairs("1rf"), "--model.init_args.teacher", str(plan.model("1rf")))
    _export(plan.run_dir("perflow") / "checkpoints" / "last.ckpt", plan.model("perflow"), max_steps(plan, current))


def _dmd(plan: DemoPlan) -> None:
    current = stage("dmd")
    _fit(plan, current, plan.model("2rf"), None, "--model.init_args.teacher", str(plan.model("1rf")))
    _export(plan.run_dir("dmd") / "checkpoints" / "last.ckpt", plan.model("dmd"), max_steps(plan, current))


def dmd_settings(plan: DemoPlan) -> dict[str, Any]:
    """What the report says of the dmd stage: iterations, batch size, generator_every and real guidance (the module's
    defaults where its config leaves one out)."""
    import inspect

    from instaflow_pl.modules.dmd import DMDModule

    current = stage("dmd")
    defaults = inspect.signature(DMDModule.__init__).parameters

    def value(name: str) -> Any:
        given = setting(plan, current, f"model.init_args.{name}")
        return defaults[name].default if given is None else given

    return {
        "iterations": max_steps(plan, current),
        "batch_size": int(setting(plan, current, "data.init_args.batch_size")),
        "generator_every": int(value("generator_every")),
        "real_guidance": float(value("real_guidance")),
    }


EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
"""Velocity evaluations per step of the LatentODE's methods (a velocity teacher's solvers)."""


def teacher_evaluations(plan: DemoPlan) -> dict[str, float]:
    """Teacher network evaluations per training sample (a guided call counts its two branches) of the 2-RF and of
    piecewise reflow, from the pairs' manifest and the stages' settings.

    The 2-RF: every pair of ``pairs/1rf`` cost ``steps`` evaluations, and its training drew ``max_steps x batch_size``
    samples from them. Piecewise reflow: each training sample is one window solve of ``window_solver_steps`` steps.
    """
    manifest = json.loads((plan.pairs("1rf") / "manifest.json").read_text())
    per_pair = manifest["steps"] * EVALUATIONS_PER_STEP[manifest["solver"]] * (2 if manifest["guidance"] > 1 else 1)
    reflow = stage("2rf")
    samples = max_steps(plan, reflow) * int(setting(plan, reflow, "data.init_args.batch_size"))
    piecewise = stage("perflow")
    guided = float(setting(plan, piecewise, "model.init_args.teacher_guidance") or 1.0) > 1
    method = str(setting(plan, piecewise, "model.init_args.teacher_solver"))
    steps = int(setting(plan, piecewise, "model.init_args.window_solver_steps"))
    return {
        "2-RF": manifest["count"] * per_pair / samples,
        "PeRFlow": steps * EVALUATIONS_PER_STEP[method] * (2 if guided else 1),
    }


def _pairs(plan: DemoPlan, stage: Stage, teacher: str) -> None:
    extra = [
        "--model.init_args.teacher", str(plan.model(teacher)),
        "--model.init_args.output_dir", str(plan.pairs(teacher)),
        "--data.init_args.prompts", str(plan.prompts_file),
        "--trainer.logger.init_args.save_dir", str(plan.run_dir(stage.name)),
    ]  # fmt: skip
    plan.run_dir(stage.name).mkdir(parents=True, exist_ok=True)
    run_cli(["pairs", *_config_args(plan, stage, *extra)])


def budgets(plan: DemoPlan, stage: Stage) -> list[int]:
    """The student budgets of a distillation stage: the steps of its CheckpointAtSteps callback."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(plan.configs / stage.config)
    for callback in config.trainer.get("callbacks", []):
        if str(callback.get("class_path", "")).endswith("CheckpointAtSteps"):
            steps = list(callback.init_args.steps)
            override = plan.overrides.get(f"{stage.name}:budgets")
            return sorted(int(s) for s in (override or steps))
    raise UserError(f"{plan.configs / stage.config} has no CheckpointAtSteps callback: the report needs budgets")


def _distill(plan: DemoPlan, stage: Stage, teacher: str) -> None:
    from instaflow_pl.callbacks.budgets import budget_checkpoint

    steps = budgets(plan, stage)
    extra = ["--trainer.max_steps", str(max(steps))]
    if plan.overrides.get(f"{stage.name}:budgets"):  # CheckpointAtSteps is the config's last callback
        extra += ["--trainer.callbacks.init_args.steps", json.dumps(steps)]
    _fit(plan, stage, plan.model(teacher), plan.pairs(teacher), *extra)
    for step in steps:
        checkpoint = budget_checkpoint(plan.run_dir(stage.name) / "budgets", step)
        _export(checkpoint, plan.model(student_name(teacher, step)), step)


def val_fraction(plan: DemoPlan, stage: Stage) -> float:
    """The held-out share of the pairs in a distillation stage's config (those pairs never trained a student)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(plan.configs / stage.config)
    return float(config.data.init_args.get("val_fraction", 0.0))


def _report(plan: DemoPlan) -> None:
    from instaflow_pl.demo.report import STUDENTS, write_report

    distills = {teacher: stage(name) for teacher, (_, name) in STUDENTS.items()}
    write_report(
        plan,
        budgets={teacher: budgets(plan, distill) for teacher, distill in distills.items()},
        val_fractions={teacher: val_fraction(plan, distill) for teacher, distill in distills.items()},
        teacher_cost=teacher_evaluations(plan) if finished(plan, "perflow") else None,
        dmd=dmd_settings(plan) if finished(plan, "dmd") else None,
    )


def _student_outputs(plan: DemoPlan, name: str, teacher: str) -> list[Path]:
    return [plan.model(student_name(teacher, b)) / "instaflow.json" for b in budgets(plan, stage(name))]


def _stage_list() -> list[Stage]:
    return [
        Stage("setup", "base model folder (random MLP velocity, tiny CLIP text encoder) and digit classifier",
              None, (), _setup,
              lambda p: [p.path("base", "instaflow.json"), p.path("classifier", "classifier.json"), p.prompts_file]),
        Stage("1rf", "1-rectified flow trained from the digits (independent coupling)", "1rf.yaml", ("setup",),
              lambda p: _train_flow(p, stage("1rf"), p.path("base"), None, "1rf"),
              lambda p: [p.model("1rf") / "instaflow.json"]),
        Stage("pairs-1rf", "(X0, X1, prompt) pairs from the 1-RF", "pairs_1rf.yaml", ("1rf",),
              lambda p: _pairs(p, stage("pairs-1rf"), "1rf"), lambda p: [p.pairs("1rf") / "index.json"]),
        Stage("2rf", "reflow: 2-rectified flow on the 1-RF's pairs", "2rf.yaml", ("pairs-1rf",),
              lambda p: _train_flow(p, stage("2rf"), p.model("1rf"), p.pairs("1rf"), "2rf"),
              lambda p: [p.model("2rf") / "instaflow.json"]),
        Stage("pairs-2rf", "pairs from the 2-RF", "pairs_2rf.yaml", ("2rf",),
              lambda p: _pairs(p, stage("pairs-2rf"), "2rf"), lambda p: [p.pairs("2rf") / "index.json"]),
        Stage("distill-2rf", "one-step students distilled from the 2-RF (InstaFlow)", "distill_2rf.yaml",
              ("pairs-2rf",), lambda p: _distill(p, stage("distill-2rf"), "2rf"),
              lambda p: _student_outputs(p, "distill-2rf", "2rf")),
        Stage("distill-1rf", "one-step students distilled directly from the 1-RF (ablation)", "distill_1rf.yaml",
              ("pairs-1rf",), lambda p: _distill(p, stage("distill-1rf"), "1rf"),
              lambda p: _student_outputs(p, "distill-1rf", "1rf")),
        Stage("perflow", "piecewise rectified flow (4 windows) from the 1-RF, its windows solved online",
              "perflow.yaml", ("pairs-1rf",), _perflow, lambda p: [p.model("perflow") / "instaflow.json"]),
        Stage("dmd", "distribution-matching distillation (DMD2) of the 2-RF into one step, against the 1-RF's "
              "scores", "dmd.yaml", ("2rf",), _dmd, lambda p: [p.model("dmd") / "instaflow.json"]),
        Stage("report", "FID, prompt accuracy, straightness, speed; report.md/json, grid and trajectory plots",
              None, ("1rf", "2rf", "distill-2rf", "distill-1rf"), _report,
              lambda p: [p.path("report.md"), p.path("report.json"), p.path("grid.png"), p.path("straightness.png")],
              optional=("perflow", "dmd")),
    ]  # fmt: skip


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for candidate in _stage_list():
        if candidate.name == name:
            return candidate
    raise UserError(f"unknown demo stage {name!r}: choose one of {', '.join(STAGES)}")


# ---- caching -------------------------------------------------------------------------------------------------


def stage_hash(plan: DemoPlan, current: Stage) -> str:
    """What decides a stage's outputs: its config text, its overrides and its upstream stages' hashes."""
    digest = hashlib.sha256(current.name.encode())
    if current.config:
        digest.update((plan.configs / current.config).read_bytes())
    digest.update(json.dumps(plan.overrides.get(current.name, [])).encode())
    digest.update(json.dumps(plan.overrides.get(f"{current.name}:budgets", [])).encode())
    if current.name == "report":
        digest.update(json.dumps(plan.evaluation, sort_keys=True).encode())
    for name in current.upstream:
        digest.update(stage_hash(plan, stage(name)).encode())
    for name in current.optional:
        if finished(plan, name):
            digest.update(stage_hash(plan, stage(name)).encode())
    return digest.hexdigest()[:16]


def is_done(plan: DemoPlan, current: Stage) -> bool:
    """Whether ``current`` finished with the present settings.

    Raises:
        UserError: it finished, or was started and interrupted, with other settings (resuming would mix them).
    """
    record = read_record(plan, current.name)
    if record is None:
        return False
    if record["hash"] != stage_hash(plan, current):
        state = "was run" if record.get("state", "done") == "done" else "was started (and interrupted)"
        raise UserError(
            f"demo stage {current.name} in {plan.out} {state} with other settings (its config or an earlier stage "
            f"changed); rerun with --force --stage {current.name} to redo it and the stages that depend on it, or use "
            "another --out"
        )
    if record.get("state", "done") != "done":
        return False
    missing = [str(p) for p in current.outputs(plan) if not p.exists()]
    if missing:
        raise UserError(
            f"demo stage {current.name} is recorded as done but {missing[0]} is missing; rerun with --force "
            f"--stage {current.name} to redo it"
        )
    return True


def dependents(names: Sequence[str]) -> list[str]:
    """``names`` and every stage that reads their outputs, directly or not, in stage order."""
    found = set(names)
    for name in STAGES:  # upstream stages come first, so one pass closes the set
        if found.intersection(stage(name).upstream + stage(name).optional):
            found.add(name)
    return [n for n in STAGES if n in found]


def clear(plan: DemoPlan, names: Sequence[str]) -> None:
    """Forget ``names`` and the stages that depend on them (records, run folders, models, pairs they wrote)."""
    for name in dependents(names):
        plan.record_path(name).unlink(missing_ok=True)
        for path in _stage_owned(plan, name):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _stage_owned(plan: DemoPlan, name: str) -> list[Path]:
    owned = {
        "setup": [plan.path("base"), plan.path("classifier"), plan.prompts_file],
        "1rf": [plan.run_dir("1rf"), plan.model("1rf")],
        "pairs-1rf": [plan.pairs("1rf"), plan.run_dir("pairs-1rf")],
        "2rf": [plan.run_dir("2rf"), plan.model("2rf")],
        "pairs-2rf": [plan.pairs("2rf"), plan.run_dir("pairs-2rf")],
        "distill-2rf": [plan.run_dir("distill-2rf"), *plan.path("models").glob("student-2rf-*")],
        "distill-1rf": [plan.run_dir("distill-1rf"), *plan.path("models").glob("student-1rf-*")],
        "perflow": [plan.run_dir("perflow"), plan.model("perflow")],
        "dmd": [plan.run_dir("dmd"), plan.model("dmd")],
        "report": [plan.path(n) for n in ("report.md", "report.json", "grid.png", "straightness.png")],
    }
    return owned[name]


# ---- the driver ----------------------------------------------------------------------------------------------


def check_out_folder(plan: DemoPlan) -> None:
    """Refuse an output folder that holds something other than demo outputs (the demo deletes what it redoes)."""
    out = plan.out
    if out.exists() and not out.is_dir():
        raise UserError(f"demo output {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "stages").is_dir():
        raise UserError(f"{out} is not empty and holds no demo run (no stages/ folder); choose a new --out")


def _check_upstream(plan: DemoPlan, order: list[str]) -> None:
    for name in order:
        for upstream in stage(name).upstream:
            if upstream not in order and not is_done(plan, stage(upstream)):
                raise UserError(f"demo stage {name} needs stage {upstream} first: instaflow-pl demo --stage {upstream}")


def _write_record(plan: DemoPlan, current: Stage, state: str, seconds: float | None = None) -> None:
    record = {"stage": current.name, "hash": stage_hash(plan, current), "state": state}
    if seconds is not None:
        record["seconds"] = round(seconds, 1)
    path = plan.record_path(current.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def run_stage(plan: DemoPlan, name: str) -> None:
    """Do one stage's work (no records, no checks: :func:`run_stages` does those)."""
    stage(name).run(plan)


def run_stages(
    plan: DemoPlan, names: Sequence[str] | None = None, force: bool = False, jobs: int = 1
) -> dict[str, float]:
    """Run the demo's stages (all, or ``names`` in order), skipping finished ones.

    Args:
        plan: Output folder, configs, overrides.
        names: Stages to run (their upstream stages must be done or listed too); None: all.
        force: Redo the named stages (all: every stage) and every stage that depends on them (those are run too).
        jobs: Stages at most side by side (:mod:`instaflow_pl.demo.parallel`); 1: one after the other, each in this
            process on every core.

    Returns:
        Wall seconds of each stage run now, in stage order (skipped stages are not listed).
    """
    from instaflow_pl.demo.parallel import run_scheduled

    chosen = list(STAGES) if not names else [stage(n).name for n in names]
    order = dependents(chosen) if force else [n for n in STAGES if n in chosen]
    check_out_folder(plan)
    _check_upstream(plan, order)  # before anything is cleared
    if force:
        clear(plan, order)
    (plan.out / "stages").mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    headers = {name: f"[{i}/{len(order)}] {name}: {stage(name).title}" for i, name in enumerate(order, start=1)}

    def skip(name: str) -> bool:
        if is_done(plan, stage(name)):
            print(f"{headers[name]} -- done earlier, skipped", flush=True)
            return True
        return False

    def begin(name: str) -> None:
        print(f"\n{headers[name]}", flush=True)
        _write_record(plan, stage(name), "started")  # an interrupted stage resumes only with these settings

    def end(name: str, seconds: float) -> None:
        missing = [str(p) for p in stage(name).outputs(plan) if not p.exists()]
        if missing:
            raise UserError(f"demo stage {name} finished without writing {missing[0]}")
        _write_record(plan, stage(name), "done", seconds)
        times[name] = seconds
        print(f"{name} done in {seconds:.0f} s", flush=True)

    if jobs > 1:
        run_scheduled(plan, order, jobs, {s.name: s for s in _stage_list()}, run_stage, skip, begin, end)
    else:
        for name in order:
            if not skip(name):
                begin(name)
                start = time.perf_counter()
                run_stage(plan, name)
                end(name, time.perf_counter() - start)
    return {name: times[name] for name in order if name in times}
