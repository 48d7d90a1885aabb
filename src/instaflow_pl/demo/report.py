"""The demo's report: measure every model, decide which of InstaFlow's findings reproduced, write md/json/PNGs.

The thresholds of the findings are fixed here, before any number is seen, and are never adjusted to make a finding
pass; a finding that does not reproduce is reported as such.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from instaflow_pl.demo.evaluate import (
    Coverage,
    EvalSettings,
    Evaluator,
    Row,
    digits_for_grid,
    distill_loss,
    load_flow,
)
from instaflow_pl.demo.plan import STAGES, DemoPlan, read_record, student_name
from instaflow_pl.errors import UserError
from instaflow_pl.teachers import Teacher

WELL_BELOW = 0.75
"""Finding (b): the 2-RF's best one-step FID must be below this fraction of the 1-RF's."""
STUDENT_ACCURACY = 0.90
"""Finding (d): the one-step student's prompt accuracy must reach this."""
STUDENT_FID_FACTOR = 1.5
"""Finding (d): its FID must be within this factor of the 1-RF's at 25 steps."""
FEW_STEPS = 4
"""Finding (e) compares piecewise reflow with the 2-RF at this many steps (PeRFlow's SD 1.5 setting: 4 windows)."""
ACCURACY_SLACK = 0.01
"""Finding (e): piecewise reflow's prompt accuracy may be at most this far below the 2-RF's."""
DMD_FID_FACTOR = 1.0
"""Finding (f): the DMD student's FID must be at most this factor of the 1-RF's best 25-step FID (DMD2's claim: a
one-step student as good as its many-step teacher; InstaFlow's regression student is held to 1.5x in (d))."""
COVERAGE_SHARE = 0.05
"""Finding (f): every digit must get at least this share of the classifier's readings of the DMD student's samples
(half the 10% the prompts ask for): the modes the classifier can see are all kept."""
FLOWS = {"1-RF": "1rf", "2-RF": "2rf"}
PERFLOW = "PeRFlow"
"""Label of the piecewise rectified flow (stage ``perflow``, model ``models/perflow``)."""
DMD = "DMD student"
"""Label of the distribution-matching student (stage ``dmd``, model ``models/dmd``)."""
STUDENTS = {"2rf": ("student (2-RF)", "distill-2rf"), "1rf": ("student (1-RF)", "distill-1rf")}


@dataclass
class Finding:
    """One of the paper's findings, as measured here.

    Attributes:
        key: ``a`` to ``f``.
        claim: What the paper found.
        reproduced: Whether the measured numbers show it (None: partly).
        evidence: The numbers, in words.
    """

    key: str
    claim: str
    reproduced: bool | None
    evidence: str

    @property
    def verdict(self) -> str:
        """``reproduced``, ``partly reproduced`` or ``not reproduced``."""
        return {True: "reproduced", False: "not reproduced", None: "partly reproduced"}[self.reproduced]


# ---- measuring -------------------------------------------------------------------------------------------------


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="setting", dynamic_ncols=True)


