"""Delta weights (``export --format delta``, as PeRFlow ships its models): the trained network minus its base model's
network, and their application to another fine-tune of the same base (``export --apply-delta``).

PeRFlow (arXiv 2405.07510, its ``scripts/t2i_delta.py``) releases ``student - base`` for SD 1.5 and adds it to other
SD 1.5 fine-tunes (DreamShaper, Realistic Vision ...): the weight change that straightens the base's windows is
assumed to straighten a fine-tune's as well. Applied to the base itself it gives the student back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.model_folder import ModelFolder, fingerprint

DELTA_KIND = "delta"
"""``instaflow.json``'s kind for a delta export (weights to add to a model of the base, not a model folder)."""
DELTA_FILE = "delta_weights.safetensors"
"""The delta's tensors, keyed by the network's state-dict names."""
DELTA_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
"""``--delta-dtype``: fp32 (the network's size; ``base + delta`` is the student to float32 rounding) or fp64 (twice
that; the student back exactly, bit for bit, for any weights whose difference float64 holds exactly)."""


def network_fingerprint(folder: ModelFolder) -> str:
    """SHA-256 of a folder's network files (weights and config): which base a delta was taken from."""
    return fingerprint(folder.root, (folder.family.network_folder,))


def delta_weights(student: nn.Module, base: nn.Module, dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """``student - base`` for every tensor of the network, computed in float64 and stored in ``dtype``.

    Raises:
        UserError: the two networks do not have the same tensors (names and shapes).
    """
    student_state, base_state = student.state_dict(), base.state_dict()
    check_same_tensors(student_state, base_state, source)
    return {
        name: (value.double() - base_state[name].double()).to(dtype).contiguous()
        for name, value in student_state.items()
    }


def add_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state + delta`` per tensor, summed in float64 and stored in each tensor of ``state``'s own dtype.

    Raises:
        UserError: the delta and the network do not have the same tensors (names and shapes).
    """
    check_same_tensors(delta, state, source)
    return {name: (value.double() + delta[name].double()).to(value.dtype) for name, value in state.items()}


def check_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], source: str) -> None:
    """One line when two state dicts differ in names or shapes (another architecture, or another base)."""
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        shown = (missing or extra)[0]
        raise UserError(
            f"{source}: the networks differ ({len(missing)} tensors missing, {len(extra)} extra, e.g. {shown}); a "
            "delta applies only to a network of the same architecture"
        )
    for name, value in ours.items():
        if value.shape != theirs[name].shape:
            raise UserError(
                f"{source}: tensor {name} has shape {list(value.shape)} in the delta and {list(theirs[name].shape)} in "
                "the network; a delta applies only to a network of the same architecture"
            )


def round_trip_mismatches(student: nn.Module, base: nn.Module, delta: dict[str, torch.Tensor]) -> int:
    """How many elements of ``base + delta`` (as :func:`add_delta` sums) differ from the student's: 0 means the delta
    gives the student back bit for bit."""
    applied = add_delta(base.state_dict(), delta, "the round trip")
    student_state = student.state_dict()
    return sum(int((applied[name] != student_state[name].to(applied[name].dtype)).sum()) for name in applied)


def write_delta(folder: Path, delta: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write :data:`DELTA_FILE` (with the base and the family as safetensors metadata) and an ``instaflow.json`` of
    kind :data:`DELTA_KIND` into the empty ``folder``: everything but the card."""
    from safetensors.torch import save_file

    metadata = {"format": "instaflow-pl delta", **{k: str(info["delta"][k]) for k in ("base_model", "family")}}
    save_file(delta, folder / DELTA_FILE, metadata=metadata)
    (folder / "instaflow.json").write_text(json.dumps({"kind": DELTA_KIND, **info}, indent=2, sort_keys=True) + "\n")


def read_delta(source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A delta export's record and tensors.

    Raises:
        UserError: ``source`` is not a delta export.
    """
    from safetensors.torch import load_file

    root = Path(source).expanduser()
    record_path, weights = root / "instaflow.json", root / DELTA_FILE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    if not isinstance(record, dict) or record.get("kind") != DELTA_KIND or not weights.is_file():
        raise UserError(
            f"{root} is not a delta export (it needs instaflow.json of kind {DELTA_KIND!r} and {DELTA_FILE}); "
            "write one with instaflow-pl export --format delta"
        )
    return record, load_file(weights)


def applied_info(record: dict[str, Any], delta_source: Path, model: ModelFolder) -> dict[str, Any]:
    """``instaflow.json`` of a model made by adding a delta to ``model``: the delta's record (stage, windows, ...)
    with ``model`` as the base model and where the delta came from."""
    skip = {"kind", "format_version", "delta", "exported_from", "metrics", "data"}
    info = {k: v for k, v in record.items() if k not in skip}
    earlier = model.info.get("stages")
    stage = str(record.get("stage", "reflow"))
    return {
        **info,
        "base_model": str(model.root),
        "base_kind": model.kind,
        "stages": [*(s for s in earlier if isinstance(s, str)), stage] if isinstance(earlier, list) else [stage],
        "data": record.get("data"),
        "metrics": {},
        "exported_from": str(delta_source.resolve()),
        "delta_applied": {
            "delta": str(delta_source.resolve()),
            "delta_base_model": record["delta"]["base_model"],
            "same_base": record["delta"]["base_network_sha256"] == network_fingerprint(model),
        },
    }


def delta_card(info: dict[str, Any]) -> str:
    """The README.md of a delta export: what it is and how to apply it."""
    delta = info["delta"]
    windows = int(info.get("windows") or 1)
    steps = f" with at least {windows} steps (a piecewise flow with {windows} windows)" if windows > 1 else ""
    return "\n".join(
        [
            "# InstaFlow velocity delta weights",
            "",
            f"`{DELTA_FILE}` holds the trained network minus the network of its base model `{delta['base_model']}`",
            f"({info['stage']}, {info['training_steps']} training steps, {info['weights']} weights, stored in "
            f"{delta['dtype']}), tensor by tensor under the network's state-dict names.",
            "",
            "Add it to the base model, or to another fine-tune of the same base, to get a velocity model folder:",
            "",
            "```bash",
            "instaflow-pl export --apply-delta DIR --to OTHER_MODEL --out NEW_MODEL",
            "```",
            "",
            f"Then sample `NEW_MODEL` as any export{steps}: `instaflow-pl sample --model NEW_MODEL ...`.",
            f"Applied to the base itself the sum gives the trained weights back ({delta['round_trip_mismatches']} "
            "elements differ from them in this delta's dtype).",
            "",
        ]
    )
