"""What a training checkpoint gives an export: its network with the exported weights, and the facts its folder and
model card record (stages, training steps, data, metrics). The record itself is :mod:`instaflow_pl.checkpoints`'."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from instaflow_pl.checkpoints import CheckpointRecord, network_weights, read_record
from instaflow_pl.errors import UserError
from instaflow_pl.model_folder import ModelFolder

EXPORTABLE_MODULES = {"ReflowModule": "reflow", "DistillModule": "distill", "DMDModule": "dmd"}
"""Module kinds whose checkpoints export, and the stage each one is (a ReflowModule with a teacher in it:
:data:`PERFLOW_STAGE`)."""
PERFLOW_STAGE = "perflow"
"""The stage of a ReflowModule that learned a teacher's windows online (piecewise rectified flow)."""
PERFLOW_OPTIONS = ("teacher", "teacher_solver", "window_solver_steps", "teacher_guidance", "cfg_sync", "teacher_dtype")
"""The options of a piecewise reflow that an export records besides ``windows`` (which every export records)."""


def export_stage(record: CheckpointRecord, hparams: dict[str, Any]) -> str:
    """The stage a checkpoint's model is: its module's (:data:`EXPORTABLE_MODULES`), or ``perflow`` for a
    ReflowModule that trained on its teacher's windows (``teacher`` set, whatever the number of windows) rather than
    on stored pairs."""
    if record.module == "ReflowModule" and hparams.get("teacher"):
        return PERFLOW_STAGE
    return EXPORTABLE_MODULES[record.module]


def find_checkpoint(source: str | Path) -> Path:
    """``source`` itself (a file, or the folder of a sharded checkpoint), or the newest ``*.ckpt`` in it when it is a
    folder of checkpoints (e.g. a run's ``checkpoints/``).

    Raises:
        UserError: nothing there, or a folder without checkpoints.
    """
    path = Path(source).expanduser()
    if (path / ".metadata").is_file():  # a sharded checkpoint (a folder of shards)
        return path
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        if not found:
            raise UserError(f"no *.ckpt checkpoint in {path}; train first or pass a checkpoint file")
        return found[-1]
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def exportable_record(checkpoint: dict[str, Any], source: str) -> CheckpointRecord:
    """The record of a checkpoint written by a module whose checkpoints export (``ReflowModule``,
    ``DistillModule``); the checkpoint is brought to today's layout on the way.

    Raises:
        UserError: not written by the project's training modules, or by a module whose checkpoints do not export.
    """
    record = read_record(checkpoint, source=source)
    if record.module not in EXPORTABLE_MODULES:
        raise UserError(
            f"{source} was written by {record.module}, which has no model to export; export a checkpoint of "
            f"{' or '.join(EXPORTABLE_MODULES)}"
        )
    return record


def checkpoint_family(record: CheckpointRecord, source: str):
    """The model family of a checkpoint's velocity: the recorded one (``sd`` for checkpoints from before families were
    recorded), or the family that owns the recorded network when the name is an older one (the digits MLP's ``sd``)."""
    from instaflow_pl.families import family_named, family_of_network_config

    family = family_named(record.family, source)
    config = record.network_config
    if config is not None and not family.owns_network_config(config):
        return family_of_network_config(config, source)
    return family


def _base_weights(base: ModelFolder, keys: set[str], source: str) -> dict[str, torch.Tensor]:
    """The base model's network weights for ``keys`` (LoRA's ``.base_layer`` names map to the plain layer names)."""
    plain = base.load_network().state_dict()
    out = {}
    for key in keys:
        name = key.replace(".base_layer.", ".")
        if name not in plain:
            raise UserError(
                f"{source}: its base model {base.root} has no network weight {name}; export needs the same base"
            )
        out[key] = plain[name]
    return out