def measure_all(
    plan: DemoPlan,
    evaluator: Evaluator,
    flows_by_label: dict,
    student_budgets: dict[str, list[int]],
    val_fractions: dict[str, float],
) -> tuple[list[Row], list[Row]]:
    """Rows of the flows (every step count and guidance) and of the students (budget 0 = the student's start).

    Args:
        plan: The demo's folders.
        evaluator: Measures a model.
        flows_by_label: The loaded flows, by label (``FLOWS``).
        student_budgets: Per teacher (``2rf``, ``1rf``), the steps at which its students were exported.
        val_fractions: Per teacher, the held-out share of its pairs in its distillation config.
    """
    settings = evaluator.settings
    if student_budgets["2rf"] != student_budgets["1rf"]:
        raise UserError(
            f"the distillation budgets differ ({student_budgets['2rf']} in distill_2rf.yaml, {student_budgets['1rf']} "
            "in distill_1rf.yaml): the ablation compares students at the same budgets; make them equal"
        )
    total = len(FLOWS) * len(settings.steps) * len(settings.guidance) + sum(
        len(b) + 1 for b in student_budgets.values()
    )
    flows, students = [], []
    with _progress(total) as bar:
        for label, key in FLOWS.items():
            teacher = flows_by_label[label]
            for guidance in settings.guidance:
                s = evaluator.straightness(teacher, guidance)
                for steps in settings.steps:
                    row = Row(label, str(plan.model(key)), steps, guidance, straightness=s)
                    flows.append(evaluator.measure(row, teacher))
                    bar.update()
        for key, (label, _) in STUDENTS.items():
            for budget in [0, *student_budgets[key]]:
                folder = plan.model(key) if budget == 0 else plan.model(student_name(key, budget))
                teacher = load_flow(folder)
                loss = distill_loss(teacher, plan.pairs(key), settings.distill_val_pairs, val_fractions[key])
                row = Row(label, str(folder), 1, 1.0, budget=budget, distill_loss=loss)
                students.append(evaluator.measure(row, teacher))
                bar.update()
    return flows, students


def measure_perflow(evaluator: Evaluator, flow: Teacher) -> list[Row]:
    """Rows of the piecewise flow at every evaluated step count up to ``max(FEW_STEPS, K)`` and every guidance; below
    K steps on the uniform grid (see :func:`~instaflow_pl.demo.evaluate.at_steps`)."""
    settings = evaluator.settings
    if FEW_STEPS not in settings.steps:
        raise UserError(f"evaluation steps {settings.steps} lack {FEW_STEPS}: the PeRFlow finding compares there")
    steps = [s for s in settings.steps if s <= max(FEW_STEPS, flow.windows)]
    rows = []
    with _progress(len(steps) * len(settings.guidance)) as bar:
        for guidance in settings.guidance:
            s = evaluator.straightness(flow, guidance)
            for n in steps:
                rows.append(evaluator.measure(Row(PERFLOW, str(flow.source), n, guidance, straightness=s), flow))
                bar.update()
    return rows


def measure_dmd(
    evaluator: Evaluator, flows: list[Row], students: list[Row], student: Teacher, settings: dict[str, Any]
) -> tuple[Row, list[Coverage]]:
    """The DMD student's one-step row (w = 1), and the digit coverage of the 1-RF at the most steps (at its best
    guidance there), of the regression student from the 2-RF (largest budget) and of the DMD student.

    Args:
        evaluator: Measures a model.
        flows: The 1-RF's and 2-RF's rows (the 1-RF's reference setting is read from them).
        students: The regression students' rows.
        student: The DMD student, loaded.
        settings: The dmd stage's settings (``iterations`` is the row's budget).
    """
    with _progress(4) as bar:
        row = evaluator.measure(Row(DMD, str(student.source), 1, 1.0, budget=int(settings["iterations"])), student)
        bar.update()
        most = max(r.steps for r in flows)
        reference = _best(flows, "1-RF", most)
        coverage = [evaluator.coverage("1-RF", load_flow(reference.folder), most, reference.guidance)]
        bar.update()
        regression = _last_student(students, "2rf")
        coverage.append(evaluator.coverage(regression.model, load_flow(regression.folder), 1, 1.0))
        bar.update()
        coverage.append(evaluator.coverage(DMD, student, 1, 1.0))
        bar.update()
    return row, coverage


# ---- findings --------------------------------------------------------------------------------------------------


def _find(rows: list[Row], model: str, steps: int, guidance: float) -> Row:
    return next(r for r in rows if r.model == model and r.steps == steps and r.guidance == guidance)


def _fid(row: Row) -> str:
    return f"{row.fid_mean:.2f} ± {row.fid_std:.2f}"


