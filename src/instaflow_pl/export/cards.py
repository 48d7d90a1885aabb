"""The model cards (``README.md``) of exports: what was trained from what, its metrics, and how to use it. The "Use"
sections are the family's (:meth:`Family.card_use`, :meth:`Family.card_lora_use`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instaflow_pl.export.folder import read_json


def model_card(info: dict[str, Any], image_size: int) -> str:
    """A short README.md for an exported folder; its "Use" section is the family's (:meth:`Family.card_use`).

    Args:
        info: What the export's ``instaflow.json`` records.
        image_size: The export's native image height and width in pixels (its snippets sample at that size).
    """
    stages = " -> ".join(info["stages"])
    windows = int(info.get("windows") or 1)
    steps = info.get("student_steps") or (windows if windows > 1 else None)
    metrics = info["metrics"]
    metric_lines = [f"- `{name}`: {value:.6g}" for name, value in sorted(metrics.items())] or ["- not recorded"]
    data = info["data"] or "not recorded"
    pairs = _pairs_summary(info["data"])
    lines = [
        "# InstaFlow velocity model",
        "",
        f"Exported by `instaflow-pl export` from `{info['exported_from']}`.",
        "",
        f"- base model: `{info['base_model']}` ({info['base_kind']})",
        f"- stage(s): {stages} (this checkpoint: {info['module']})",
        f"- training steps: {info['training_steps']} (epoch {info['epoch']})",
        f"- weights: {'EMA (decay ' + str(info['ema_decay']) + ')' if info['weights'] == 'ema' else 'raw (no EMA)'}",
        f"- guidance used in validation: {info['val_guidance']} (1 or less: none)",
        f"- training data: `{data}`" + (f" (pairs: {pairs})" if pairs else ""),
    ]
    if info.get("student_steps") is not None:
        lines.append(f"- student steps: {steps} (sample with `--steps {steps}`)")
    lines += _teacher_lines(info)
    lines += [
        "",
        "## Metrics",
        "",
        *metric_lines,
        "",
        "## Use",
        "",
        *_windows_note(windows),
        *_card_family(info).card_use(steps or 1, {**info, "image_size": image_size}),
        "",
    ]
    return "\n".join(lines)


def _teacher_lines(info: dict[str, Any]) -> list[str]:
    """The card's facts on the teacher of a piecewise reflow (stage ``perflow``): none for other stages."""
    if info.get("stage") != "perflow":
        return []
    guidance = "the student's condition at guidance 1 (cfg_sync)" if info.get("cfg_sync") else (
        f"guidance {info.get('teacher_guidance')}"
    )  # fmt: skip
    return [
        f"- teacher: `{info.get('teacher')}`, solved online in each of {info.get('windows', 1)} window(s) with "
        f"{info.get('window_solver_steps')} `{info.get('teacher_solver')}` steps, {guidance}",
    ]


def _windows_note(windows: int) -> list[str]:
    """The "Use" section's first paragraph for a piecewise flow (K > 1 windows): how many steps it must take."""
    if windows <= 1:
        return []
    return [
        f"This is a piecewise rectified flow with K = {windows} time windows (PeRFlow): its paths are straight inside",
        f"each window, not across windows, so it must be sampled with n >= {windows} Euler steps (n // K per window,",
        "the remainder in the first windows, every window boundary on the grid). n a multiple of K is best: each",
        "window then gets the same n / K uniform steps, and the whole grid is uniform. The snippets use",
        f"n = {windows}. instaflow-pl (and the shipped `instaflow_pipeline.py`, where there is one) refuses fewer",
        f"than {windows} steps.",
        "",
    ]


def lora_card(info: dict[str, Any]) -> str:
    """A short README.md for a LoRA export (loaded with the family's pipeline class, :meth:`Family.card_lora_use`)."""
    family = _card_family(info)
    return "\n".join(
        [
            "# InstaFlow velocity LoRA",
            "",
            f"Adapters (rank {info['lora']['rank']}) exported by `instaflow-pl export --lora-format file` from "
            f"`{info['exported_from']}`, for the base model `{info['base_model']}` ({info['training_steps']} "
            f"training steps, {'EMA' if info['weights'] == 'ema' else 'raw'} weights).",
            "",
            *family.card_lora_use(info["base_model"]),
            "",
            f"With adapters the {family.network_folder} is a velocity model (t = 0 noise, network timestep "
            "(1 - t) * 1000); sample it with",
            "instaflow-pl's Euler LatentODE, or export merged weights (the default) for a folder that samples alone.",
            "",
        ]
    )


def _card_family(info: dict[str, Any]):
    """The family an export's card is written for (``sd`` for records from before families)."""
    from instaflow_pl.families import family_named

    return family_named(info.get("family") or "sd", "the export record")


def _pairs_summary(data: str | None) -> str | None:
    if not data or "://" in data:
        return None
    manifest = read_json(Path(data).expanduser() / "manifest.json")
    if not manifest:
        return None
    keys = ("teacher", "solver", "steps", "guidance", "count")
    return ", ".join(f"{k} {manifest[k]}" for k in keys if k in manifest) or None
