"""Teachers: a model plus the solver that turns noise X0 into data X1 for a prompt."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.solver import METHODS, SCHEDULERS, LatentODE, ODESolution, SchedulerODE, make_scheduler
from instaflow_pl.teachers.folder import SD_KIND, VELOCITY_KIND, fingerprint, model_kind, resolve_model_folder
from instaflow_pl.text import PromptEncoder
from instaflow_pl.velocity import ClassifierFreeGuidance, UNetPredictor, UNetVelocity
from instaflow_pl.velocity.networks import LatentGeometry, latent_geometry, load_network

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Accepted names of weight dtypes."""

DEFAULT_SOLVER = {SD_KIND: "dpm++", VELOCITY_KIND: "euler"}


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
        kind: ``sd`` (diffusion model through its scheduler) or ``velocity`` (a k-rectified flow).
        source: Where the teacher came from (folder or hub id).
        fingerprint: SHA-256 of the teacher's weights and configs.
        geometry: The latents the UNet takes (native shape, allowed sizes).
        solver_name: The solver's name (scheduler or ODE method), as recorded in dataset manifests.
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
        solver_name: str = "",
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
        if isinstance(self.solver, LatentODE):
            other.solver = LatentODE(self.solver.method, steps)
        else:
            other.solver = SchedulerODE(copy.deepcopy(self.solver.scheduler), steps)
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


def resolve_solver_name(kind: str, solver: str) -> str:
    """The solver a teacher of ``kind`` uses for ``solver`` (``auto`` picks the kind's default)."""
    return DEFAULT_SOLVER[kind] if solver == "auto" else solver


def _make_solver(kind: str, name: str, steps: int, scheduler_config: dict) -> LatentODE | SchedulerODE:
    if kind == SD_KIND:
        if name not in SCHEDULERS:
            raise UserError(
                f"solver {name!r} does not fit a Stable Diffusion teacher: choose one of {', '.join(SCHEDULERS)}"
            )
        return SchedulerODE(make_scheduler(name, scheduler_config), steps)
    if name not in METHODS:
        raise UserError(f"solver {name!r} does not fit a velocity teacher: choose one of {', '.join(METHODS)}")
    return LatentODE(name, steps)


def load_teacher(
    source: str | Path,
    solver: str = "auto",
    steps: int = 25,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher from a diffusers-format folder (or hub id).

    A Stable Diffusion folder gives a diffusion teacher solved through a diffusers scheduler; a folder marked as a
    velocity model (``instaflow.json``) gives a k-rectified-flow teacher solved by the LatentODE.

    Args:
        source: Folder path or hub id.
        solver: ``auto`` (DPM-Solver++ for SD, Euler for velocity), a scheduler name (``dpm++``, ``ddim``,
            ``euler-discrete``, ``pndm``, ``unipc``) or an ODE method (``euler``, ``midpoint``, ``heun``, ``rk4``).
        steps: Number of solver steps.
        dtype: Weight dtype of UNet and text encoder: ``fp32``, ``fp16`` or ``bf16``.
        device: Where to put the weights.
    """
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch_dtype = parse_dtype(dtype)
    root = resolve_model_folder(source)
    kind = model_kind(root)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise UserError(f"{root} has no {part}/ subfolder; a teacher folder needs unet, text_encoder, tokenizer")
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    solver_name = resolve_solver_name(kind, solver)
    solver_obj = _make_solver(kind, solver_name, steps, scheduler_config)
    unet = load_network(root, "unet", torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    model = UNetVelocity(unet) if kind == VELOCITY_KIND else UNetPredictor(unet)
    teacher = Teacher(
        encoder=PromptEncoder(tokenizer, text_encoder),
        model=model,
        solver=solver_obj,
        kind=kind,
        source=str(source),
        fingerprint=fingerprint(root),
        geometry=latent_geometry(unet),
        solver_name=solver_name,
    )
    return teacher.to(device)