def finding_straightness(flows: list[Row], guidance: tuple[float, ...]) -> Finding:
    """(a) S(2-RF) < S(1-RF), with the ratio, at every guidance weight."""
    parts, ok = [], True
    for w in guidance:
        s1, s2 = _find(flows, "1-RF", 1, w).straightness, _find(flows, "2-RF", 1, w).straightness
        ok &= s2 < s1
        parts.append(f"w={w:g}: S(1-RF)={s1:.4f}, S(2-RF)={s2:.4f}, ratio {s2 / s1:.2f}")
    return Finding("a", "reflow straightens the flow: S(2-RF) < S(1-RF)", ok, "; ".join(parts))


def finding_one_step(flows: list[Row], guidance: tuple[float, ...]) -> Finding:
    """(b) The 2-RF's best one-step FID well below the 1-RF's (both guidance weights reported)."""
    parts = [
        f"w={w:g}: 1-RF {_fid(_find(flows, '1-RF', 1, w))}, 2-RF {_fid(_find(flows, '2-RF', 1, w))}" for w in guidance
    ]
    best1 = min(_find(flows, "1-RF", 1, w).fid_mean for w in guidance)
    best2 = min(_find(flows, "2-RF", 1, w).fid_mean for w in guidance)
    ratio = best2 / best1
    parts.append(f"best one-step FID ratio 2-RF / 1-RF = {ratio:.2f} (threshold {WELL_BELOW})")
    return Finding("b", "one-step FID of the 2-RF is well below the 1-RF's", ratio < WELL_BELOW, "; ".join(parts))


def finding_budget(students: list[Row]) -> Finding:
    """(c) The ablation: distilling the 2-RF beats distilling the 1-RF directly, budget by budget."""
    reflowed = {r.budget: r for r in students if r.model == STUDENTS["2rf"][0] and r.budget}
    direct = {r.budget: r for r in students if r.model == STUDENTS["1rf"][0] and r.budget}
    wins, parts = [], []
    for budget in sorted(reflowed):
        a, b = reflowed[budget], direct[budget]
        win = a.fid_mean < b.fid_mean
        clear = abs(a.fid_mean - b.fid_mean) > a.fid_std + b.fid_std
        wins.append(win)
        parts.append(
            f"{budget} steps: FID {a.fid_mean:.2f} vs {b.fid_mean:.2f} (ratio {a.fid_mean / b.fid_mean:.2f}"
            f"{'' if clear else ', within the seed spread'}), distillation loss {a.distill_loss:.4f} vs "
            f"{b.distill_loss:.4f}"
        )
    reproduced = True if all(wins) else (False if not any(wins) else None)
    won = [str(b) for b, w in zip(sorted(reflowed), wins, strict=True) if w]
    parts.append(f"reflow-then-distill wins at {', '.join(won) or 'no'} budget(s) of {len(wins)}")
    claim = "distilling the 2-RF beats distilling the 1-RF directly (paper's ablation)"
    return Finding("c", claim, reproduced, "; ".join(parts))


def _last_student(students: list[Row], teacher: str) -> Row:
    """The regression student of ``teacher`` (``2rf``, ``1rf``) with the largest budget."""
    return max((r for r in students if r.model == STUDENTS[teacher][0]), key=lambda r: r.budget or 0)


def finding_student(flows: list[Row], students: list[Row], guidance: tuple[float, ...]) -> Finding:
    """(d) The one-step student (2-RF, largest budget): accuracy >= 90%, FID within 1.5x of the 1-RF at 25 steps.

    "25 steps" is the largest step count evaluated (25 in the demo).
    """
    student = _last_student(students, "2rf")
    most = max(r.steps for r in flows)
    reference = min(_find(flows, "1-RF", most, w).fid_mean for w in guidance)
    ok_acc = student.accuracy_mean >= STUDENT_ACCURACY
    ok_fid = student.fid_mean <= STUDENT_FID_FACTOR * reference
    evidence = (
        f"student after {student.budget} steps: accuracy {student.accuracy_mean:.1%} (needs {STUDENT_ACCURACY:.0%}), "
        f"FID {student.fid_mean:.2f} = {student.fid_mean / reference:.2f} x the 1-RF's best {most}-step FID "
        f"{reference:.2f} (needs <= {STUDENT_FID_FACTOR})"
    )
    claim = "the one-step student keeps the prompt and nearly the 25-step quality"
    return Finding("d", claim, ok_acc and ok_fid, evidence)


