"""What a model family is: the one place that knows how a family's folder, network, latents and prompts work.

Everything else in the project (model folders, LatentODE, guidance, pair generation, the training modules, export,
the pipeline) asks the family; a new family (e.g. Flux) is one new file beside ``sd.py``, ``sdxl.py``, ``sd3.py`` and
``digits.py`` plus its tiny fixture, registered in :mod:`instaflow_pl.families`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.kinds import VELOCITY_KIND
from instaflow_pl.velocity.condition import TextCondition

if TYPE_CHECKING:
    from instaflow_pl.model_folder import ModelFolder


PROMPT_LENGTH_KEY = "max_sequence_length"
"""The key of the prompt length (T5 tokens, diffusers' name) in manifests and ``instaflow.json``."""


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
    """Solvers that fit a released folder of this family."""
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

    network_classes: ClassVar[tuple[tuple[str, str], ...]]
    """(module, class) of each network class the family loads (its ``config.json`` ``_class_name``)."""
    shard_blocks: ClassVar[tuple[str, ...]] = ()
    """Class names of the network's blocks that sharded training wraps as FSDP units, one each
    (:mod:`instaflow_pl.sharding`); empty: the family cannot be trained sharded."""
    uses_vae: ClassVar[bool] = True
    """Latents come from a VAE in ``vae/`` (False: the network works on pixels, latent = image)."""
    legacy_names: ClassVar[tuple[str, ...]] = ()
    """Names records written before this family existed give its models (the digits demo's were ``sd``)."""

    # ---- networks -------------------------------------------------------------------------------------------

    def network_class(self, name: str) -> type | None:
        """The family's network class called ``name``, or None when the family has no such class."""
        for module, class_name in self.network_classes:
            if class_name == name:
                return getattr(importlib.import_module(module), class_name)
        return None

    def owns_network_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a network of ``config`` (its ``config.json``, with ``_class_name``) is this family's."""
        return config.get("_class_name") in {name for _, name in self.network_classes}

    def owns_network(self, network: nn.Module) -> bool:
        """Whether ``network`` (loaded, or built from a config) is this family's."""
        return self.owns_network_config({**network.config, "_class_name": type(network).__name__})

    def answers_to(self, name: str) -> bool:
        """Whether a record naming family ``name`` (a manifest, a checkpoint) means this family."""
        return name == self.name or name in self.legacy_names

    def latent_geometry(self, config: Mapping[str, Any]) -> LatentGeometry:
        """The latents a network of ``config`` takes: ``in_channels`` channels, ``sample_size`` native size, sizes
        multiples of 2 ** (down blocks - 1) (a UNet's; other networks override)."""
        size = config["sample_size"]
        size = size if isinstance(size, int) else size[0]
        down_factor = 2 ** (len(config["down_block_types"]) - 1)
        return LatentGeometry(int(config["in_channels"]), int(size), down_factor)

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

    def load_encoder(self, folder: ModelFolder, dtype: torch.dtype = torch.float32, cache_mb: float = 0.0):
        """Load the tokenizers and text encoders of ``folder`` and build the family's prompt encoder."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        parts = {}
        for name in self.text_parts + self.optional_text_parts:
            parts[name] = self._load_part(folder.root, name, folder.index, dtype) if folder.has(name) else None
        encoder = self.encoder_from_parts(parts, folder.index, folder.network_config, cache_mb)
        return self.configure_encoder(encoder, folder.info)

    def configure_encoder(self, encoder, info: Mapping[str, Any]):
        """The prompt encoder set up with what a folder's ``instaflow.json`` (``info``; empty for a released folder)
        records about its conditioning (Flux: the guidance input a reflowed student keeps)."""
        return encoder

    def encoder_info(self, encoder) -> dict[str, Any]:
        """What an export's ``instaflow.json`` records about a trained model's conditioning, for
        :meth:`configure_encoder` to read back (Flux: its guidance input and prompt length; none for the others)."""
        return {}

    recorded_prompt_length: ClassVar[int | None] = None
    """The prompt length that manifests written before it was recorded imply (SD3: 256 T5 tokens, the only length
    then); None for families without the setting."""

    def prompt_length(self, encoder) -> int | None:
        """The encoder's prompt length in T5 tokens (``max_sequence_length``); None for a family without that
        setting (CLIP's 77 tokens only)."""
        return None

    def set_prompt_length(self, encoder, tokens: int) -> None:
        """Set the encoder's prompt length (``max_sequence_length``, a user's setting: pairs, the modules' data);
        a one-line error for a family without it."""
        raise UserError(
            f"max_sequence_length is a setting of families with a T5 prompt encoder (SD3, Flux); a {self.title} "
            "model reads CLIP's 77 tokens only"
        )

    def configure_encoder_for_pairs(
        self, encoder, teacher_kind: str, guidance: float, prompt_length: int | None = None
    ) -> None:
        """Set up the prompt encoder of a model trained on pairs a ``teacher_kind`` teacher made at ``guidance`` with
        prompts of ``prompt_length`` T5 tokens (None: not recorded): the model reads its prompts as the teacher did
        (and Flux: a student of a released [dev] teacher keeps its guidance input at the pairs' value)."""
        if prompt_length is not None:
            self.configure_encoder(encoder, {PROMPT_LENGTH_KEY: prompt_length})

    def _load_part(self, root: Path, name: str, index: dict[str, Any], dtype: torch.dtype) -> Any:
        entry = index.get(name)
        library, class_name = entry if isinstance(entry, list) and None not in entry else self.default_classes[name]
        cls = getattr(importlib.import_module(library), class_name)
        if name.startswith("tokenizer"):
            return cls.from_pretrained(root, subfolder=name)
        return cls.from_pretrained(root, subfolder=name, torch_dtype=dtype)

    # ---- folders --------------------------------------------------------------------------------------------

    def required_parts(self) -> tuple[str, ...]:
        """The subfolders every folder of this family holds."""
        return (self.network_folder, *self.text_parts, *(("vae",) if self.uses_vae else ()))

    def check_folder(self, root: Path) -> None:
        """A clear error when ``root`` lacks a part the family needs (the one message for it)."""
        parts = self.required_parts()
        for part in parts:
            if not (root / part).is_dir():
                raise UserError(
                    f"{root} has no {part}/ subfolder; a {self.title} folder needs {', '.join(parts)} (and scheduler)"
                )

    # ---- teachers -------------------------------------------------------------------------------------------

    def guidance_as_input(self, kind: str, network_config: Mapping[str, Any]) -> bool:
        """Whether a teacher of ``kind`` with this network takes its guidance scale as an input (one branch, a
        guidance-distilled network as its pipeline guides it) rather than as classifier-free guidance."""
        return False

    teacher_is_flow: ClassVar[bool] = False
    """A released folder is already a rectified flow solved by the LatentODE (SD3), not a diffusion model."""

    def make_solver(
        self,
        kind: str,
        name: str,
        steps: int,
        scheduler_config: dict[str, Any],
        latent_shape: tuple[int, int, int] | None = None,
    ):
        """The teacher's solver: a diffusers scheduler (diffusion teachers) or the LatentODE (flows).

        Args:
            kind: The folder's kind (released or velocity).
            name: Solver name (see :meth:`solver_name`).
            steps: Solver steps.
            scheduler_config: The folder's scheduler config.
            latent_shape: The (C, H, W) of the latents to solve, for families whose time grid depends on the image
                size (resolution-dependent shifting); None: the network's native size.
        """
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
        return self.flow_solver(name, steps, scheduler_config, latent_shape)

    def size_dependent_solver(self, scheduler_config: dict[str, Any]) -> bool:
        """Whether the teacher's time grid depends on the latents' size (a flow-matching scheduler with dynamic,
        resolution-dependent shifting), so :meth:`make_solver` needs ``latent_shape``."""
        return self.teacher_is_flow and bool(scheduler_config.get("use_dynamic_shifting", False))

    default_max_shift: ClassVar[float] = 1.16
    """``max_shift`` of dynamic shifting when the scheduler config has none (the family's diffusers pipeline's)."""

    def image_seq_len(self, latent_shape: tuple[int, int, int]) -> int:
        """Image tokens of latents of ``latent_shape``, as dynamic shifting counts them (2 x 2 patches)."""
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """The sigmas the family's pipeline gives its scheduler before shifting (None: the scheduler's own)."""
        return None

    def flow_solver(
        self, name: str, steps: int, scheduler_config: dict[str, Any], latent_shape: tuple[int, int, int] | None
    ):
        """The LatentODE of a released flow-matching folder (families with ``teacher_is_flow``) on its scheduler's
        shifted sigmas, as the family's pipeline sets them: ``time_grid = 1 - sigmas`` (ending at t = 1). With dynamic
        shifting the shift follows the image size: ``mu = m * image_seq_len + b`` from the scheduler config's
        ``base_image_seq_len``/``max_image_seq_len``/``base_shift``/``max_shift``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from instaflow_pl.solver import LatentODE

        if not self.teacher_is_flow:
            raise UserError(f"a {self.title} teacher is solved through its scheduler, not the LatentODE")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        kwargs: dict[str, Any] = {}
        if scheduler.config.use_dynamic_shifting:
            if latent_shape is None:
                raise ValueError("a teacher with dynamic shifting needs the latent shape to build its time grid")
            kwargs["mu"] = dynamic_shift_mu(scheduler_config, self.image_seq_len(latent_shape), self.default_max_shift)
        scheduler.set_timesteps(steps, sigmas=self.flow_sigmas(steps), **kwargs)
        return LatentODE(name, time_grid=[1.0 - float(s) for s in scheduler.sigmas])

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

    def card_stock_use(self, steps: int, info: Mapping[str, Any]) -> list[str]:
        """The model card's first way to sample an export in ``steps`` steps, without instaflow-pl (markdown lines
        whose python block loads ``DIR``): the shipped ``instaflow_pipeline.py`` through stock diffusers' custom
        pipelines, or, for a family that ships none, a line saying stock diffusers cannot sample it. ``info`` is as
        in :meth:`card_use`."""
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

    def card_use(self, steps: int, info: Mapping[str, Any]) -> list[str]:
        """The model card's "Use" section (markdown lines, without its heading) for an export of this family that
        samples in ``steps`` steps: the family's stock-diffusers way first, then instaflow-pl's, then how it steps.

        Args:
            steps: The export's sampling steps.
            info: The export's ``instaflow.json`` record (what :meth:`encoder_info` wrote among it) and
                ``image_size``, its native image height and width in pixels.
        """
        return [
            *self.card_stock_use(steps, info),
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

    # ---- the stock pipeline -----------------------------------------------------------------------------------

    def stock_sampling_args(
        self, latents: torch.Tensor, guidance_scale: float, info: Mapping[str, Any], pixels_per_latent: int
    ) -> dict[str, Any]:
        """Keyword arguments of the family's stock pipeline (:attr:`lora_pipeline`) that sample an export from noise
        ``latents`` (B, C, H, W) as ``InstaFlowPipeline`` does with classifier-free guidance ``guidance_scale``
        (``info``: the export's ``instaflow.json``); with ``output_type="latent"`` :meth:`stock_latents` reads the
        result."""
        return {"latents": latents, "guidance_scale": guidance_scale}

    def stock_latents(self, latents: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The stock pipeline's ``output_type="latent"`` result as (B, C, H, W) latents of (C, H, W) ``shape``."""
        return latents

    # ---- tiny fixtures --------------------------------------------------------------------------------------

    fixture: ClassVar[str]
    """Module of the family's tiny fixture (beside its file): ``build_tiny(out, seed, sample_size)`` writes a tiny
    folder with random weights (tests, the tiny configs, ``instaflow-pl tiny``)."""

    def build_tiny(self, out: Path, seed: int = 0, sample_size: int = 8) -> Path:
        """Write a tiny folder of this family with random weights (for tests and the tiny configs)."""
        return importlib.import_module(self.fixture).build_tiny(out, seed=seed, sample_size=sample_size)


MAX_SEQUENCE_LENGTH = 512
"""The most T5 tokens a prompt may have (``StableDiffusion3Pipeline`` and ``FluxPipeline`` refuse more)."""


def check_sequence_length(tokens: int, who: str) -> int:
    """``tokens`` as an int, or a one-line error when T5 cannot take that many (1 to 512, as diffusers' pipelines);
    ``who`` names the family in the message."""
    tokens = int(tokens)
    if not 1 <= tokens <= MAX_SEQUENCE_LENGTH:
        raise UserError(f"max_sequence_length must be between 1 and {MAX_SEQUENCE_LENGTH} for {who}, got {tokens}")
    return tokens


def dynamic_shift_mu(scheduler_config: dict[str, Any], image_seq_len: int, default_max_shift: float) -> float:
    """The shift exponent ``mu`` of resolution-dependent shifting: linear in the image's token count between
    (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``), as diffusers computes it."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len
