"""LightningModules: pair generation, reflow and distillation."""

from instaflow_pl.modules.base import FlowModule, StepOutput
from instaflow_pl.modules.distill import DistillModule
from instaflow_pl.modules.dmd import DMDModule
from instaflow_pl.modules.pairs import GeneratedBatch, PairGenerator, PairWriter
from instaflow_pl.modules.reflow import ReflowModule

__all__ = [
    "DMDModule",
    "DistillModule",
    "FlowModule",
    "GeneratedBatch",
    "PairGenerator",
    "PairWriter",
    "ReflowModule",
    "StepOutput",
]
