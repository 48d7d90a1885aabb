"""Export a training checkpoint as a diffusers-format model folder (the student, or the next round's teacher).

``instaflow-pl export --ckpt CKPT --out DIR`` writes::

    DIR/model_index.json        names InstaFlowPipeline and its components
    DIR/instaflow_pipeline.py   SD and SDXL: a self-contained copy of the pipeline (stock diffusers samples DIR with it)
    DIR/unet/ or transformer/   the velocity network (EMA weights when the run kept an EMA), safetensors
    DIR/vae/ text_encoder/ tokenizer/ ...   copied from the checkpoint's base model (the family's parts)
    DIR/scheduler/              a FlowMatchEulerDiscreteScheduler config (shift 1; see below)
    DIR/instaflow.json          marks DIR as a velocity (k-RF) model: module kind, base model, steps, stages
    DIR/README.md               a model card; its "Use" section is the family's (``Family.card_use``)

The folder loads with ``InstaFlowPipeline.from_pretrained(DIR)``, with the family's stock network class
(``UNet2DConditionModel`` / ``SD3Transformer2DModel.from_pretrained(DIR, subfolder=...)``), and with
``load_teacher(DIR)`` (so an export is the teacher of the next pair-generation round and the ``base_model`` of the next
training stage). Stock diffusers alone samples it too, as the card says: SD exports with
``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` (``model_index.json`` names the shipped file,
diffusers' custom-pipeline mechanism), SDXL exports with ``custom_pipeline="instaflow_pipeline"`` added (their index
keeps naming InstaFlowPipeline, so ``StableDiffusionXLPipeline.from_pretrained(DIR)`` still loads the parts), SD3
exports with stock ``StableDiffusion3Pipeline`` and ``sigmas=[1 - i / k for i in range(k)]``.

Sampling uses the project's LatentODE (Euler): t = 0 is noise, t = 1 is data, the network is called at timestep
``(1 - t) * 1000`` and returns the velocity ``data - noise`` (a UNet), or minus it (SD3's transformer, which keeps its
flow-matching sign). A UNet's sign is the opposite of diffusers' flow-matching schedulers (whose model output points
to the noise), so for SD and SDXL the scheduler config only records the timestep range and a stock scheduler must not
step the UNet; SD3's stock scheduler steps its transformer exactly as the LatentODE does on the same sigmas.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing in them is executed. Lightning checkpoints of
the training modules hold a few harmless non-tensor objects (numpy scalars in the data loader's state, paths in the
UNet config), which are allowed explicitly; anything else is refused unless the user trusts the file
(``trust_checkpoint=True``, ``--trust-checkpoint``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from instaflow_pl.errors import UserError
from instaflow_pl.families import PARTS

EXPORTABLE_MODULES = {"ReflowModule": "reflow", "DistillModule": "distill"}
"""Module kinds whose checkpoints export, and the stage each one is."""

COMPONENTS = PARTS
"""The subfolders an exported model may have (which ones: its family's, see :mod:`instaflow_pl.families`)."""

EXPORT_FILES = (
    "model_index.json",
    "instaflow.json",
    "README.md",
    "instaflow_pipeline.py",
    "pytorch_lora_weights.safetensors",
)
"""The top-level files an export writes (with :data:`COMPONENTS`, everything it owns in its folder)."""

PIPELINE_CLASS = "InstaFlowPipeline"
LORA_KIND = "lora"
"""``instaflow.json``'s kind for a LoRA export (adapters for the base model, not a whole model folder)."""
LORA_FORMATS = ("merged", "file")
_VAE_CLASS = ["diffusers", "AutoencoderKL"]
_SCHEDULER_CLASS = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---- reading checkpoints ------------------------------------------------------------------------------------------


def checkpoint_safe_globals() -> list[Any]:
    """Non-tensor types found in the training modules' Lightning checkpoints; constructing them runs no user code."""
    import importlib

    import numpy as np

    allowed: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 1.26 (pinned by sweeps) has it as a shim
    allowed += [multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def load_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU without executing anything in it.

    Args:
        path: The ``.ckpt`` file.
        trust_checkpoint: Load with full pickle (``weights_only=False``), which can run arbitrary code from the
            file; only for checkpoints from a trusted source that hold objects the safe loader refuses.

    Raises:
        UserError: the file is missing, is not a checkpoint, or holds objects the safe loader refuses.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:  # mmap: tensors are read from the file as they are used, not all copied into memory first
        if trust_checkpoint:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        raise UserError(
            f"{path} holds objects that are not plain data ({', '.join(unsafe) or 'unknown globals'}), so it was not "
            "loaded: loading them would run code from the file; pass --trust-checkpoint only if you trust its source"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file becomes one line
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _unsafe_globals(path: Path) -> list[str]:
    try:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in checkpoint_safe_globals()}
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # noqa: BLE001 - only used to word the error
        return []


def find_checkpoint(source: str | Path) -> Path:
    """``source`` itself, or the newest ``*.ckpt`` in it when it is a folder (e.g. a run's ``checkpoints/``).

    Raises:
        UserError: nothing there, or a folder without checkpoints.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        if not found:
            raise UserError(f"no *.ckpt checkpoint in {path}; train first or pass a checkpoint file")
        return found[-1]
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


# ---- what the checkpoint says -------------------------------------------------------------------------------------


def checkpoint_module(checkpoint: dict[str, Any], source: str) -> str:
    """The exportable module kind that wrote ``checkpoint`` (``ReflowModule`` or ``DistillModule``).

    Raises:
        UserError: not written by the project's training modules, or by a module whose checkpoints do not export.
    """
    from instaflow_pl.modules.base import check_checkpoint_kind

    kind = check_checkpoint_kind(checkpoint, source=source)
    if kind not in EXPORTABLE_MODULES:
        raise UserError(
            f"{source} was written by {kind}, which has no model to export; export a checkpoint of "
            f"{' or '.join(EXPORTABLE_MODULES)}"
        )
    return kind


def unet_state(checkpoint: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The UNet weights the checkpoint holds, the EMA's where it kept one (over the raw weights), and whether an
    EMA was applied. Weights it left out (frozen ones restored from the base model) are not in the result.

    Raises:
        UserError: the checkpoint holds no UNet weights.
    """
    state = checkpoint.get("state_dict", {})
    raw_prefix, ema_prefix = "velocity.unet.", "ema.module.unet."
    weights = {k[len(raw_prefix) :]: v for k, v in state.items() if k.startswith(raw_prefix)}
    ema = {k[len(ema_prefix) :]: v for k, v in state.items() if k.startswith(ema_prefix)}
    if not weights and not ema:
        raise UserError(f"{source} holds no UNet weights (no velocity.unet.* keys); was its velocity a diffusers UNet?")
    return weights | ema, bool(ema)


def _base_weights(base: Path, keys: set[str], source: str) -> dict[str, torch.Tensor]:
    """The base model's network weights for ``keys`` (LoRA's ``.base_layer`` names map to the plain layer names)."""
    from instaflow_pl.families import family_of_folder
    from instaflow_pl.velocity.networks import load_network

    network = load_network(base, family_of_folder(base).network_folder)
    plain = network.state_dict()
    out = {}
    for key in keys:
        name = key.replace(".base_layer.", ".")
        if name not in plain:
            raise UserError(f"{source}: its base model {base} has no UNet weight {name}; export needs the same base")
        out[key] = plain[name]
    return out


def build_unet(checkpoint: dict[str, Any], source: str, base: Path | None = None):
    """The checkpoint's velocity UNet as a diffusers network with the exported weights: the EMA's (or raw)
    trained weights, frozen weights from ``base``'s UNet where the checkpoint left them out, and LoRA adapters
    merged into their layers.

    Returns:
        ``(unet, is_ema)``.
    """
    from instaflow_pl.modules.base import CHECKPOINT_KEY
    from instaflow_pl.modules.lora import LoraOptions, add_lora, merge_lora
    from instaflow_pl.velocity.networks import network_from_config

    record = checkpoint[CHECKPOINT_KEY]
    config = record.get("unet_config")
    if not isinstance(config, dict):
        raise UserError(
            f"{source} has no UNet config: its velocity is not a diffusers UNet, and export writes diffusers folders"
        )
    weights, is_ema = unet_state(checkpoint, source)
    lora = LoraOptions.parse(record.get("lora"))
    with torch.device("meta"):  # no memory for weights that are assigned next
        unet = network_from_config(config, source)
        if lora is not None:
            add_lora(unet, lora)
    expected = set(unet.state_dict())
    missing = expected - set(weights)
    if missing and record.get("base_weights_omitted") and base is not None:
        weights = weights | _base_weights(base, missing, source)
    try:
        unet.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{source}: the UNet weights do not fit its recorded UNet config ({first})") from None
    unet.requires_grad_(False)
    if lora is not None:
        merge_lora(unet)
    dtype = next(iter(weights.values())).dtype
    return (unet if dtype == torch.float32 else unet.to(dtype)), is_ema


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


# ---- writing the folder -------------------------------------------------------------------------------------------


def _is_previous_export(root: Path) -> bool:
    marker = _read_json(root / "instaflow.json")
    return marker.get("kind") in ("velocity", LORA_KIND) and "exported_from" in marker


def check_target(out: Path, force: bool) -> None:
    """Refuse a target that holds anything but a previous export, and a previous export unless ``force``.

    Raises:
        UserError: ``out`` is a file, holds other files, or holds a previous export and ``force`` is false.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"export target {out} is a file; choose a new folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    foreign = sorted(entries - set(COMPONENTS) - set(EXPORT_FILES))
    if foreign or not _is_previous_export(out):
        shown = ", ".join(foreign[:3] or sorted(entries)[:3])
        raise UserError(
            f"export target {out} is not empty and is not an earlier export (it holds {shown}); "
            "choose a new folder: export never overwrites other files"
        )
    if not force:
        raise UserError(f"{out} already holds an exported model; pass --force to replace it, or choose a new folder")


def _copy_component(base: Path, name: str, dest: Path) -> None:
    source = base / name
    if not source.is_dir():
        raise UserError(f"base model {base} has no {name}/ subfolder; export needs its vae, text encoders, tokenizers")
    if not name.startswith("tokenizer") and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in source.iterdir()):
        raise UserError(f"base model {base} has no weights in {name}/; download the full model folder first")
    shutil.copytree(source, dest / name)  # follows symlinks (hub caches): the export stands alone


def is_pixel_space(root: Path) -> bool:
    """Whether a model folder declares no VAE (its ``model_index.json`` lists none): latents are images."""
    index = _read_json(root / "model_index.json")
    return "unet" in index and "vae" not in index


def _components(base: Path, family) -> tuple[str, ...]:
    """The parts copied from the base model: its VAE (not for a pixel-space model, the digits demo) and the text
    parts its family needs (and the optional ones it has, e.g. SD3's T5).

    A folder whose model index lists a VAE must have it: a missing ``vae/`` is an error, not pixel space.
    """
    vae = () if is_pixel_space(base) else ("vae",)
    optional = tuple(name for name in family.optional_text_parts if (base / name).is_dir())
    return (*vae, *family.text_parts, *optional)


def _model_index(base: Path, network_class: type, family) -> dict[str, Any]:
    import diffusers

    base_index = _read_json(base / "model_index.json")
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    for name in _components(base, family):
        entry = base_index.get(name)
        valid = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        index[name] = entry if valid else (_VAE_CLASS if name == "vae" else list(family.default_classes[name]))
    library = "diffusers" if network_class.__module__.startswith("diffusers") else network_class.__module__
    index[family.network_folder] = [library, network_class.__name__]
    index["scheduler"] = _SCHEDULER_CLASS
    for key in family.pipeline_config:  # e.g. SDXL's force_zeros_for_empty_prompt: the null prompt stays the same
        if key in base_index:
            index[key] = base_index[key]
    return dict(sorted(index.items()))


def _stages(base_info: dict[str, Any], stage: str) -> list[str]:
    earlier = base_info.get("stages")
    return [*(s for s in earlier if isinstance(s, str)), stage] if isinstance(earlier, list) else [stage]


def export_info(checkpoint: dict[str, Any], ckpt_path: Path, base: Path, is_ema: bool) -> dict[str, Any]:
    """What ``instaflow.json`` records about an export (besides ``kind`` and ``format_version``)."""
    from instaflow_pl.modules.base import CHECKPOINT_KEY
    from instaflow_pl.teachers import model_kind

    module = checkpoint[CHECKPOINT_KEY]["module"]
    hparams = checkpoint.get("hyper_parameters") or {}
    stage = EXPORTABLE_MODULES[module]
    info: dict[str, Any] = {
        "module": module,
        "stage": stage,
        "stages": _stages(_read_json(base / "instaflow.json"), stage),
        "base_model": str(hparams.get("base_model")),
        "base_kind": model_kind(base),
        "training_steps": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "weights": "ema" if is_ema else "raw",
        "ema_decay": hparams.get("ema_decay"),
        "val_guidance": hparams.get("val_guidance"),
        "data": data_path(checkpoint),
        "metrics": recorded_metrics(checkpoint),
        "exported_from": str(ckpt_path.resolve()),
        "family": checkpoint_family(checkpoint, str(ckpt_path)).name,
        "sampler": sampler_note(checkpoint_family(checkpoint, str(ckpt_path))),
    }
    if module == "DistillModule":
        info["student_steps"] = int(hparams.get("student_steps", 1))
    return info


def sampler_note(family) -> str:
    """How an export of ``family`` is sampled, in one line (recorded in ``instaflow.json``)."""
    sign = "output = velocity" if family.velocity_sign == 1.0 else "velocity = -output (SD3's flow-matching sign)"
    return f"LatentODE euler; t=0 noise, t=1 data; network timestep (1 - t) * 1000; {sign}"


def _pairs_summary(data: str | None) -> str | None:
    if not data or "://" in data:
        return None
    manifest = _read_json(Path(data).expanduser() / "manifest.json")
    if not manifest:
        return None
    keys = ("teacher", "solver", "steps", "guidance", "count")
    return ", ".join(f"{k} {manifest[k]}" for k in keys if k in manifest) or None


def model_card(info: dict[str, Any]) -> str:
    """A short README.md for an exported folder; its "Use" section is the family's (:meth:`Family.card_use`)."""
    stages = " -> ".join(info["stages"])
    steps = info.get("student_steps")
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
    if steps is not None:
        lines.append(f"- student steps: {steps} (sample with `--steps {steps}`)")
    lines += [
        "",
        "## Metrics",
        "",
        *metric_lines,
        "",
        "## Use",
        "",
        *_card_family(info).card_use(steps or 1),
        "",
    ]
    return "\n".join(lines)


def _card_family(info: dict[str, Any]):
    """The family an export's card is written for (``sd`` for records from before families)."""
    from instaflow_pl.families import family_named

    return family_named(info.get("family") or "sd", "the export record")


def _write_folder(tmp: Path, checkpoint: dict[str, Any], ckpt_path: Path, base: Path, source: str) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from instaflow_pl.teachers import mark_velocity_folder

    family = checkpoint_family(checkpoint, source)
    unet, is_ema = build_unet(checkpoint, source, base)
    # Shards of at most 1 GB: safetensors serialises a whole file in memory before writing it.
    unet.save_pretrained(tmp / family.network_folder, safe_serialization=True, max_shard_size="1GB")
    network_class = type(unet)
    del unet
    for name in _components(base, family):
        _copy_component(base, name, tmp)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(_model_index(base, network_class, family), indent=2) + "\n")
    info = export_info(checkpoint, ckpt_path, base, is_ema)
    mark_velocity_folder(tmp, **info)
    (tmp / "README.md").write_text(model_card(info))
    if family.standalone_pipeline:
        write_pipeline_file(tmp, in_index=family.pipeline_file_in_index)
    return info


def checkpoint_family(checkpoint: dict[str, Any], source: str):
    """The model family of a checkpoint's velocity (``sd`` for checkpoints from before families were recorded)."""
    from instaflow_pl.families import family_named
    from instaflow_pl.modules.base import CHECKPOINT_KEY

    return family_named(checkpoint[CHECKPOINT_KEY].get("family", "sd"), source)


def _write_lora_file(tmp: Path, checkpoint: dict[str, Any], ckpt_path: Path, base: Path, source: str) -> dict:
    """Write the adapters (EMA weights when kept) as diffusers' ``pytorch_lora_weights.safetensors``, which
    ``pipe.load_lora_weights(DIR)`` loads onto a pipeline of the base model."""
    import diffusers

    from instaflow_pl.modules.base import CHECKPOINT_KEY
    from instaflow_pl.modules.lora import LoraOptions, diffusers_lora_layers

    lora = LoraOptions.parse(checkpoint[CHECKPOINT_KEY].get("lora"))
    if lora is None:
        raise UserError(f"{source} did not train LoRA adapters; export it without --lora-format file")
    family = checkpoint_family(checkpoint, source)
    weights, is_ema = unet_state(checkpoint, source)
    metadata = {"r": lora.rank, "lora_alpha": lora.alpha or lora.rank, "target_modules": lora.target_modules}
    pipeline, prefix = family.lora_pipeline, family.network_folder  # e.g. StableDiffusion3Pipeline, transformer
    getattr(diffusers, pipeline).save_lora_weights(
        tmp, **{f"{prefix}_lora_layers": diffusers_lora_layers(weights), f"{prefix}_lora_adapter_metadata": metadata}
    )
    info = export_info(checkpoint, ckpt_path, base, is_ema) | {"lora": lora.to_dict()}
    (tmp / "instaflow.json").write_text(json.dumps({"kind": LORA_KIND, **info}, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(lora_card(info))
    return info


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


PIPELINE_FILE = "instaflow_pipeline.py"
"""The self-contained pipeline file exports of families with ``standalone_pipeline`` ship (a copy of
:mod:`instaflow_pl.standalone_pipeline`)."""


def write_pipeline_file(folder: Path, in_index: bool = True) -> None:
    """Ship the self-contained pipeline in ``folder`` and (``in_index``) name it in its ``model_index.json``.

    ``"_class_name": ["instaflow_pipeline", "InstaFlowPipeline"]`` is diffusers' custom-pipeline entry: stock
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` then loads the class from the file (also
    from a hub repository holding the folder). ``instaflow_pl.pipeline.InstaFlowPipeline`` reads the entry as its own.
    Without the entry, ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="instaflow_pipeline",
    trust_remote_code=True)`` loads the file, and the family's stock pipeline class still loads the folder.
    """
    from instaflow_pl import standalone_pipeline

    shutil.copyfile(standalone_pipeline.__file__, folder / PIPELINE_FILE)
    if not in_index:
        return
    index = _read_json(folder / "model_index.json")
    index["_class_name"] = [Path(PIPELINE_FILE).stem, PIPELINE_CLASS]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` (empty, absent, or a previous export checked by :func:`check_target`)."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{tmp.name}")
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def export_checkpoint(
    ckpt: str | Path, out: str | Path, force: bool = False, trust_checkpoint: bool = False, lora_format: str = "merged"
) -> dict[str, Any]:
    """Export a ReflowModule / DistillModule checkpoint to a diffusers-format velocity folder.

    The folder is written next to ``out`` first and moved into place when complete, so an interrupted export leaves
    nothing half-written.

    Args:
        ckpt: A Lightning checkpoint, or a folder of them (its newest ``*.ckpt`` is used).
        out: The folder to write: new, empty, or (with ``force``) an earlier export, which is replaced. A folder
            holding anything else is refused: export never overwrites other files.
        force: Replace an earlier export in ``out``.
        trust_checkpoint: Allow arbitrary pickled objects in the checkpoint (runs code from the file).
        lora_format: For a LoRA run: ``merged`` (a whole model folder with the adapters folded in) or ``file``
            (only ``pytorch_lora_weights.safetensors``, for diffusers' ``load_lora_weights`` on the base model).

    Returns:
        What was recorded in ``instaflow.json``, plus ``out`` and ``checkpoint``.

    Raises:
        UserError: a missing or foreign checkpoint, a missing base model, or a target that may not be written.
    """
    from instaflow_pl.teachers import resolve_model_folder

    if lora_format not in LORA_FORMATS:
        raise UserError(f"lora format must be one of {', '.join(LORA_FORMATS)}, got {lora_format!r}")
    ckpt_path = find_checkpoint(ckpt)
    out = Path(out).expanduser()
    check_target(out, force)
    checkpoint = load_checkpoint(ckpt_path, trust_checkpoint)
    source = str(ckpt_path)
    checkpoint_module(checkpoint, source)
    base_model = (checkpoint.get("hyper_parameters") or {}).get("base_model")
    if not isinstance(base_model, str | Path):
        raise UserError(f"{source} does not record its base_model, whose vae, text encoder and tokenizer export needs")
    try:
        base = resolve_model_folder(base_model)
    except UserError as err:
        raise UserError(f"{source}: its base model (for vae, text encoder, tokenizer) is unavailable: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        write = _write_lora_file if lora_format == "file" else _write_folder
        info = write(tmp, checkpoint, ckpt_path, base, source)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {**info, "out": str(out), "checkpoint": source}


def export_main(args: Iterable[str]) -> None:
    """``instaflow-pl export``: parse the arguments, export, print where the model went."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="instaflow-pl export",
        description=(
            "Export a ReflowModule or DistillModule checkpoint as a diffusers-format folder: the UNet (EMA weights "
            "when the run kept an EMA), the base model's VAE, text encoder and tokenizer, a scheduler config, "
            "model_index.json (InstaFlowPipeline), instaflow.json (a velocity model: usable as the next round's "
            "teacher or base_model) and a README.md model card."
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt) of a ReflowModule or DistillModule run, or a folder of checkpoints "
        "(e.g. outputs/tiny/reflow/checkpoints), whose newest .ckpt is used",
    )
    parser.add_argument(
        "--out", required=True, help="folder to write: new or empty (or an earlier export, with --force)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in --out; a folder holding any other files is never overwritten",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints holding arbitrary pickled objects (this runs code from the file: only for files "
        "from a trusted source); by default only tensors and plain data are read",
    )
    parser.add_argument(
        "--lora-format",
        choices=LORA_FORMATS,
        default="merged",
        help="for a run that trained LoRA adapters: merged (default; a whole model folder, usable as the next "
        "teacher) or file (pytorch_lora_weights.safetensors for diffusers' pipe.load_lora_weights(DIR))",
    )
    opts = parser.parse_args(list(args))
    info = export_checkpoint(
        opts.ckpt, opts.out, force=opts.force, trust_checkpoint=opts.trust_checkpoint, lora_format=opts.lora_format
    )
    print(
        f"exported {info['checkpoint']} ({info['module']}, {info['training_steps']} steps, {info['weights']} weights) "
        f"to {info['out']}"
    )
