"""The summary of a sweep: its trials ranked by the sweep's metric, as ``summary.md`` (a table) and ``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from instaflow_pl.sweep.spec import Sweep, TrialResult


def ranked(sweep: Sweep, results: Sequence[TrialResult]) -> list[TrialResult]:
    """Trials best first by the sweep's metric; failed trials and trials without the metric last, in trial order."""
    sign = 1.0 if sweep.goal == "minimize" else -1.0

    def key(result: TrialResult) -> tuple[bool, float]:
        value = result.value(sweep.metric)
        return (result.returncode != 0 or value is None, sign * value if value is not None else 0.0)

    return sorted(results, key=key)


def write_summary(sweep: Sweep, results: Sequence[TrialResult], out: Path, seed: int, notes: Sequence[str] = ()) -> str:
    """Write ``summary.md`` (a table sorted by the metric) and ``summary.json``; returns the table."""
    order = ranked(sweep, results)
    names = list(sweep.parameters)
    header = ["rank", "trial", *(short_name(name, sweep) for name in names), sweep.metric, "steps", "status", "seconds"]
    rows = []
    for rank, result in enumerate(order, 1):
        value = result.value(sweep.metric)
        rows.append(
            [
                str(rank),
                f"{result.index:03d}",
                *(str(result.params.get(name)) for name in names),
                f"{value:.6g}" if value is not None else "-",
                str(int(result.metrics.get("global_step", 0))),
                result.status,
                f"{result.seconds:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    table = "\n".join(lines)
    title = f"# Sweep {sweep.path.name} ({sweep.method}, {sweep.goal} {sweep.metric})\n\n"
    extra = "".join(f"- {note}\n" for note in notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(title + (extra + "\n" if extra else "") + table + "\n")
    summary = {
        "sweep": str(sweep.path),
        "method": sweep.method,
        "metric": {"name": sweep.metric, "goal": sweep.goal},
        "seed": seed,
        "notes": list(notes),
        "trials": [
            {
                "rank": rank,
                "trial": result.index,
                "params": result.params,
                "value": result.value(sweep.metric),
                "metrics": result.metrics,
                "status": result.status,
                "seconds": round(result.seconds, 2),
                "directory": str(result.directory),
                "command": result.command,
            }
            for rank, result in enumerate(order, 1)
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return table


def short_name(name: str, sweep: Sweep) -> str:
    """A parameter's last key (``lr``) when no other parameter ends the same way, else its whole name."""
    last = name.rsplit(".", 1)[-1]
    return last if sum(n.rsplit(".", 1)[-1] == last for n in sweep.parameters) == 1 else name
