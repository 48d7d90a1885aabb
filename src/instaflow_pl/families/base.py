"""What a model family is: the one place that knows how a family's folder, prompts and network work.

Everything else in the project (LatentODE, guidance, pair generation, the training modules, export, the pipeline)
asks the family; a new family (e.g. Flux) is one new file beside ``sd.py``, ``sdxl.py`` and ``sd3.py``, registered in
:mod:`instaflow_pl.families`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.velocity.condition import TextCondition

SD_KIND = "sd"
"""A folder as its authors released it: a diffusion (or, for SD3, flow-matching) model with its own scheduler."""
VELOCITY_KIND = "velocity"
"""A folder this project wrote (``instaflow.json``): a rectified flow sampled with the Euler LatentODE."""
KIND_FILE = "instaflow.json"
"""Marker file of folders written by this project; holds ``{"kind": "velocity", "family": ..., ...}``."""


class Family:
    """A model family: how its folders, prompts, network and latents work.

    Class attributes say what a folder holds; methods turn prompts into a :class:`TextCondition`, call the network
    and build the teacher's solver. Subclasses are stateless: one instance each, in :data:`FAMILIES`.
    """

    name: ClassVar[str]
    """Short name used in configs, manifests and checkpoints (``sd``, ``sdxl``, ``sd3``)."""
    title: ClassVar[str]
    """The family's name in messages."""
    pipeline_classes: ClassVar[tuple[str, ...]]
    """``model_index.json`` ``_class_name`` values of released folders of this family."""
    network_folder: ClassVar[str] = "unet"
    """Subfolder of the denoising network."""
    text_parts: ClassVar[tuple[str, ...]]
    """Tokenizer and text-encoder subfolders a folder must hold."""
    optional_text_parts: ClassVar[tuple[str, ...]] = ()
    """Tokenizer and text-encoder subfolders a folder may leave out (the family then does what diffusers does)."""
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {}
    """(library, class) of each text part when ``model_index.json`` does not name one."""
    velocity_sign: ClassVar[float] = 1.0
    """Our velocity (data - noise) is this times the network's output (SD3's flow-matching output points to noise)."""
    teacher_solvers: ClassVar[tuple[str, ...]]
    """Solvers that fit a released (``sd`` kind) folder of this family."""
    default_teacher_solver: ClassVar[str]
    """The solver ``auto`` gives a released folder whose own scheduler is none the project solves (SD3: its
    flow-matching Euler is the LatentODE's ``euler``)."""
    pipeline_config: ClassVar[tuple[str, ...]] = ()
    """``model_index.json`` settings an export copies from its base folder (SDXL: ``force_zeros_for_empty_prompt``)."""
    lora_pipeline: ClassVar[str]
    """The diffusers pipeline class whose ``save_lora_weights``/``load_lora_weights`` handle this family's LoRA."""
    standalone_pipeline: ClassVar[bool] = False
    """Exports ship the self-contained ``instaflow_pipeline.py`` (stock diffusers with ``trust_remote_code``): for
    families whose stock pipeline cannot sample an export (a UNet's velocity has the opposite sign of diffusers'
    flow-matching schedulers)."""
    pipeline_file_in_index: ClassVar[bool] = True
    """With :attr:`standalone_pipeline`: ``model_index.json`` names the file (``"_class_name": [file, class]``), so
    ``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` loads it. False keeps ``InstaFlowPipeline`` as
    the class name, so the family's stock pipeline (:attr:`lora_pipeline`) still loads the folder's parts, and the
    file is loaded with ``custom_pipeline="instaflow_pipeline"``."""
    card_steps_note: ClassVar[tuple[str, ...]] = (
        "Sampling uses the project's Euler LatentODE: t = 0 is noise, t = 1 is data, the UNet is called at timestep",
        "`(1 - t) * 1000` and returns the velocity (data - noise). The scheduler config only records the timestep",
        "range; diffusers' flow-matching schedulers use the opposite velocity sign and must not step this UNet.",
    )
    """The model card's paragraph (its lines) on how the export is stepped and whether a stock scheduler may."""

    # ---- networks -------------------------------------------------------------------------------------------

    def owns_network(self, network: nn.Module) -> bool:
        """Whether ``network`` (loaded, or built from a config) is this family's."""
        raise NotImplementedError

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """Keyword arguments (besides the latents and the timestep) of one network call on ``x``."""
        raise NotImplementedError

    def call(
        self, network: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> torch.Tensor:
        """The network's raw output at diffusers ``timestep`` (scalar or per sample), in the network's dtype."""
        inputs = self.network_inputs(network, x, cond, pixels_per_latent)
        return network(x, timestep, **inputs, return_dict=False)[0]

    # ---- prompts --------------------------------------------------------------------------------------------

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """The family's :class:`~instaflow_pl.text.PromptEncoder` from loaded tokenizers and text encoders
        (``parts``, by subfolder name; optional ones may be None), the folder's ``model_index.json`` and the
        network's config."""
        raise NotImplementedError

    def load_encoder(self, root: Path, dtype: torch.dtype = torch.float32, cache_mb: float = 0.0):
        """Load the tokenizers and text encoders from ``root`` and build the family's prompt encoder."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.check_folder(root)
        index = read_model_index(root)
        parts = {}
        for name in self.text_parts + self.optional_text_parts:
            parts[name] = self._load_part(root, name, index, dtype) if (root / name).is_dir() else None
        network_config = json.loads((root / self.network_folder / "config.json").read_text())
        return self.encoder_from_parts(parts, index, network_config, cache_mb)

    def _load_part(self, root: Path, name: str, index: dict[str, Any], dtype: torch.dtype) -> Any:
        entry = index.get(name)
        library, class_name = entry if isinstance(entry, list) and None not in entry else self.default_classes[name]
        cls = getattr(importlib.import_module(library), class_name)
        if name.startswith("tokenizer"):
            return cls.from_pretrained(root, subfolder=name)
        return cls.from_pretrained(root, subfolder=name, torch_dtype=dtype)

    # ---- folders --------------------------------------------------------------------------------------------

    def check_folder(self, root: Path) -> None:
        """A clear error when ``root`` lacks a part the family needs."""
        for part in (self.network_folder, *self.text_parts):
            if not (root / part).is_dir():
                raise UserError(
                    f"{root} has no {part}/ subfolder; a {self.title} folder needs "
                    f"{', '.join((self.network_folder, *self.text_parts))} (and vae, scheduler)"
                )

    # ---- teachers -------------------------------------------------------------------------------------------

    def teacher_model(self, network: nn.Module, kind: str, pixels_per_latent: int) -> nn.Module:
        """The model a teacher of ``kind`` solves: a velocity for the LatentODE or a predictor for a scheduler."""
        from instaflow_pl.velocity.network import NetworkPredictor, NetworkVelocity

        cls = NetworkVelocity if kind == VELOCITY_KIND or self.teacher_is_flow else NetworkPredictor
        return cls(network, family=self, pixels_per_latent=pixels_per_latent)

    teacher_is_flow: ClassVar[bool] = False
    """A released folder is already a rectified flow solved by the LatentODE (SD3), not a diffusion model."""

    def make_solver(self, kind: str, name: str, steps: int, scheduler_config: dict[str, Any]):
        """The teacher's solver: a diffusers scheduler (diffusion teachers) or the LatentODE (flows)."""
        from instaflow_pl.solver import METHODS, SCHEDULERS, LatentODE, SchedulerODE, make_scheduler

        if kind == VELOCITY_KIND:
            if name not in METHODS:
                raise UserError(f"solver {name!r} does not fit a velocity teacher: choose one of {', '.join(METHODS)}")
            return LatentODE(name, steps)
        if name not in self.teacher_solvers:
            raise UserError(
                f"solver {name!r} does not fit a {self.title} teacher: choose auto or one of "
                f"{', '.join(self.teacher_solvers)}"
            )
        if name in SCHEDULERS:
            return SchedulerODE(make_scheduler(name, scheduler_config), steps)
        return self.flow_solver(name, steps, scheduler_config)

    def flow_solver(self, name: str, steps: int, scheduler_config: dict[str, Any]):
        """The LatentODE of a released flow-matching folder (only families with ``teacher_is_flow``)."""
        raise UserError(f"a {self.title} teacher is solved through its scheduler, not the LatentODE")

    def solver_name(self, kind: str, solver: str, scheduler_config: dict[str, Any]) -> str:
        """The solver a teacher of ``kind`` uses for ``solver``.

        ``auto`` is Euler for velocity folders; for a released folder it is the folder's own scheduler (its
        ``scheduler_config`` ``_class_name``), as the family's stock pipeline samples it, when the family's teacher
        solves that scheduler, else :attr:`default_teacher_solver`.
        """
        if solver != "auto":
            return solver
        if kind == VELOCITY_KIND:
            return "euler"
        from instaflow_pl.solver import scheduler_solver

        own = scheduler_solver(scheduler_config)
        return own if own in self.teacher_solvers else self.default_teacher_solver

    def allowed_solvers(self, kind: str) -> tuple[str, ...]:
        """The solver names a teacher of ``kind`` accepts."""
        from instaflow_pl.solver import METHODS

        return tuple(METHODS) if kind == VELOCITY_KIND else self.teacher_solvers

    # ---- model cards ----------------------------------------------------------------------------------------

    def card_stock_use(self, steps: int) -> list[str]:
        """The model card's first way to sample an export in ``steps`` steps, without instaflow-pl (markdown lines
        whose python block loads ``DIR``): the shipped ``instaflow_pipeline.py`` through stock diffusers' custom
        pipelines, or, for a family that ships none, a line saying stock diffusers cannot sample it."""
        if not self.standalone_pipeline:
            return [
                f"Stock diffusers cannot sample this export ({self.lora_pipeline}'s scheduler steps another velocity "
                "convention); use instaflow-pl as below."
            ]
        custom = "" if self.pipeline_file_in_index else 'custom_pipeline="instaflow_pipeline", '
        return [
            "With diffusers alone (no instaflow-pl needed; the pipeline is `instaflow_pipeline.py` in this folder):",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f"pipe = DiffusionPipeline.from_pretrained(DIR, {custom}trust_remote_code=True)",
            f"image = pipe('a photo of a cat', num_inference_steps={steps}).images[0]",
            "```",
        ]

    def card_use(self, steps: int) -> list[str]:
        """The model card's "Use" section (markdown lines, without its heading) for an export of this family that
        samples in ``steps`` steps: the family's stock-diffusers way first, then instaflow-pl's, then how it steps."""
        return [
            *self.card_stock_use(steps),
            "",
            "With instaflow-pl (every family):",
            "",
            "```bash",
            f"instaflow-pl sample --model DIR --prompt 'a photo of a cat' --steps {steps} --out grid.png",
            "```",
            "",
            "```python",
            "from instaflow_pl.pipeline import InstaFlowPipeline",
            "",
            "pipe = InstaFlowPipeline.from_pretrained(DIR)",
            f"image = pipe('a photo of a cat', num_inference_steps={steps}).images[0]",
            "```",
            "",
            *self.card_steps_note,
            "",
            "This folder is also a velocity teacher (`load_teacher(DIR)`) and a `base_model` for the next stage.",
        ]

    def card_lora_use(self, base_model: str) -> list[str]:
        """The LoRA card's snippet: the adapters loaded onto ``base_model`` with the family's stock pipeline."""
        return [
            "```python",
            f"from diffusers import {self.lora_pipeline}",
            "",
            f"pipe = {self.lora_pipeline}.from_pretrained('{base_model}')",
            f"pipe.load_lora_weights(DIR)  # the {self.network_folder} now returns this model's velocity",
            "```",
        ]

    # ---- tiny fixtures --------------------------------------------------------------------------------------

    def build_tiny(self, out: Path, seed: int = 0, sample_size: int = 8) -> Path:
        """Write a tiny folder of this family with random weights (for tests and the tiny configs)."""
        raise NotImplementedError


def read_model_index(root: Path) -> dict[str, Any]:
    """``root/model_index.json`` as a dict (a clear error when it is not JSON)."""
    path = root / "model_index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} has no model_index.json; it is not a diffusers-format model folder") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def pixels_per_latent(root: Path) -> int:
    """Image pixels per latent pixel of a folder: the VAE's downsampling (1 without a VAE: latents are images)."""
    config = root / "vae" / "config.json"
    if not config.is_file():
        return 1
    blocks = json.loads(config.read_text()).get("block_out_channels", [])
    return 2 ** max(len(blocks) - 1, 0)
