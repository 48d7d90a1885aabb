"""Metrics: straightness of a flow (FID, CLIP score and callbacks arrive with the metrics issue)."""

from instaflow_pl.metrics.straightness import straightness

__all__ = ["straightness"]
