"""Teachers: a model plus the solver that turns noise X0 into data X1 for a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow_pl.dtypes import parse_dtype
from instaflow_pl.errors import UserError
from instaflow_pl.families import Family, LatentGeometry
from instaflow_pl.kinds import VELOCITY_KIND
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.solver import LatentODE, ODESolution, SchedulerODE
from instaflow_pl.text import PromptEncoder
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkPredictor, NetworkVelocity


class Teacher(nn.Module):
    """A text-conditioned model and its ODE solver: ``X1 = ODE[teacher](X0 | prompt)``.

    Args:
        encoder: Prompt encoder (frozen).
        model: ``f(x, t, cond)``: a velocity (for ``LatentODE``) or a diffusers predictor (for ``SchedulerODE``).
        solver: The solver that integrates ``model`` from noise to data.
        kind: ``released`` (through its scheduler or, for SD3, its shifted time grid) or ``velocity`` (a
            k-rectified flow written by this project).
        source: Where the teacher came from (folder or hub id).
        fingerprint: SHA-256 of the teacher's weights and configs.
        geometry: The latents the network takes (native shape, allowed sizes).
        solver_name: The solver's name (scheduler or ODE method), as recorded in dataset manifests.
        family: The model family (:mod:`instaflow_pl.families`).
        scheduler_config: The folder's scheduler config (to build the same solver at other step counts).
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        model: nn.Module,
        solver: LatentODE | SchedulerODE,
        kind: str,
        source: str,
        fingerprint: str,
        geometry: LatentGeometry,
        solver_name: str,
        family: Family,
        scheduler_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.model = model.requires_grad_(False).eval()
        self.solver = solver
        self.kind = kind
        self.source = source
        self.fingerprint = fingerprint
        self.geometry = geometry
        self.latent_shape = geometry.shape
        self.solver_name = solver_name
        self.family = family
        self.scheduler_config = scheduler_config or {}
        self._solvers: dict[tuple[int, ...], LatentODE | SchedulerODE] = {}

    def check_latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Validate a (C, H, W) latent shape against the network; return it as a tuple."""
        shape = tuple(int(s) for s in shape)
        if not self.geometry.fits(shape):
            raise UserError(
                f"latent shape {list(shape)} does not fit the teacher's network: it needs {self.geometry.describe()} "
                f"(its native shape is {list(self.latent_shape)})"
            )
        return shape

    def with_steps(self, steps: int) -> Teacher:
        """The same teacher (shared weights, same solver method or scheduler) solved in ``steps`` steps."""
        import copy

        other = copy.copy(self)
        other.solver = self.family.make_solver(
            self.kind, self.solver_name, steps, self.scheduler_config, latent_shape=self.latent_shape
        )
        other._solvers = {}
        return other

    def solver_for(self, shape: Sequence[int]) -> LatentODE | SchedulerODE:
        """The solver for latents of (C, H, W) ``shape``: :attr:`solver` at the native shape, else one built for the
        size (families whose time grid depends on the image size shift it; the others get the same solver)."""
        shape = tuple(int(s) for s in shape)
        sized = self.kind != VELOCITY_KIND and self.family.size_dependent_solver(self.scheduler_config)
        if shape == tuple(self.latent_shape) or not sized:
            return self.solver
        if shape not in self._solvers:
            steps = self.solver.steps
            self._solvers[shape] = self.family.make_solver(
                self.kind, self.solver_name, steps, self.scheduler_config, latent_shape=shape
            )
        return self._solvers[shape]

    def sample(
        self,
        x0: torch.Tensor,
        prompts: Sequence[str],
        guidance: float = 1.0,
        return_trajectory: bool = False,
    ) -> ODESolution:
        """Solve the teacher's ODE from ``x0`` for ``prompts`` with classifier-free guidance ``guidance``."""
        field = ClassifierFreeGuidance(self.model, guidance)
        cond = self.encoder.condition(prompts, with_null=field.active)
        solver = self.solver_for(x0.shape[1:])
        return solver.solve(field, x0, cond, return_trajectory=return_trajectory)


def teacher_model(folder: ModelFolder, network: nn.Module) -> nn.Module:
    """What a teacher's solver steps: the velocity of a velocity folder or of a flow family's released folder (the
    LatentODE), else the network's raw prediction (the folder's diffusers scheduler)."""
    flow = folder.kind == VELOCITY_KIND or folder.family.teacher_is_flow
    cls = NetworkVelocity if flow else NetworkPredictor
    model = cls(network, folder.family, pixels_per_latent=folder.pixels_per_latent)
    folder.family.configure_teacher_model(model, folder.kind)
    return model


def load_teacher(
    source: str | Path | ModelFolder,
    solver: str = "auto",
    steps: int = 25,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher from a diffusers-format folder (or hub id).

    A released SD or SDXL folder gives a diffusion teacher solved through a diffusers scheduler; a released SD3
    folder a flow solved by the LatentODE on its scheduler's shifted time grid; a folder marked as a velocity model
    (``instaflow.json``) a k-rectified-flow teacher solved by the LatentODE. The folder's family
    (:mod:`instaflow_pl.families`) says which parts it needs and how they are called.

    Args:
        source: Folder path or hub id, or a :class:`~instaflow_pl.model_folder.ModelFolder` already opened.
        solver: ``auto`` (the folder's own scheduler, as its stock pipeline samples it: PNDM for SD 1.5, Euler
            for SDXL, Euler on the shifted time grid for SD3; DPM-Solver++ for an SD or SDXL folder whose scheduler
            is none of the names below; Euler for velocity folders), a scheduler name (``dpm++``, ``ddim``,
            ``euler-discrete``, ``pndm``, ``unipc``; SD and SDXL) or an ODE method (``euler``, ``midpoint``,
            ``heun``, ``rk4``; SD3 and velocity folders).
        steps: Number of solver steps.
        dtype: Weight dtype of the network and text encoders: ``fp32``, ``fp16`` or ``bf16``.
        device: Where to put the weights.
    """
    torch_dtype = parse_dtype(dtype)
    folder = source if isinstance(source, ModelFolder) else ModelFolder.open(source)
    family = folder.family
    scheduler_config = folder.require_scheduler()
    solver_name = family.solver_name(folder.kind, solver, scheduler_config)
    solver_obj = family.make_solver(folder.kind, solver_name, steps, scheduler_config, folder.geometry.shape)
    teacher = Teacher(
        encoder=folder.load_encoder(torch_dtype),
        model=teacher_model(folder, folder.load_network(torch_dtype)),
        solver=solver_obj,
        kind=folder.kind,
        source=folder.source,
        fingerprint=folder.fingerprint(),
        geometry=folder.geometry,
        solver_name=solver_name,
        family=family,
        scheduler_config=scheduler_config,
    )
    return teacher.to(device)
