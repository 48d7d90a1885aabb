"""Teachers: released diffusion models (through their scheduler) and rectified flows (through the LatentODE)."""

from instaflow_pl.teachers.teacher import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher"]

# TEMPORARY shim while branches merge (removed before commit)
from instaflow_pl.dtypes import DTYPES, parse_dtype  # noqa: E402
from instaflow_pl.teachers.folder import (  # noqa: E402
    KIND_FILE,
    SD_KIND,
    VELOCITY_KIND,
    fingerprint,
    mark_velocity_folder,
    model_kind,
    resolve_model_folder,
)
