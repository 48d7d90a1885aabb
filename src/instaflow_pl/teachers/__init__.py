"""Teachers: Stable Diffusion (through its scheduler) and k-rectified flows (through the LatentODE)."""

from instaflow_pl.teachers.folder import (
    KIND_FILE,
    SD_KIND,
    VELOCITY_KIND,
    fingerprint,
    mark_velocity_folder,
    model_kind,
    resolve_model_folder,
)
from instaflow_pl.teachers.teacher import DTYPES, Teacher, load_teacher, parse_dtype

__all__ = [
    "DTYPES",
    "KIND_FILE",
    "SD_KIND",
    "VELOCITY_KIND",
    "Teacher",
    "fingerprint",
    "load_teacher",
    "mark_velocity_folder",
    "model_kind",
    "parse_dtype",
    "resolve_model_folder",
]