def _best(rows: list[Row], model: str, steps: int) -> Row:
    return min((r for r in rows if r.model == model and r.steps == steps), key=lambda r: r.fid_mean)


def finding_perflow(
    flows: list[Row], perflow: list[Row], evaluations: dict[str, float], seconds: dict[str, float], windows: int
) -> Finding:
    """(e) Piecewise reflow against the 2-RF at ``FEW_STEPS`` steps, each at its best guidance weight: reproduced if
    its mean FID is lower (flagged when within the seeds' spread) and its accuracy at most ``ACCURACY_SLACK`` below.

    Args:
        flows: The 1-RF's and 2-RF's rows.
        perflow: The piecewise flow's rows.
        evaluations: Teacher evaluations per training sample, ``2-RF`` and ``PeRFlow``.
        seconds: Recorded wall seconds of the stages (``pairs-1rf``, ``2rf``, ``perflow``).
        windows: The piecewise flow's K.
    """
    a, b = _best(perflow, PERFLOW, FEW_STEPS), _best(flows, "2-RF", FEW_STEPS)
    win = a.fid_mean < b.fid_mean and a.accuracy_mean >= b.accuracy_mean - ACCURACY_SLACK
    clear = abs(a.fid_mean - b.fid_mean) > a.fid_std + b.fid_std

    def wall(*names: str) -> str:
        return " + ".join(f"{seconds[n]:.0f} s ({n})" for n in names) if all(n in seconds for n in names) else "-"

    evidence = (
        f"{FEW_STEPS} steps, best guidance of each: PeRFlow (K={windows}, w={a.guidance:g}) FID {_fid(a)}, accuracy "
        f"{a.accuracy_mean:.1%}; 2-RF (w={b.guidance:g}) FID {_fid(b)}, accuracy {b.accuracy_mean:.1%} (FID ratio "
        f"{a.fid_mean / b.fid_mean:.2f}{'' if clear else ', within the seed spread'}); teacher evaluations per "
        f"training sample {evaluations['PeRFlow']:.2f} (online window solves) vs {evaluations['2-RF']:.2f} (stored "
        f"pairs, reused); same training steps and batch; wall time {wall('perflow')} vs {wall('pairs-1rf', '2rf')}"
    )
    claim = f"piecewise reflow beats the 2-RF at {FEW_STEPS} steps (PeRFlow's few-step claim)"
    return Finding("e", claim, win, evidence)


def _shares(coverage: Coverage) -> str:
    return f"{min(coverage.shares):.1%}-{max(coverage.shares):.1%}"


def _spread(coverage: Coverage) -> float:
    return sum(coverage.spread) / len(coverage.spread)


