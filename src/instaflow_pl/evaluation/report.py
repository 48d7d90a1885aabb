"""The evaluation's report: the paper's table (model | steps | guidance | NFE | FID | CLIP | ms/img) and a grid."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw
from torch import nn
from torchmetrics.image.fid import _compute_fid

from instaflow_pl.evaluation.store import REPORT_FILES, EvaluationStore
from instaflow_pl.fileio import atomic_path, atomic_write_text
from instaflow_pl.metrics import FIDReference

COLUMNS = ("model", "steps", "guidance", "NFE", "FID", "CLIP", "ms/img")


def frechet_distance(reference: FIDReference, features: torch.Tensor) -> float:
    """FID between reference statistics and generated features (the same estimator: float64 sums, unbiased cov)."""
    generated = FIDReference.compute(features.split(1024), nn.Identity())
    return float(_compute_fid(reference.mean, reference.cov, generated.mean, generated.cov))


def measure_rows(store: EvaluationStore, reference: FIDReference) -> tuple[list[dict], list[torch.Tensor]]:
    """Each row's numbers from its stored shards, and its grid images."""
    rows, images = [], []
    for k, spec in enumerate(store.rows):
        result = store.read_row(k)
        timing = store.timing(k) or {}
        rows.append(
            {
                "model": spec.name,
                "folder": spec.folder,
                "kind": spec.kind,
                "solver": spec.solver,
                "steps": spec.steps,
                "guidance": spec.guidance,
                "dtype": spec.dtype,
                "nfe": result.nfe,
                "fid": frechet_distance(reference, result.features),
                "clip": float(result.clip.mean()) if result.clip.numel() else None,
                "ms_per_image": timing.get("ms_per_image"),
                "timing": timing or None,
                "samples": len(result.indices),
            }
        )
        images.append(result.images)
    return rows, images


def markdown(report: dict) -> str:
    """The report as Markdown: the table, then how it was measured."""
    lines = ["# Evaluation", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        clip = f"{row['clip']:.2f}" if row["clip"] is not None else "-"
        ms = f"{row['ms_per_image']:.1f}" if row["ms_per_image"] is not None else "-"
        fid = f"{row['fid']:.2f}" if abs(row["fid"]) >= 1 else f"{row['fid']:.3g}"  # tiny settings: tiny numbers
        cells = (row["model"], row["steps"], f"{row['guidance']:g}", row["nfe"], fid, clip, ms)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    spec = report["evaluation"]
    devices = sorted({row["timing"]["device"] for row in report["rows"] if row["timing"]})
    batch = sorted({row["timing"]["batch_size"] for row in report["rows"] if row["timing"]})
    lines += [
        "",
        f"- {spec['num_samples']} samples a row: the first captions of {spec['captions_source']}, sample i from the "
        f"noise of seed {spec['seed']} + i in every row.",
        f"- FID against {report['reference']['count']} images of {spec['reference_folder']} "
        f"({report['reference']['convention']}).",
        "- CLIP: 100 x cosine of the CLIP image and caption embeddings, mean over the samples."
        if any(row["clip"] is not None for row in report["rows"])
        else "- CLIP: not measured (no clip_model).",
        "- NFE: network evaluations per image; a guided step (guidance > 1) counts 2 (conditional + unconditional).",
        f"- ms/img: captions to decoded images, warm, batch {', '.join(map(str, batch)) or '-'}, on "
        f"{', '.join(devices) or '-'}.",
        f"- grid.png: rows in table order, columns the first {spec['grid_columns']} captions (same noise down a "
        "column).",
        "",
    ]
    return "\n".join(lines)


def grid(rows: list[dict], images: list[torch.Tensor], captions: Sequence[str]) -> Image.Image | None:
    """Rows = the report's rows, columns = the first captions, with each row's label on the left."""
    if not images or not all(i.shape[0] for i in images):
        return None
    columns = min(i.shape[0] for i in images)
    size = images[0].shape[-1]
    label_width = 10 + 7 * max(len(_label(r)) for r in rows)
    canvas = Image.new("RGB", (label_width + columns * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, row_images) in enumerate(zip(rows, images, strict=True)):
        draw.text((5, r * size + size // 2 - 5), _label(row), fill="black")
        for c in range(columns):
            picture = Image.fromarray(row_images[c].permute(1, 2, 0).numpy())
            canvas.paste(picture, (label_width + c * size, r * size))
    return canvas


def _label(row: dict) -> str:
    return f"{row['model']} {row['steps']} step{'s' if row['steps'] != 1 else ''} w={row['guidance']:g}"


def write_report(
    store: EvaluationStore, reference: FIDReference, captions: Sequence[str], convention: str = "", loggers=()
) -> Path:
    """Write report.json, report.md and grid.png in the evaluation folder and log them; return report.md's path.

    A report that differs from one already in the folder (rows were added) does not replace it silently: the earlier
    files are moved to ``earlier-reports/<n>/`` first.
    """
    from dataclasses import asdict

    rows, images = measure_rows(store, reference)
    report = {
        "evaluation": asdict(store.spec),
        "reference": {
            "count": reference.count,
            "convention": convention,
        },
        "rows": rows,
    }
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    root = store.root
    old = root / "report.json"
    picture = grid(rows, images, captions)
    if old.is_file() and old.read_text() == text and all((root / name).is_file() for name in REPORT_FILES):
        rank_zero_info(f"{root}: the report is up to date\n{(root / 'report.md').read_text()}")
        log_report(loggers, rows, picture)
        return root / "report.md"
    if any((root / name).exists() for name in REPORT_FILES):
        n = 1
        while (root / "earlier-reports" / str(n)).exists():
            n += 1
        keep = root / "earlier-reports" / str(n)
        keep.mkdir(parents=True)
        for name in REPORT_FILES:
            if (root / name).exists():
                shutil.move(root / name, keep / name)
        rank_zero_info(f"the earlier report differs (other rows); it was moved to {keep}")
    if picture is not None:
        with atomic_path(root / "grid.png") as tmp:
            picture.save(tmp, format="PNG")
    text_md = markdown(report)
    atomic_write_text(root / "report.md", text_md)
    atomic_write_text(old, text)  # last: its presence means the report is complete
    rank_zero_info(text_md)
    log_report(loggers, rows, picture)
    return root / "report.md"


def log_report(loggers, rows: list[dict], picture: Image.Image | None) -> None:
    """The table and the grid to W&B; the numbers (``eval/fid/<model>@<steps>,w=<g>`` ...) to every logger."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers or ():
        metrics = {}
        for row in rows:
            name = f"{row['model']}@{row['steps']},w={row['guidance']:g}"
            metrics[f"eval/fid/{name}"] = row["fid"]
            if row["clip"] is not None:
                metrics[f"eval/clip/{name}"] = row["clip"]
            if row["ms_per_image"] is not None:
                metrics[f"eval/ms_per_image/{name}"] = row["ms_per_image"]
        logger.log_metrics(metrics, step=0)
        if isinstance(logger, WandbLogger):
            data = [
                [r["model"], r["steps"], r["guidance"], r["nfe"], r["fid"], r["clip"], r["ms_per_image"]] for r in rows
            ]
            logger.log_table(key="eval/report", columns=list(COLUMNS), data=data)
            if picture is not None:
                logger.log_image(key="eval/grid", images=[picture], caption=["rows: model x steps x guidance"])
        logger.save()
