"""One export, all or nothing: check the target, read the checkpoint, write the folder (or the LoRA file) and its
model card next to the target, and move it into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from instaflow_pl.checkpoints import (
    CheckpointRecord,
    exported_keys,
    network_weights,
    read_checkpoint,
    read_sharded_checkpoint,
)
from instaflow_pl.errors import UserError
from instaflow_pl.export.cards import lora_card, model_card
from instaflow_pl.export.checkpoint import (
    build_network,
    checkpoint_family,
    export_info,
    exportable_record,
    find_checkpoint,
)
from instaflow_pl.export.delta import DELTA_DTYPES, DELTA_FILE, DELTA_KIND
from instaflow_pl.export.folder import PIPELINE_FILE, read_json, write_folder
from instaflow_pl.export.lora import LORA_KIND, LORA_WEIGHTS_FILE, write_lora_file
from instaflow_pl.families import PARTS
from instaflow_pl.kinds import VELOCITY_KIND
from instaflow_pl.model_folder import ModelFolder

LORA_FORMATS = ("merged", "file")
"""``--lora-format``: a whole folder with the adapters merged, or the adapters' file alone."""
EXPORT_FORMATS = ("folder", "delta")
"""``--format``: a diffusers-format model folder, or delta weights (the network minus its base model's)."""
EXPORT_FILES = ("model_index.json", "instaflow.json", "README.md", PIPELINE_FILE, LORA_WEIGHTS_FILE, DELTA_FILE)
"""The top-level files an export writes (with the model parts, :data:`instaflow_pl.families.PARTS`, everything it
owns in its folder)."""


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    force: bool = False,
    trust_checkpoint: bool = False,
    lora_format: str = "merged",
    export_format: str = "folder",
    delta_dtype: str = "fp32",
) -> dict[str, Any]:
    """Export a ReflowModule / DistillModule checkpoint to a diffusers-format velocity folder.

    The folder is written next to ``out`` first and moved into place when complete, so an interrupted export leaves
    nothing half-written.

    Args:
        ckpt: A Lightning checkpoint (a file, or the folder a sharded fit writes), or a folder of them (its newest
            ``*.ckpt`` is used).
        out: The folder to write: new, empty, or (with ``force``) an earlier export, which is replaced. A folder
            holding anything else is refused: export never overwrites other files.
        force: Replace an earlier export in ``out``.
        trust_checkpoint: Allow arbitrary pickled objects in the checkpoint (runs code from the file).
        lora_format: For a LoRA run: ``merged`` (a whole model folder with the adapters folded in) or ``file``
            (only the adapters' file, :data:`~instaflow_pl.export.lora.LORA_WEIGHTS_FILE`, for diffusers'
            ``load_lora_weights`` on the base model).
        export_format: ``folder`` (a diffusers-format model folder) or ``delta``: only the trained network minus
            the base model's network (:mod:`~instaflow_pl.export.delta`), to add to another fine-tune of that base
            with :func:`apply_delta`.
        delta_dtype: The delta's dtype: ``fp32`` or ``fp64`` (see :data:`~instaflow_pl.export.delta.DELTA_DTYPES`).

    Returns:
        What was recorded in ``instaflow.json``, plus ``out`` and ``checkpoint``.

    Raises:
        UserError: a missing or foreign checkpoint, a missing base model, or a target that may not be written.
    """
    if lora_format not in LORA_FORMATS:
        raise UserError(f"lora format must be one of {', '.join(LORA_FORMATS)}, got {lora_format!r}")
    if export_format not in EXPORT_FORMATS:
        raise UserError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    if delta_dtype not in DELTA_DTYPES:
        raise UserError(f"delta dtype must be one of {', '.join(DELTA_DTYPES)}, got {delta_dtype!r}")
    ckpt_path = find_checkpoint(ckpt)
    out = Path(out).expanduser()
    check_target(out, force)
    if ckpt_path.is_dir():  # sharded: only the weights the export writes are read, each from its shards
        checkpoint = read_sharded_checkpoint(ckpt_path, trust_checkpoint, keys=exported_keys)
    else:
        checkpoint = read_checkpoint(ckpt_path, trust_checkpoint)
    source = str(ckpt_path)
    record = exportable_record(checkpoint, source)
    base = _base_model(checkpoint, source)
    if export_format == "delta":
        info = _write_atomically(out, lambda tmp: _write_delta(tmp, checkpoint, record, ckpt_path, base, delta_dtype))
    else:
        write = _write_lora if lora_format == "file" else _write_folder
        info = _write_atomically(out, lambda tmp: write(tmp, checkpoint, record, ckpt_path, base))
    return {**info, "out": str(out), "checkpoint": source}