def finding_dmd(
    flows: list[Row], students: list[Row], dmd: Row, coverage: list[Coverage], seconds: dict[str, float]
) -> Finding:
    """(f) The DMD student against the 1-RF's best 25-step FID (DMD2's claim; keyed ``f``, after PeRFlow's ``e``).

    Reproduced if its FID is at most ``DMD_FID_FACTOR`` x that reference, its prompt accuracy reaches
    ``STUDENT_ACCURACY`` and every digit gets at least ``COVERAGE_SHARE`` of the classifier's readings; partly if
    it misses the FID goal but beats the regression student from the 2-RF (largest budget) with the other two kept;
    else not reproduced.

    Args:
        flows: The 1-RF's and 2-RF's rows ("25 steps" is the most steps evaluated).
        students: The regression students' rows.
        dmd: The DMD student's one-step row.
        coverage: Digit coverage of the 1-RF (reference setting), the regression student and the DMD student, as
            :func:`measure_dmd` returns it.
        seconds: Recorded wall seconds of the stages (``dmd``, ``distill-2rf``).
    """
    most = max(r.steps for r in flows)
    reference = _best(flows, "1-RF", most)
    regression = _last_student(students, "2rf")
    by_model = {c.model: c for c in coverage}
    ratio = dmd.fid_mean / reference.fid_mean
    ok_acc = dmd.accuracy_mean >= STUDENT_ACCURACY
    ok_cov = min(by_model[DMD].shares) >= COVERAGE_SHARE
    beats_regression = dmd.fid_mean < regression.fid_mean
    clear = abs(dmd.fid_mean - regression.fid_mean) > dmd.fid_std + regression.fid_std
    if ratio <= DMD_FID_FACTOR and ok_acc and ok_cov:
        reproduced: bool | None = True
    elif beats_regression and ok_acc and ok_cov:
        reproduced = None
    else:
        reproduced = False

    def wall(name: str) -> str:
        return f"{seconds[name]:.0f} s ({name})" if name in seconds else "-"

    teacher, student = by_model["1-RF"], by_model[regression.model]
    evidence = (
        f"DMD student after {dmd.budget} iterations: one-step FID {_fid(dmd)} = {ratio:.2f} x the 1-RF's best "
        f"{most}-step FID {_fid(reference)} (w={reference.guidance:g}; goal <= {DMD_FID_FACTOR:g}); the regression "
        f"student from the 2-RF ({regression.budget} steps): FID {_fid(regression)} = "
        f"{regression.fid_mean / reference.fid_mean:.2f} x (DMD {'lower' if beats_regression else 'not lower'}"
        f"{'' if clear else ', within the seed spread'}); prompt accuracy {dmd.accuracy_mean:.1%} (needs "
        f"{STUDENT_ACCURACY:.0%}; regression student {regression.accuracy_mean:.1%}); share of the classifier's "
        f"readings per digit (10% asked) {_shares(by_model[DMD])} vs {_shares(teacher)} for the 1-RF at {most} "
        f"steps and {_shares(student)} for the regression student (each needs >= {COVERAGE_SHARE:.0%}); "
        f"within-prompt feature spread (real digits 1) {_spread(by_model[DMD]):.2f} vs {_spread(teacher):.2f} and "
        f"{_spread(student):.2f}; wall time {wall('dmd')} vs {wall('distill-2rf')}"
    )
    claim = f"distribution matching gives a one-step student as good as the {most}-step 1-RF (DMD2's claim)"
    return Finding("f", claim, reproduced, evidence)


# ---- pictures --------------------------------------------------------------------------------------------------


