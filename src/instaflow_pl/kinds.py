"""The two kinds of model folder, and the marker file that tells them apart.

A *released* folder is a model as its authors published it (a diffusion model with its own scheduler, or an SD3
flow-matching model). A *velocity* folder was written by this project: a k-rectified flow solved by the Euler
LatentODE, marked by ``instaflow.json``.
"""

from __future__ import annotations

RELEASED_KIND = "released"
"""A folder as its authors released it: a diffusion (or, for SD3, flow-matching) model with its own scheduler."""
VELOCITY_KIND = "velocity"
"""A folder this project wrote (``instaflow.json``): a rectified flow sampled with the Euler LatentODE."""
KINDS = (RELEASED_KIND, VELOCITY_KIND)
"""Every kind."""
KIND_FILE = "instaflow.json"
"""Marker file of folders written by this project; holds ``{"kind": "velocity", "family": ..., ...}``."""
_LEGACY = {"sd": RELEASED_KIND}
"""Names older versions wrote (manifests and markers say ``sd`` for a released folder)."""


def normalise_kind(kind: str) -> str:
    """``kind`` as this version names it (``sd``, written before, reads as ``released``)."""
    return _LEGACY.get(kind, kind)
