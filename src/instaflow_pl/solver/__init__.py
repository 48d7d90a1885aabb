"""Solvers: the LatentODE and the adapter that runs a diffusers scheduler as an ODE."""

from instaflow_pl.solver.ode import METHODS, ORDERS, Field, LatentODE, ODESolution, uniform_grid
from instaflow_pl.solver.scheduler import (
    INTERVAL_SCHEDULERS,
    SCHEDULERS,
    SchedulerODE,
    make_scheduler,
    scheduler_solver,
)
from instaflow_pl.solver.windows import (
    WindowTargets,
    piecewise_grid,
    window_edges,
    window_index,
    window_steps,
    window_targets,
)

__all__ = [
    "INTERVAL_SCHEDULERS",
    "METHODS",
    "ORDERS",
    "SCHEDULERS",
    "Field",
    "LatentODE",
    "ODESolution",
    "SchedulerODE",
    "WindowTargets",
    "make_scheduler",
    "scheduler_solver",
    "piecewise_grid",
    "uniform_grid",
    "window_edges",
    "window_index",
    "window_steps",
    "window_targets",
]
