"""Teachers: a model plus the solver that turns noise X0 into data X1 for a prompt."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families import Family, family_of_folder, pixels_per_latent
from instaflow_pl.solver import LatentODE, ODESolution, SchedulerODE
from instaflow_pl.teachers.folder import fingerprint, model_kind, resolve_model_folder
from instaflow_pl.text import PromptEncoder
from instaflow_pl.velocity import ClassifierFreeGuidance
from instaflow_pl.velocity.networks import LatentGeometry, latent_geometry, load_network

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Accepted names of weight dtypes."""


def parse_dtype(name: str) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16`` to a torch dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


class Teacher(nn.Module):
    """A text-conditioned model and its ODE solver: ``X1 = ODE[teacher](X0 | prompt)``.

    Args:
        encoder: Prompt encoder (frozen).
        model: ``f(x, t, cond)``: a velocity (for ``LatentODE``) or a diffusers predictor (for ``SchedulerODE``).
        solver: The solver that integrates ``model`` from noise to data.
        kind: ``sd`` (a released folder, through its scheduler or, for SD3, its shifted time grid) or ``velocity``
            (a k-rectified flow written by this project).
        source: Where the teacher came from (folder or hub id).
        fingerprint: SHA-256 of the teacher's weights and configs.
        geometry: The latents the UNet takes (native shape, allowed sizes).
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

    def check_latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Validate a (C, H, W) latent shape against the UNet; return it as a tuple."""
        shape = tuple(int(s) for s in shape)
        if not self.geometry.fits(shape):
            raise UserError(
                f"latent shape {list(shape)} does not fit the teacher's UNet: it needs {self.geometry.describe()} "
                f"(its native shape is {list(self.latent_shape)})"
            )
        return shape

    def with_steps(self, steps: int) -> Teacher:
        """The same teacher (shared weights, same solver method or scheduler) solved in ``steps`` steps."""
        import copy

        other = copy.copy(self)
        other.solver = self.family.make_solver(self.kind, self.solver_name, steps, self.scheduler_config)
        return other

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
        return self.solver.solve(field, x0, cond, return_trajectory=return_trajectory)


def load_teacher(
    source: str | Path,
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
        source: Folder path or hub id.
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
    root = resolve_model_folder(source)
    kind = model_kind(root)
    family = family_of_folder(root)
    family.check_folder(root)
    if not (root / "scheduler").is_dir():
        raise UserError(f"{root} has no scheduler/ subfolder; a teacher folder needs its scheduler config")
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    solver_name = family.solver_name(kind, solver, scheduler_config)
    solver_obj = family.make_solver(kind, solver_name, steps, scheduler_config)
    network = load_network(root, family.network_folder, torch_dtype)
    teacher = Teacher(
        encoder=family.load_encoder(root, torch_dtype),
        model=family.teacher_model(network, kind, pixels_per_latent(root)),
        solver=solver_obj,
        kind=kind,
        source=str(source),
        fingerprint=fingerprint(root),
        geometry=latent_geometry(network),
        solver_name=solver_name,
        family=family,
        scheduler_config=scheduler_config,
    )
    return teacher.to(device)
