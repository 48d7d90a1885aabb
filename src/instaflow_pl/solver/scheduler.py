"""SchedulerODE: solves a diffusers teacher's probability-flow ODE through the teacher's own scheduler.

The model predicts whatever the scheduler is configured for (epsilon or v); the scheduler turns it into steps. Time is
reported in the project's convention: t = 1 - timestep / num_train_timesteps (0 = noise, 1 = data).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from instaflow_pl.errors import UserError
from instaflow_pl.solver.ode import ODESolution

Predictor = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""A diffusion model ``f(x, timestep, cond)`` returning the scheduler's prediction (epsilon or v)."""

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler-discrete": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
"""Diffusers schedulers by the solver names the project accepts."""


def scheduler_solver(config: dict[str, Any]) -> str | None:
    """The solver name of the scheduler a config describes (its ``_class_name``, as in a folder's
    ``scheduler/scheduler_config.json``), or None when it is not one of :data:`SCHEDULERS`.

    This is what ``solver: auto`` gives a released diffusion folder: the scheduler its stock pipeline samples with.
    """
    class_name = config.get("_class_name")
    return next((name for name, cls in SCHEDULERS.items() if cls.__name__ == class_name), None)


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """Build scheduler ``name`` from a teacher's scheduler config (``scheduler/scheduler_config.json``)."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler solver {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


class SchedulerODE:
    """Runs a diffusers scheduler from noise to data, the way diffusers' text-to-image pipelines do.

    Args:
        scheduler: A configured diffusers scheduler. It holds state between steps, so one SchedulerODE runs one solve
            at a time (``set_timesteps`` at the start of each solve resets it, as in diffusers' pipelines).
        steps: Number of inference steps.
    """

    def __init__(self, scheduler: SchedulerMixin, steps: int = 25):
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        self.scheduler = scheduler
        self.steps = steps

    @property
    def nfe(self) -> int:
        """Model evaluations one solve costs."""
        sched = copy.deepcopy(self.scheduler)  # leave the solver's own scheduler untouched
        sched.set_timesteps(self.steps)
        return len(sched.timesteps)

    def solve(
        self,
        field: Predictor,
        x0: torch.Tensor,
        cond: Any = None,
        *,
        return_trajectory: bool = False,
        enable_grad: bool = False,
    ) -> ODESolution:
        """Integrate from the noise ``x0`` (unit variance) to data.

        Args:
            field: The model ``f(x, timestep, cond)`` (guidance already wrapped around it if wanted).
            x0: Standard normal noise, shape (B, ...).
            cond: Conditioning passed to every call.
            return_trajectory: Also return the state after each scheduler step, with its flow time (a step that
                revisits the last time, as PNDM's second one does, replaces that state).
            enable_grad: Keep the autograd graph.

        Returns:
            The end point, the number of model evaluations and, on request, the trajectory.
        """
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=x0.device)
        num_train = float(sched.config.num_train_timesteps)
        x = x0 * sched.init_noise_sigma
        states, times = ([x0], [0.0]) if return_trajectory else (None, None)
        nfe = 0
        with torch.set_grad_enabled(enable_grad):
            for k, timestep in enumerate(sched.timesteps):
                model_input = sched.scale_model_input(x, timestep)
                prediction = field(model_input, timestep, cond)
                nfe += 1
                x = sched.step(prediction, timestep, x, return_dict=False)[0]
                if states is not None:
                    nxt = sched.timesteps[k + 1] if k + 1 < len(sched.timesteps) else None
                    t_next = 1.0 if nxt is None else 1.0 - float(nxt) / num_train
                    if t_next == times[-1]:  # PNDM's second call corrects the state it just made: replace it
                        states[-1] = x
                    else:
                        states.append(x)
                        times.append(t_next)
        if states is None:
            return ODESolution(x=x, nfe=nfe)
        return ODESolution(x=x, nfe=nfe, states=torch.stack(states), times=torch.tensor(times))
