"""LightningModules: pair generation (reflow and distillation modules arrive with the modules issue)."""

from instaflow_pl.modules.pairs import GeneratedBatch, PairGenerator, PairWriter

__all__ = ["GeneratedBatch", "PairGenerator", "PairWriter"]
