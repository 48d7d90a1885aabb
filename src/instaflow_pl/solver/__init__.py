"""Solvers: the LatentODE and the adapter that runs a diffusers scheduler as an ODE."""

from instaflow_pl.solver.ode import METHODS, ORDERS, Field, LatentODE, ODESolution, uniform_grid
from instaflow_pl.solver.scheduler import SCHEDULERS, SchedulerODE, make_scheduler, scheduler_solver

__all__ = [
    "METHODS",
    "ORDERS",
    "SCHEDULERS",
    "Field",
    "LatentODE",
    "ODESolution",
    "SchedulerODE",
    "make_scheduler",
    "scheduler_solver",
    "uniform_grid",
]
