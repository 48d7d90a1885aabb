"""The diffusers-format folder of an export: the velocity network, the base model's other parts, a scheduler config,
``model_index.json``, ``instaflow.json`` and, for families that need it, the self-contained pipeline file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.model_folder import ModelFolder, mark_velocity_folder

PIPELINE_CLASS = "InstaFlowPipeline"
PIPELINE_FILE = "instaflow_pipeline.py"
"""The self-contained pipeline file exports of families with ``standalone_pipeline`` ship (a copy of
:mod:`instaflow_pl.standalone_pipeline`)."""
_VAE_CLASS = ["diffusers", "AutoencoderKL"]
_SCHEDULER_CLASS = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is missing, unreadable or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def write_folder(folder: Path, network: nn.Module, family, base: ModelFolder, info: dict[str, Any]) -> None:
    """Write the export of ``network`` (a model of ``family``, trained from ``base``) into the empty ``folder``:
    everything but the model card.

    Args:
        folder: The (temporary) folder to fill.
        network: The velocity network with the exported weights.
        family: Its model family (:mod:`instaflow_pl.families`): which parts, pipeline file and index entries.
        base: The base model, whose VAE and text parts are copied.
        info: What ``instaflow.json`` records besides the kind (``export_info``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Shards of at most 1 GB: safetensors serialises a whole file in memory before writing it.
    network.save_pretrained(folder / family.network_folder, safe_serialization=True, max_shard_size="1GB")
    for name in _components(base, family):
        _copy_component(base, name, folder)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder / "scheduler")
    index = _model_index(base, type(network), family)
    if family.standalone_pipeline and info.get("windows", 1) > 1:
        index["windows"] = info["windows"]  # the shipped pipeline's Euler grid (a piecewise rectified flow)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    mark_velocity_folder(folder, **info)
    if family.standalone_pipeline:
        write_pipeline_file(folder, in_index=family.pipeline_file_in_index)


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
    index = read_json(folder / "model_index.json")
    index["_class_name"] = [Path(PIPELINE_FILE).stem, PIPELINE_CLASS]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_component(base: ModelFolder, name: str, dest: Path) -> None:
    source = base.root / name
    if not source.is_dir():
        raise UserError(f"base model {base} has no {name}/ subfolder; export needs its vae, text encoders, tokenizers")
    if not name.startswith("tokenizer") and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in source.iterdir()):
        raise UserError(f"base model {base} has no weights in {name}/; download the full model folder first")
    shutil.copytree(source, dest / name)  # follows symlinks (hub caches): the export stands alone


def _components(base: ModelFolder, family) -> tuple[str, ...]:
    """The parts copied from the base model: its VAE (for a family that uses one) and the text parts its family
    needs (and the optional ones it has, e.g. SD3's T5)."""
    vae = ("vae",) if family.uses_vae else ()
    optional = tuple(name for name in family.optional_text_parts if base.has(name))
    return (*vae, *family.text_parts, *optional)


def _model_index(base: ModelFolder, network_class: type, family) -> dict[str, Any]:
    import diffusers

    base_index = base.index
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
