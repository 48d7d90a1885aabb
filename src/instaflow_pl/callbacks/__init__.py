"""Callbacks that draw: sample grids, trajectory and straightness plots, loss by t (metric callbacks: see metrics)."""

from instaflow_pl.callbacks.grid import SampleGrid
from instaflow_pl.callbacks.images import log_image
from instaflow_pl.callbacks.loss_by_t import LossByT
from instaflow_pl.callbacks.trajectories import Trajectories

__all__ = ["LossByT", "SampleGrid", "Trajectories", "log_image"]
