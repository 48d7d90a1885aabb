"""Callbacks: FID and CLIP score of samples, sample grids, trajectory and straightness plots, loss by t, the final
metrics as a file (for sweeps)."""

from instaflow_pl.callbacks.budgets import CheckpointAtSteps
from instaflow_pl.callbacks.final_metrics import FinalMetrics
from instaflow_pl.callbacks.grid import SampleGrid
from instaflow_pl.callbacks.images import log_image
from instaflow_pl.callbacks.loss_by_t import LossByT
from instaflow_pl.callbacks.progress import StepProgressBar
from instaflow_pl.callbacks.quality import SampleQuality
from instaflow_pl.callbacks.trajectories import Trajectories

__all__ = [
    "CheckpointAtSteps",
    "FinalMetrics",
    "LossByT",
    "SampleGrid",
    "SampleQuality",
    "StepProgressBar",
    "Trajectories",
    "log_image",
]
