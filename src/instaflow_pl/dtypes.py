"""Names of tensor dtypes in configs and manifests (``fp32``, ``fp16``, ``bf16``): the one map from name to dtype."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from instaflow_pl.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Accepted names of dtypes."""


def parse_dtype(name: str, allowed: Iterable[str] | None = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (one of ``allowed``, default every name); ``what`` names the setting in the
    error."""
    allowed = tuple(DTYPES if allowed is None else allowed)
    if name not in allowed:
        raise UserError(f"unknown {what} {name!r}: choose one of {', '.join(allowed)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of ``dtype`` (``torch.bfloat16`` -> ``bf16``)."""
    return next(name for name, value in DTYPES.items() if value == dtype)
