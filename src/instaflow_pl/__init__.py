"""instaflow-pl: open PyTorch Lightning training code for InstaFlow one-step text-to-image generators.

The public API is importable from here (``from instaflow_pl import ReflowModule, LatentODE``); each name is imported
on first use (PEP 562), so ``import instaflow_pl`` loads neither torch nor Lightning.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat the name as True)

_EXPORTS: dict[str, str] = {
    # solver
    "LatentODE": "instaflow_pl.solver",
    "ODESolution": "instaflow_pl.solver",
    "SchedulerODE": "instaflow_pl.solver",
    # velocity, guidance, text
    "ClassifierFreeGuidance": "instaflow_pl.velocity",
    "TextCondition": "instaflow_pl.velocity",
    "NetworkVelocity": "instaflow_pl.velocity",
    "PretrainedVelocity": "instaflow_pl.velocity.pretrained",
    "PromptEncoder": "instaflow_pl.text",
    # teachers
    "Teacher": "instaflow_pl.teachers",
    "load_teacher": "instaflow_pl.teachers",
    "ModelFolder": "instaflow_pl.model_folder",
    # data
    "TriplesDataModule": "instaflow_pl.data",
    "TripleBatch": "instaflow_pl.data",
    "PairStore": "instaflow_pl.data",
    "ImagePromptDataModule": "instaflow_pl.data",
    "load_prompts": "instaflow_pl.data",
    # modules
    "FlowModule": "instaflow_pl.modules",
    "ReflowModule": "instaflow_pl.modules",
    "DistillModule": "instaflow_pl.modules",
    "PairGenerator": "instaflow_pl.modules",
    "PairWriter": "instaflow_pl.modules",
    # metrics and callbacks
    "FID": "instaflow_pl.metrics",
    "CLIPScore": "instaflow_pl.metrics",
    "StraightnessMetric": "instaflow_pl.metrics",
    "straightness": "instaflow_pl.metrics",
    "SampleGrid": "instaflow_pl.callbacks",
    "SampleQuality": "instaflow_pl.callbacks",
    "Trajectories": "instaflow_pl.callbacks",
    "LossByT": "instaflow_pl.callbacks",
    "CheckpointAtSteps": "instaflow_pl.callbacks",
    # export and sampling
    "InstaFlowPipeline": "instaflow_pl.pipeline",
    "export_checkpoint": "instaflow_pl.export",
    # conventions and errors
    "noise_for_indices": "instaflow_pl.conventions",
    "UserError": "instaflow_pl.errors",
}
"""Public name -> the module that defines it."""

_RENAMED = {"UNetVelocity": "NetworkVelocity", "PretrainedUNetVelocity": "PretrainedVelocity"}
"""Earlier public names -> today's (they wrap any family's network, not only a UNet); the old names still import."""

__all__ = [
    "CLIPScore",
    "CheckpointAtSteps",
    "ClassifierFreeGuidance",
    "DistillModule",
    "FID",
    "FlowModule",
    "ImagePromptDataModule",
    "InstaFlowPipeline",
    "LatentODE",
    "LossByT",
    "ModelFolder",
    "NetworkVelocity",
    "ODESolution",
    "PairGenerator",
    "PairStore",
    "PairWriter",
    "PretrainedVelocity",
    "PromptEncoder",
    "ReflowModule",
    "SampleGrid",
    "SampleQuality",
    "SchedulerODE",
    "StraightnessMetric",
    "Teacher",
    "TextCondition",
    "Trajectories",
    "TripleBatch",
    "TriplesDataModule",
    "UserError",
    "export_checkpoint",
    "load_prompts",
    "load_teacher",
    "noise_for_indices",
    "straightness",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from instaflow_pl.callbacks import CheckpointAtSteps, LossByT, SampleGrid, SampleQuality, Trajectories
    from instaflow_pl.conventions import noise_for_indices
    from instaflow_pl.data import ImagePromptDataModule, PairStore, TripleBatch, TriplesDataModule, load_prompts
    from instaflow_pl.errors import UserError
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.metrics import FID, CLIPScore, StraightnessMetric, straightness
    from instaflow_pl.model_folder import ModelFolder
    from instaflow_pl.modules import DistillModule, FlowModule, PairGenerator, PairWriter, ReflowModule
    from instaflow_pl.pipeline import InstaFlowPipeline
    from instaflow_pl.solver import LatentODE, ODESolution, SchedulerODE
    from instaflow_pl.teachers import Teacher, load_teacher
    from instaflow_pl.text import PromptEncoder
    from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkVelocity, TextCondition
    from instaflow_pl.velocity.pretrained import PretrainedVelocity


def __getattr__(name: str) -> object:
    """Import a public name on first use and keep it (PEP 562)."""
    current = _RENAMED.get(name, name)
    module = _EXPORTS.get(current)
    if module is None:
        raise AttributeError(f"module 'instaflow_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), current)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