def apply_delta(delta: str | Path, model: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Add a delta export to ``model``'s network and write the sum as a model folder, as an export is written.

    ``model`` is the delta's base model (which gives the trained model back) or another fine-tune of that base (whose
    network gains the same weight change, as PeRFlow applies its delta weights to SD 1.5 fine-tunes). The folder
    takes its other parts (VAE, text encoders) from ``model`` and records the delta's stage and windows.

    Args:
        delta: A folder written by ``export --format delta``.
        model: A diffusers-format folder of the delta's family with a network of the same architecture.
        out: The folder to write (as in :func:`export_checkpoint`).
        force: Replace an earlier export in ``out``.

    Returns:
        What was recorded in ``instaflow.json``, plus ``out``.

    Raises:
        UserError: not a delta, another family, or a network of another architecture.
    """
    from instaflow_pl.export.delta import add_delta, applied_info, read_delta
    from instaflow_pl.families import family_named

    delta_path = Path(delta).expanduser()
    record, tensors = read_delta(delta_path)
    target = ModelFolder.open(model)
    family = family_named(record.get("family") or "sd", str(delta_path / "instaflow.json"))
    if not target.family.answers_to(family.name):
        raise UserError(
            f"{delta_path} is a delta of an {family.name} model, but {target.root} is an {target.family.name} "
            "model; apply it to a fine-tune of its base model"
        )
    out = Path(out).expanduser()
    check_target(out, force)
    network = target.load_network()
    network.load_state_dict(add_delta(network.state_dict(), tensors, str(delta_path)))
    network.requires_grad_(False)
    info = applied_info(record, delta_path, target)

    def write(tmp: Path) -> dict[str, Any]:
        write_folder(tmp, network, target.family, target, info)
        size = target.geometry.size * target.pixels_per_latent
        (tmp / "README.md").write_text(model_card(info, image_size=size))
        return info

    return {**_write_atomically(out, write), "out": str(out)}


def _write_atomically(out: Path, write) -> dict[str, Any]:
    """Run ``write(tmp)`` on a fresh folder next to ``out`` and move it into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        info = write(tmp)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def _base_model(checkpoint: dict[str, Any], source: str) -> ModelFolder:
    """The checkpoint's ``base_model`` folder (its VAE and text parts go into the export)."""

    base_model = (checkpoint.get("hyper_parameters") or {}).get("base_model")
    if not isinstance(base_model, str | Path):
        raise UserError(f"{source} does not record its base_model, whose vae, text encoder and tokenizer export needs")
    try:
        return ModelFolder.open(base_model)
    except UserError as err:
        raise UserError(f"{source}: its base model (for vae, text encoder, tokenizer) is unavailable: {err}") from None


def _write_folder(
    tmp: Path, checkpoint: dict[str, Any], record: CheckpointRecord, ckpt_path: Path, base: ModelFolder
) -> dict[str, Any]:
    source = str(ckpt_path)
    network, is_ema = build_network(checkpoint, record, source, base)
    info = export_info(checkpoint, record, ckpt_path, base, is_ema)
    write_folder(tmp, network, checkpoint_family(record, source), base, info)
    (tmp / "README.md").write_text(model_card(info, image_size=base.geometry.size * base.pixels_per_latent))
    return info


def _write_lora(
    tmp: Path, checkpoint: dict[str, Any], record: CheckpointRecord, ckpt_path: Path, base: ModelFolder
) -> dict[str, Any]:
    from instaflow_pl.modules.lora import LoraOptions

    source = str(ckpt_path)
    lora = LoraOptions.parse(record.lora)
    if lora is None:
        raise UserError(f"{source} did not train LoRA adapters; export it without --lora-format file")
    weights, is_ema = network_weights(checkpoint, source)
    info = export_info(checkpoint, record, ckpt_path, base, is_ema) | {"lora": lora.to_dict()}
    write_lora_file(tmp, weights, lora, checkpoint_family(record, source), info)
    (tmp / "README.md").write_text(lora_card(info))
    return info


def _write_delta(
    tmp: Path, checkpoint: dict[str, Any], record: CheckpointRecord, ckpt_path: Path, base: ModelFolder, dtype: str
) -> dict[str, Any]:
    from instaflow_pl.export.delta import (
        delta_card,
        delta_weights,
        network_fingerprint,
        round_trip_mismatches,
        write_delta,
    )

    source = str(ckpt_path)
    network, is_ema = build_network(checkpoint, record, source, base)
    base_network = base.load_network()
    delta = delta_weights(network, base_network, DELTA_DTYPES[dtype], source)
    info = export_info(checkpoint, record, ckpt_path, base, is_ema)
    info["delta"] = {
        "base_model": info["base_model"],
        "base_network_sha256": network_fingerprint(base),
        "family": info["family"],
        "dtype": dtype,
        "round_trip_mismatches": round_trip_mismatches(network, base_network, delta),
    }
    write_delta(tmp, delta, info)
    (tmp / "README.md").write_text(delta_card(info))
    return info


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
    foreign = sorted(entries - set(PARTS) - set(EXPORT_FILES))
    if foreign or not _is_previous_export(out):
        shown = ", ".join(foreign[:3] or sorted(entries)[:3])
        raise UserError(
            f"export target {out} is not empty and is not an earlier export (it holds {shown}); "
            "choose a new folder: export never overwrites other files"
        )
    if not force:
        raise UserError(f"{out} already holds an exported model; pass --force to replace it, or choose a new folder")


def _is_previous_export(root: Path) -> bool:
    marker = read_json(root / "instaflow.json")
    return marker.get("kind") in (VELOCITY_KIND, LORA_KIND, DELTA_KIND) and "exported_from" in marker


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
