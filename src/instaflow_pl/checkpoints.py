"""The project's part of a Lightning checkpoint: its record, its state-dict layout, and the one safe reader.

A training module writes a :class:`CheckpointRecord` under ``checkpoint["instaflow_pl"]`` when Lightning saves
(``FlowModule.on_save_checkpoint``): which module wrote it, the velocity network's config and family, the LoRA options,
and whether frozen base weights were left out. A resumed fit and ``instaflow-pl export`` read it back with
:func:`read_record`, which also brings checkpoints of earlier versions to today's layout (see :func:`upgrade`).

The velocity network's weights are under :data:`VELOCITY_PREFIX`, their EMA averages under :data:`EMA_PREFIX`.

Checkpoints are read with :func:`read_checkpoint`: ``torch.load(weights_only=True)``, so nothing in the file is
executed. Lightning checkpoints of the training modules hold a few harmless non-tensor objects (numpy scalars in the
data loader's state, paths in a network config), which are allowed explicitly (:func:`checkpoint_safe_globals`);
anything else is refused unless the user trusts the file.
"""

from __future__ import annotations

import pathlib
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaflow_pl.errors import UserError

CHECKPOINT_KEY = "instaflow_pl"
"""Key of the project's record in every checkpoint its training modules write."""
CHECKPOINT_FORMAT = 2
"""2: the EMA holds trainable parameters only; frozen velocity weights loaded from ``base_model`` are left out."""
LEGACY_FAMILY = "sd"
"""The family of records from before families were recorded (they were all Stable Diffusion)."""

NETWORK = "network"
"""The attribute of a network velocity (:class:`~instaflow_pl.velocity.NetworkVelocity`) that holds its network."""
VELOCITY_PREFIX = f"velocity.{NETWORK}."
"""State-dict prefix of the velocity network's weights in a training module's checkpoint."""
EMA_PREFIX = f"ema.module.{NETWORK}."
"""State-dict prefix of their exponential moving averages (only the trainable ones are averaged)."""

_LEGACY_NETWORK = "unet"
"""What :data:`NETWORK` was called before it was renamed (it held SD3's transformer and the demo's MLP too)."""
_RENAMED_RECORD_KEYS = {"unet_config": "network_config"}


