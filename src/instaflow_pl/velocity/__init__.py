"""The velocity contract ``v(x, t, cond) -> velocity``, velocities built on a family's network, the guidance wrapper."""

from instaflow_pl.velocity.condition import TextCondition
from instaflow_pl.velocity.guidance import ClassifierFreeGuidance
from instaflow_pl.velocity.network import NetworkPredictor, NetworkVelocity

__all__ = ["ClassifierFreeGuidance", "NetworkPredictor", "NetworkVelocity", "TextCondition"]