def grid_figure(rows: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """Rows of ten digits (one column per prompt, the same noise in every row), labelled, as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from instaflow_pl.callbacks.images import figure_to_pil
    from instaflow_pl.data.digits import DIGIT_WORDS

    figure, axes = plt.subplots(len(rows), 10, figsize=(10 * 0.8 + 2.2, len(rows) * 0.8 + 0.4), dpi=100)
    for r, (label, images) in enumerate(rows):
        for c in range(10):
            axis = axes[r, c]
            axis.imshow(images[c, 0].cpu().numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(DIGIT_WORDS[c], fontsize=9)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    figure.tight_layout(pad=0.3)
    return figure_to_pil(figure)


def draw_grid(
    plan: DemoPlan,
    evaluator: Evaluator,
    students: list[Row],
    flows_by_label: dict,
    perflow: Teacher | None = None,
    dmd: Teacher | None = None,
) -> Image.Image:
    """Real digits, the flows at 1 and 25 steps, the largest-budget students, the piecewise flow at ``FEW_STEPS``
    steps and the DMD student at one step (each when given)."""
    rows: list[tuple[str, torch.Tensor]] = [("real (held-out)", digits_for_grid().images)]
    guided = max(evaluator.settings.guidance)
    for label, teacher in flows_by_label.items():
        for steps, w in ((1, 1.0), (1, guided), (25, guided)):
            rows.append((f"{label}, {steps} step{'s' * (steps > 1)}, w={w:g}", evaluator.samples(teacher, steps, w)))
    for key, (label, _) in STUDENTS.items():
        last = max((r for r in students if r.model == label), key=lambda r: r.budget or 0)
        teacher = load_flow(plan.model(student_name(key, last.budget)))
        rows.append((f"{label}, {last.budget} steps, 1 step", evaluator.samples(teacher, 1, 1.0)))
    if perflow is not None:
        rows.append((f"{PERFLOW}, {FEW_STEPS} steps, w=1", evaluator.samples(perflow, FEW_STEPS, 1.0)))
    if dmd is not None:
        rows.append((f"{DMD}, 1 step", evaluator.samples(dmd, 1, 1.0)))
    return grid_figure(rows)


def draw_straightness(evaluator: Evaluator, flows_by_label: dict, count: int = 12) -> Image.Image:
    """Trajectories of the 1-RF and the 2-RF from the same noises (2-D projection) and their gap over t."""
    from instaflow_pl.callbacks.trajectories import trajectory_figure

    solutions = {label: evaluator.trajectory(flow, 1.0, count) for label, flow in flows_by_label.items()}
    return trajectory_figure(solutions)


# ---- writing -------------------------------------------------------------------------------------------------


def stage_seconds(plan: DemoPlan) -> dict[str, float]:
    """Recorded wall time of each finished stage."""
    records = {name: read_record(plan, name) for name in STAGES}
    return {name: float(r["seconds"]) for name, r in records.items() if r is not None and "seconds" in r}


def _table(rows: list[Row], with_budget: bool) -> list[str]:
    head = "| model | budget | steps | w | FID (mean ± sd) | accuracy | S | ms/image | distill loss |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        budget = str(r.budget) if with_budget and r.budget is not None else "-"
        s = f"{r.straightness:.4f}" if r.straightness is not None else "-"
        loss = f"{r.distill_loss:.4f}" if r.distill_loss is not None else "-"
        lines.append(
            f"| {r.model} | {budget} | {r.steps} | {r.guidance:g} | {_fid(r)} | {r.accuracy_mean:.1%} | {s} | "
            f"{r.ms_per_image:.3f} | {loss} |"
        )
    return lines


def render_markdown(report: dict[str, Any], flows: list[Row], students: list[Row], findings: list[Finding]) -> str:
    """report.md."""
    settings = report["settings"]
    lines = [
        "# instaflow-pl digits demo: report",
        "",
        f"Written {report['written']}. Models: a residual-MLP velocity on 8x8 digits (pixel space) conditioned on a "
        "frozen tiny CLIP text encoder. FID uses the 64 features of the project's digit classifier against the "
        f"{report['reference_count']} held-out digits; every model is sampled from the same noises, "
        f"{settings['samples_per_prompt']} per prompt and {settings['seeds']} seeds (mean ± sd over seeds). "
        f"For scale, real training digits (as many, seen by the classifier) score {report['fid_floor']:.2f}. "
        f"Classifier accuracy on held-out digits: {report['classifier_accuracy']:.1%}. "
        "Accuracy = share of samples the classifier reads as the prompted digit. S = straightness along a "
        f"{settings['straightness_steps']}-step Euler trajectory (0 = straight). w = guidance (1 = none).",
        "",
        "## Findings",
        "",
    ]
    for f in findings:
        lines.append(f"- **({f.key}) {f.claim}: {f.verdict}.** {f.evidence}.")
    lines += ["", "## Flows", "", *_table(flows, with_budget=False), ""]
    lines += [
        "## Students (one step, w = 1) by distillation budget",
        "",
        "Budget 0 is the student's starting point (its teacher at one step). The distillation loss is the mean "
        "squared error to the held-out pairs of the student's own teacher (so the two columns measure different "
        "targets: how well each student matches what it was taught).",
        "",
        *_table(students, with_budget=True),
        "",
        *_perflow_section(report),
        *_dmd_section(report),
        "## Pictures",
        "",
        "- `grid.png`: rows = models, columns = prompts (the same noise down each column).",
        "- `straightness.png`: trajectories of the 1-RF and 2-RF from the same noises, and their gap over t.",
        "",
        f"## Wall time of each stage ({report['threads']} torch threads on {report['cpus']} CPUs)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    times = report["stage_seconds"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in times.items()]
    lines += [f"| total | {sum(times.values()):.0f} |", ""]
    return "\n".join(lines)


def _perflow_section(report: dict[str, Any]) -> list[str]:
    if "perflow" not in report:
        return []
    rows = [Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in report["perflow"]]
    windows = report["perflow_windows"]
    return [
        f"## Piecewise rectified flow (PeRFlow, K = {windows} windows) from the 1-RF",
        "",
        "Trained with the 2-RF's steps, batch and optimiser, on the same digits (X1 of the 1-RF's pairs), its windows "
        f"solved online by the 1-RF (configs/demo/perflow.yaml). Below {windows} steps it cannot take one step per "
        "window: those rows sample it on the uniform grid, one step crossing windows. S is measured on its "
        f"{report['settings']['straightness_steps']}-step piecewise grid (a piecewise flow is straight at best inside "
        "each window, so its S need not approach 0).",
        "",
        *_table(rows, with_budget=False),
        "",
    ]


def _digit_table(coverage: list[dict[str, Any]], field: str, percent: bool) -> list[str]:
    lines = ["| model | " + " | ".join(str(d) for d in range(10)) + " |", "|---" * 11 + "|"]
    for c in coverage:
        values = " | ".join(f"{v:.1%}" if percent else f"{v:.2f}" for v in c[field])
        label = f"{c['model']}, {c['steps']} step{'s' * (c['steps'] > 1)}, w={c['guidance']:g}"
        lines.append(f"| {label} | {values} |")
    return lines


def _dmd_section(report: dict[str, Any]) -> list[str]:
    if "dmd" not in report:
        return []
    row = Row(**{k: v for k, v in report["dmd"].items() if k in Row.__dataclass_fields__})
    settings, coverage = report["dmd_settings"], report["dmd_coverage"]
    return [
        "## Distribution-matching distillation (DMD2) of the 2-RF against the 1-RF's scores",
        "",
        f"The generator starts from the 2-RF; the real score is the 1-RF (guidance {settings['real_guidance']:g}), "
        f"the fake score a trainable copy of it; {settings['iterations']} iterations of {settings['batch_size']} "
        f"digit prompts, the generator stepping every {settings['generator_every']}-th (configs/demo/dmd.yaml). "
        "One step, no guidance. Budget = iterations (fake-score steps).",
        "",
        *_table([row], with_budget=True),
        "",
        "What the classifier sees of the modes, over every seed's samples: the share of all samples read as each "
        "digit (the prompts ask for 10% each),",
        "",
        *_digit_table(coverage, "shares", percent=True),
        "",
        "the share of each digit's prompt's samples read as that digit,",
        "",
        *_digit_table(coverage, "accuracy", percent=True),
        "",
        "and the spread of each prompt's samples in the classifier's feature space (sqrt of the trace of their "
        "covariance) over that of the held-out digits of that class (1: as varied as real digits; 0: one image "
        "per prompt).",
        "",
        *_digit_table(coverage, "spread", percent=False),
        "",
    ]


def _log_wandb(plan: DemoPlan, report: dict[str, Any], pictures: dict[str, Image.Image]) -> None:
    import wandb

    folder = plan.run_dir("report")
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="instaflow-pl-demo", name="demo-report", dir=str(folder), config=report["settings"])
    columns = ["model", "budget", "steps", "guidance", "fid_mean", "fid_std", "accuracy", "straightness", "ms"]
    table = wandb.Table(columns=columns)
    dmd = [report["dmd"]] if "dmd" in report else []
    for r in report["flows"] + report["students"] + report.get("perflow", []) + dmd:
        table.add_data(
            r["model"], r["budget"], r["steps"], r["guidance"], r["fid_mean"], r["fid_std"], r["accuracy_mean"],
            r["straightness"], r["ms_per_image"],
        )  # fmt: skip
    run.log({"report/table": table, **{f"report/{k}": wandb.Image(v) for k, v in pictures.items()}})
    run.summary.update({f"finding_{f['key']}": f["verdict"] for f in report["findings"]})
    run.finish()


def write_report(
    plan: DemoPlan,
    budgets: dict[str, list[int]],
    val_fractions: dict[str, float],
    teacher_cost: dict[str, float] | None = None,
    dmd: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure, decide, and write report.md, report.json, grid.png and straightness.png to the demo's folder.

    Args:
        plan: The demo's folders.
        budgets: Per teacher of ``STUDENTS`` (``2rf``, ``1rf``), the steps at which its students were exported.
        val_fractions: Per teacher, the held-out share of its pairs in its distillation config.
        teacher_cost: Teacher evaluations per training sample of the ``2-RF`` and ``PeRFlow`` when the piecewise
            flow (``models/perflow``) is to be reported (finding (e)); None: the report leaves it out.
        dmd: The dmd stage's settings (``iterations``, ``batch_size``, ``generator_every``, ``real_guidance``) when
            the DMD student (``models/dmd``) is to be reported (finding (f)); None: the report leaves it out.
    """
    from instaflow_pl.demo.classifier import load_classifier

    start = time.perf_counter()
    settings = EvalSettings(**plan.evaluation)
    classifier = load_classifier(plan.path("classifier"))
    evaluator = Evaluator(classifier, settings)
    flow_models = {label: load_flow(plan.model(key)) for label, key in FLOWS.items()}  # loaded once, used thrice
    flows, students = measure_all(plan, evaluator, flow_models, budgets, val_fractions)
    findings = [
        finding_straightness(flows, settings.guidance),
        finding_one_step(flows, settings.guidance),
        finding_budget(students),
        finding_student(flows, students, settings.guidance),
    ]
    piecewise, perflow = None, []
    if teacher_cost is not None:
        piecewise = load_flow(plan.model("perflow"))
        perflow = measure_perflow(evaluator, piecewise)
        findings.append(finding_perflow(flows, perflow, teacher_cost, stage_seconds(plan), piecewise.windows))
    dmd_student, dmd_row, coverage = None, None, []
    if dmd is not None:
        dmd_student = load_flow(plan.model("dmd"))
        dmd_row, coverage = measure_dmd(evaluator, flows, students, dmd_student, dmd)
        findings.append(finding_dmd(flows, students, dmd_row, coverage, stage_seconds(plan)))
    pictures = {
        "grid": draw_grid(plan, evaluator, students, flow_models, piecewise, dmd_student),
        "straightness": draw_straightness(evaluator, flow_models),
    }
    times = {**stage_seconds(plan), "report": time.perf_counter() - start}
    report: dict[str, Any] = {
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
        "fid_floor": evaluator.floor(),
        "reference_count": evaluator.reference.count,
        "classifier_accuracy": evaluator.classifier_accuracy(),
        "flows": [r.to_json() for r in flows],
        "students": [r.to_json() for r in students],
        **(
            {
                "perflow": [r.to_json() for r in perflow],
                "perflow_windows": piecewise.windows,
                "teacher_evaluations": teacher_cost,
            }
            if piecewise is not None
            else {}
        ),
        **(
            {"dmd": dmd_row.to_json(), "dmd_settings": dmd, "dmd_coverage": [c.to_json() for c in coverage]}
            if dmd_row is not None
            else {}
        ),
        "findings": [{**vars(f), "verdict": f.verdict} for f in findings],
        "stage_seconds": times,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    for name, picture in pictures.items():
        picture.save(plan.path(f"{name}.png"))
    plan.path("report.json").write_text(json.dumps(report, indent=2) + "\n")
    plan.path("report.md").write_text(render_markdown(report, flows, students, findings))
    _log_wandb(plan, report, pictures)
    for f in findings:
        print(f"({f.key}) {f.verdict}: {f.claim}")
    print(f"wrote {plan.path('report.md')}, report.json, grid.png, straightness.png")
    return report