@dataclass(frozen=True)
class CheckpointRecord:
    """What a training module records about itself in its checkpoints.

    Attributes:
        module: Class name of the module that wrote the checkpoint (``ReflowModule``, ``DistillModule``).
        format_version: :data:`CHECKPOINT_FORMAT` of the writer.
        network_config: The velocity network's diffusers config (plain types); None when the velocity is not a
            network velocity (an injected ``nn.Module``).
        family: The network's model family; None with ``network_config`` None. Read as :data:`LEGACY_FAMILY` from
            records that predate families.
        lora: The LoRA options (``LoraOptions.to_dict()``), None without LoRA.
        base_weights_omitted: Frozen velocity weights loaded from ``base_model`` were left out of the state dict.
        conditioning: What the family records about the model's conditioning (``Family.encoder_info``; Flux: the
            guidance input and prompt length), copied into an export's ``instaflow.json``.
    """

    module: str
    format_version: int = CHECKPOINT_FORMAT
    network_config: dict[str, Any] | None = None
    family: str | None = None
    lora: dict[str, Any] | None = None
    base_weights_omitted: bool = False
    conditioning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (a checkpoint loads with ``weights_only=True``); unset network fields are left out."""
        record: dict[str, Any] = {"module": self.module, "format_version": self.format_version}
        if self.network_config is not None:
            record["network_config"] = self.network_config
        if self.family is not None:
            record["family"] = self.family
        if self.conditioning:
            record["conditioning"] = dict(self.conditioning)
        return record | {"lora": self.lora, "base_weights_omitted": self.base_weights_omitted}

    def write(self, checkpoint: dict[str, Any]) -> None:
        """Store the record in ``checkpoint`` (what Lightning is about to save)."""
        checkpoint[CHECKPOINT_KEY] = self.to_dict()


def read_record(
    checkpoint: dict[str, Any], expected: str | None = None, source: str = "checkpoint"
) -> CheckpointRecord:
    """The record of a checkpoint, after :func:`upgrade` has brought the checkpoint to today's layout.

    Args:
        checkpoint: A loaded Lightning checkpoint (upgraded in place).
        expected: The module class that may read it (None: any of the project's modules).
        source: How to name the checkpoint in errors.

    Raises:
        UserError: not written by one of the project's training modules, or not by ``expected``.
    """
    raw = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(raw, dict) or "module" not in raw:
        raise UserError(f"{source} was not written by an instaflow-pl training module (no {CHECKPOINT_KEY!r} record)")
    module = raw["module"]
    if expected is not None and module != expected:
        raise UserError(
            f"{source} was written by {module}, not {expected}; resume it with "
            f"{module} (model.class_path) or export it and start a new {expected} run from the export"
        )
    upgrade(checkpoint)
    raw = checkpoint[CHECKPOINT_KEY]
    config = raw.get("network_config")
    return CheckpointRecord(
        module=module,
        format_version=int(raw.get("format_version", 1)),
        network_config=config if isinstance(config, dict) else None,
        family=raw.get("family", LEGACY_FAMILY),
        lora=raw.get("lora"),
        base_weights_omitted=bool(raw.get("base_weights_omitted", False)),
        conditioning=dict(raw.get("conditioning") or {}),
    )


def upgrade(checkpoint: dict[str, Any]) -> None:
    """Rename, in place, what checkpoints written before the network rename call ``unet``: the record's
    ``unet_config`` and the state-dict prefixes ``velocity.unet.`` / ``ema.module.unet.``.

    The state dict is renamed only when the record says its velocity was a network velocity (it had a
    ``unet_config``): an injected velocity module may have a child called ``unet`` of its own.
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(record, dict) or "unet_config" not in record:
        return
    checkpoint[CHECKPOINT_KEY] = {_RENAMED_RECORD_KEYS.get(k, k): v for k, v in record.items()}
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        old = {f"velocity.{_LEGACY_NETWORK}.": VELOCITY_PREFIX, f"ema.module.{_LEGACY_NETWORK}.": EMA_PREFIX}
        checkpoint["state_dict"] = {_renamed(key, old): value for key, value in state.items()}


def _renamed(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def upgrade_parameter_name(name: str) -> str:
    """A network velocity's parameter name (or name prefix, as ``freeze`` takes) as it is called today:
    ``unet.<rest>`` from before the rename is ``network.<rest>``."""
    legacy = f"{_LEGACY_NETWORK}."
    return f"{NETWORK}.{name[len(legacy) :]}" if name.startswith(legacy) else name


def network_weights(checkpoint: dict[str, Any], source: str) -> tuple[dict[str, Any], bool]:
    """The velocity network's weights a checkpoint holds, its EMA averages where it kept them (over the raw
    weights), and whether an EMA was applied. Weights it left out (frozen ones, restored from the base model) are
    not in the result.

    Raises:
        UserError: the checkpoint holds no network weights.
    """
    state = checkpoint.get("state_dict", {})
    weights = {k[len(VELOCITY_PREFIX) :]: v for k, v in state.items() if k.startswith(VELOCITY_PREFIX)}
    ema = {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if not weights and not ema:
        raise UserError(
            f"{source} holds no network weights (no {VELOCITY_PREFIX}* keys); was its velocity a diffusers network?"
        )
    return weights | ema, bool(ema)


# ---- reading the file ---------------------------------------------------------------------------------------------


def checkpoint_safe_globals() -> list[Any]:
    """Non-tensor types found in the training modules' Lightning checkpoints; constructing them runs no user code."""
    import importlib

    import numpy as np

    allowed: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 1.26 (pinned by sweeps) has it as a shim
    allowed += [multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def read_checkpoint(
    path: str | Path, trust_checkpoint: bool = False, trust_option: str = "--trust-checkpoint"
) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU without executing anything in it (memory-mapped when it can be:
    tensors are read from the file as they are used).

    A sharded checkpoint folder is read by :func:`read_sharded_checkpoint` (all of its weights).

    Args:
        path: The ``.ckpt`` file (or sharded checkpoint folder).
        trust_checkpoint: Load with full pickle (``weights_only=False``), which can run arbitrary code from the
            file; only for checkpoints from a trusted source that hold objects the safe loader refuses.
        trust_option: The command-line option that sets ``trust_checkpoint``, named in the error.

    Raises:
        UserError: the file is missing, is not a checkpoint (damaged, truncated, another kind of file), or holds
            objects the safe loader refuses.
    """
    import torch

    path = Path(path).expanduser()
    if _is_sharded(path):
        return read_sharded_checkpoint(path, trust_checkpoint, trust_option)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
    try:
        if trust_checkpoint:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, KeyError) as err:  # KeyError: pickle met an opcode it does not know
        if "Unsupported global" not in str(err) and "can still be loaded" not in str(err):
            raise _unreadable(path, "not a PyTorch file") from None
        unsafe = ", ".join(_unsafe_globals(path)) or "unknown globals"
        raise UserError(
            f"{path} holds objects that are not plain data, so it was not loaded ({unsafe}): loading them would run "
            f"code from the file; pass {trust_option} only if you trust its source"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file becomes one line
        raise _unreadable(path, (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]) from None
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not a dict); give a .ckpt "
            "file written by a fit"
        )
    return checkpoint


SHARDED_META_FILE = "meta.pt"
"""Lightning's file in a sharded checkpoint folder: everything but the weights and the optimizer states."""
_SHARDED_STATE = "state_dict."
"""Prefix of the module's state-dict entries among a sharded checkpoint's keys (``optimizer_0.`` holds the rest)."""


def _is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_sharded_checkpoint(
    path: str | Path,
    trust_checkpoint: bool = False,
    trust_option: str = "--trust-checkpoint",
    keys: Callable[[list[str]], set[str]] | None = None,
) -> dict[str, Any]:
    """Read a sharded checkpoint folder (written by ``--trainer.strategy=sharded``) in this one process, as the
    checkpoint dict a single-file checkpoint gives: Lightning's ``meta.pt`` plus ``state_dict`` put together from
    every rank's shards. Optimizer states are not read.

    Args:
        path: The checkpoint folder.
        trust_checkpoint: See :func:`read_checkpoint` (for ``meta.pt``).
        trust_option: The option that sets ``trust_checkpoint``, named in errors.
        keys: Chooses which state-dict keys to read from all of them (default: all); e.g. :func:`exported_keys`,
            so that only what an export writes is ever in memory.

    Raises:
        UserError: a damaged folder.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path / SHARDED_META_FILE, trust_checkpoint, trust_option)
    try:
        stored = FileSystemReader(path).read_metadata().state_dict_metadata
        names = [k[len(_SHARDED_STATE) :] for k in stored if k.startswith(_SHARDED_STATE)]
        chosen = set(names) if keys is None else keys(names)
        with warnings.catch_warnings():  # "no process group: loading in a single process", which is the intent
            warnings.simplefilter("ignore", UserWarning)
            wanted = {_SHARDED_STATE + k for k in chosen}
            loaded = _load_state_dict_from_keys(wanted, checkpoint_id=path) if chosen else {}
    except Exception as err:  # noqa: BLE001 - a damaged folder becomes one line
        raise _unreadable(path, (str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    checkpoint["state_dict"] = dict(loaded.get("state_dict", {}))
    return checkpoint


def exported_keys(names: list[str]) -> set[str]:
    """The state-dict keys an export reads: the EMA averages, and the velocity weights that have none."""
    averaged = {k[len(EMA_PREFIX) :] for k in names if k.startswith(EMA_PREFIX)}
    raw = {k for k in names if k.startswith(VELOCITY_PREFIX) and k[len(VELOCITY_PREFIX) :] not in averaged}
    return raw | {k for k in names if k.startswith(EMA_PREFIX)}


def _unreadable(path: Path, reason: str) -> UserError:
    return UserError(
        f"{path} is not a readable checkpoint ({reason[:120]}); it may be truncated or another kind of file: give a "
        ".ckpt file written by a fit"
    )


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in checkpoint_safe_globals()}
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # noqa: BLE001 - only used to word the error
        return []
