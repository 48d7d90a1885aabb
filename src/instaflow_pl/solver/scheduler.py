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

INTERVAL_SCHEDULERS = ("ddim", "dpm++", "unipc")
"""Schedulers that can solve a sub-interval of their timesteps (a PeRFlow window): their state at a timestep is the
noised latent itself (the DDPM marginal; unit ``init_noise_sigma``, no input scaling). DDIM (PeRFlow's) keeps no
history, so consecutive sub-intervals make up the full solve exactly; the multistep ones restart their history at an
interval's start. PNDM (its warm-up revisits timesteps) and Euler (its state is scaled by sigma) cannot."""


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
    def can_solve_interval(self) -> bool:
        """Whether :meth:`solve` accepts an ``interval`` (the scheduler is one of :data:`INTERVAL_SCHEDULERS`)."""
        return any(type(self.scheduler) is SCHEDULERS[name] for name in INTERVAL_SCHEDULERS)

    def _flow_times(self, num_train: float) -> list[float]:
        """Flow time of each timestep of the current schedule, ``1 - timestep / num_train_timesteps``."""
        return [1.0 - float(ts) / num_train for ts in self.scheduler.timesteps]

    def _interval_steps(self, start: float, end: float) -> list[int]:
        """Indices of the schedule's timesteps whose flow time lies in ``[start, end)`` (``set_timesteps`` done)."""
        if not self.can_solve_interval:
            raise UserError(
                f"the {type(self.scheduler).__name__} solver cannot solve a sub-interval of its timesteps: choose one "
                f"of {', '.join(INTERVAL_SCHEDULERS)} (PeRFlow uses ddim)"
            )
        if not 0.0 <= start < end <= 1.0:
            raise UserError(f"an interval of flow time must satisfy 0 <= start < end <= 1, got [{start}, {end}]")
        times = self._flow_times(float(self.scheduler.config.num_train_timesteps))
        chosen = [k for k, t in enumerate(times) if start <= t < end]
        if not chosen:
            raise UserError(
                f"no timestep of {self.steps} {type(self.scheduler).__name__} steps lies in [{start}, {end}): "
                "take more solver steps"
            )
        return chosen

    def marginal(self, x1: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """The state an interval solve from ``t`` starts from for data ``x1`` and standard normal ``noise``: the DDPM
        marginal ``sqrt(a) X1 + sqrt(1 - a) X0`` at the schedule's first timestep at or after ``t`` (``a`` its
        ``alphas_cumprod``), and the noise itself at the schedule's first timestep, where a full solve starts."""
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=x1.device)
        first = self._interval_steps(t, 1.0)[0]
        if first == 0:
            return noise * sched.init_noise_sigma
        alpha = sched.alphas_cumprod[int(sched.timesteps[first])].to(device=x1.device, dtype=torch.float64)
        return (alpha.sqrt() * x1 + (1.0 - alpha).sqrt() * noise).to(x1.dtype)

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
        interval: tuple[float, float] | None = None,
    ) -> ODESolution:
        """Integrate from the noise ``x0`` (unit variance) to data.

        Args:
            field: The model ``f(x, timestep, cond)`` (guidance already wrapped around it if wanted).
            x0: Standard normal noise, shape (B, ...); with ``interval``, the state at the interval's first timestep
                (:meth:`marginal`).
            cond: Conditioning passed to every call.
            return_trajectory: Also return the state after each scheduler step, with its flow time (a step that
                revisits the last time, as PNDM's second one does, replaces that state).
            enable_grad: Keep the autograd graph.
            interval: ``(t_s, t_e)``: take only the steps from the schedule's timesteps whose flow time lies in
                ``[t_s, t_e)``, the same steps the full solve takes there (schedulers of :data:`INTERVAL_SCHEDULERS`);
                the state reached is the one at the next timestep of the schedule (data after the last).

        Returns:
            The end point, the number of model evaluations and, on request, the trajectory.
        """
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=x0.device)
        num_train = float(sched.config.num_train_timesteps)
        chosen = range(len(sched.timesteps)) if interval is None else self._interval_steps(*interval)
        first = chosen[0]
        if first > 0 and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)  # multistep schedulers find their step index (and sigmas) from here
        x = x0 * sched.init_noise_sigma if first == 0 else x0
        t_first = 0.0 if first == 0 else 1.0 - float(sched.timesteps[first]) / num_train
        states, times = ([x0], [t_first]) if return_trajectory else (None, None)
        nfe = 0
        with torch.set_grad_enabled(enable_grad):
            for k in chosen:
                timestep = sched.timesteps[k]
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