def build_network(checkpoint: dict[str, Any], record: CheckpointRecord, source: str, base: ModelFolder | None = None):
    """The checkpoint's velocity network as a diffusers model with the exported weights: the EMA's (or raw)
    trained weights, frozen weights from ``base``'s network where the checkpoint left them out, and LoRA adapters
    merged into their layers.

    Returns:
        ``(network, is_ema)``.
    """
    from instaflow_pl.families import network_from_config
    from instaflow_pl.modules.lora import LoraOptions, add_lora, merge_lora

    if record.network_config is None:
        raise UserError(
            f"{source} has no network config: its velocity is not a diffusers network, and export writes diffusers "
            "folders"
        )
    weights, is_ema = network_weights(checkpoint, source)
    lora = LoraOptions.parse(record.lora)
    with torch.device("meta"):  # no memory for weights that are assigned next
        network = network_from_config(record.network_config, source)
        if lora is not None:
            add_lora(network, lora)
    missing = set(network.state_dict()) - set(weights)
    if missing and record.base_weights_omitted and base is not None:
        weights = weights | _base_weights(base, missing, source)
    try:
        network.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{source}: the network weights do not fit its recorded network config ({first})") from None
    network.requires_grad_(False)
    if lora is not None:
        merge_lora(network)
    dtype = next(iter(weights.values())).dtype
    return (network if dtype == torch.float32 else network.to(dtype)), is_ema


def data_path(checkpoint: dict[str, Any]) -> str | None:
    """The training data's path, when the checkpoint records it (DataModule hyperparameters or the stream state)."""
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    if isinstance(hparams, dict) and isinstance(hparams.get("path"), str):
        return hparams["path"]
    loaders = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
    for loader in loaders if isinstance(loaders, list) else []:
        dataset = loader.get("dataset") if isinstance(loader, dict) else None
        if isinstance(dataset, dict):
            path = dataset.get("input_dir_url") or dataset.get("input_dir_path")
            if isinstance(path, str):
                return path
    return None


def recorded_metrics(checkpoint: dict[str, Any]) -> dict[str, float]:
    """Monitored scores the checkpoint's callbacks kept (``ModelCheckpoint``'s best score, early stopping's)."""
    metrics: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict) or not isinstance(state.get("monitor"), str):
            continue
        for key in ("best_model_score", "best_score"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"{state['monitor']} (best)"] = float(value)
                break
    return metrics


def _stages(base_info: dict[str, Any], stage: str) -> list[str]:
    earlier = base_info.get("stages")
    return [*(s for s in earlier if isinstance(s, str)), stage] if isinstance(earlier, list) else [stage]


def export_info(
    checkpoint: dict[str, Any], record: CheckpointRecord, ckpt_path: Path, base: ModelFolder, is_ema: bool
) -> dict[str, Any]:
    """What ``instaflow.json`` records about an export (besides ``kind`` and ``format_version``)."""

    hparams = checkpoint.get("hyper_parameters") or {}
    stage = export_stage(record, hparams)
    family = checkpoint_family(record, str(ckpt_path))
    info: dict[str, Any] = {
        "module": record.module,
        "stage": stage,
        "stages": _stages(base.info, stage),
        "base_model": str(hparams.get("base_model")),
        "base_kind": base.kind,
        "training_steps": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "weights": "ema" if is_ema else "raw",
        "ema_decay": hparams.get("ema_decay"),
        "val_guidance": hparams.get("val_guidance"),
        "data": data_path(checkpoint),
        "metrics": recorded_metrics(checkpoint),
        "exported_from": str(ckpt_path.resolve()),
        "family": family.name,
        "sampler": sampler_note(family),
        "windows": int(hparams.get("windows", 1)),  # a piecewise rectified flow's time windows (1: none)
        **record.conditioning,  # e.g. Flux's guidance input, read back by the family's configure_encoder
    }
    if record.module in ("DistillModule", "DMDModule"):  # one-step (or k-step) students
        info["student_steps"] = int(hparams.get("student_steps", 1))
    if stage == PERFLOW_STAGE:  # what made the targets: the teacher and its window solves
        info.update({name: hparams.get(name) for name in PERFLOW_OPTIONS if name in hparams})
    if record.module == "ReflowModule":
        info["loss"] = str(hparams.get("loss", "mse"))
        if info["loss"] == "huber":
            info["huber_c"] = hparams.get("huber_c")
    return info


def sampler_note(family) -> str:
    """How an export of ``family`` is sampled, in one line (recorded in ``instaflow.json``)."""
    sign = "output = velocity" if family.velocity_sign == 1.0 else "velocity = -output (SD3's flow-matching sign)"
    return f"LatentODE euler; t=0 noise, t=1 data; network timestep (1 - t) * 1000; {sign}"
