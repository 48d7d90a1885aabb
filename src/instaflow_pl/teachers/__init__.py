"""Teachers: released diffusion models (through their scheduler) and rectified flows (through the LatentODE)."""

from instaflow_pl.teachers.teacher import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher"]
