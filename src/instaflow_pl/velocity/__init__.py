"""The velocity contract ``v(x, t, cond) -> velocity``, UNet-based models and the guidance wrapper."""

from instaflow_pl.velocity.condition import TextCondition
from instaflow_pl.velocity.guidance import ClassifierFreeGuidance
from instaflow_pl.velocity.unet import PretrainedUNetVelocity, UNetPredictor, UNetVelocity

__all__ = ["ClassifierFreeGuidance", "PretrainedUNetVelocity", "TextCondition", "UNetPredictor", "UNetVelocity"]
