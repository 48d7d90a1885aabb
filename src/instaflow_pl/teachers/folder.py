"""TEMPORARY shim while branches merge (removed before commit)."""

from instaflow_pl.kinds import KIND_FILE, VELOCITY_KIND
from instaflow_pl.kinds import RELEASED_KIND as SD_KIND
from instaflow_pl.model_folder import fingerprint, mark_velocity_folder, resolve_model_folder


def model_kind(root):
    from instaflow_pl.model_folder import ModelFolder

    return ModelFolder.open(root).kind


__all__ = [
    "KIND_FILE",
    "SD_KIND",
    "VELOCITY_KIND",
    "fingerprint",
    "mark_velocity_folder",
    "model_kind",
    "resolve_model_folder",
]
