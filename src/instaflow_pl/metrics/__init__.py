"""Metrics as torchmetrics ``Metric``s (sums reduced across ranks): straightness, FID, CLIP score."""

from instaflow_pl.metrics.clip_score import CLIPScore, load_clip
from instaflow_pl.metrics.fid import (
    FID,
    INCEPTION_WEIGHTS_FILE,
    FeatureNet,
    FIDReference,
    InceptionFeatures,
    RandomFeatures,
    inception_features,
    reference_key,
)
from instaflow_pl.metrics.fingerprint import module_fingerprint, tensor_fingerprint
from instaflow_pl.metrics.straightness import (
    StraightnessMetric,
    StraightnessProfile,
    straightness,
    straightness_gaps,
)

__all__ = [
    "CLIPScore",
    "FID",
    "FIDReference",
    "FeatureNet",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionFeatures",
    "RandomFeatures",
    "StraightnessMetric",
    "StraightnessProfile",
    "inception_features",
    "load_clip",
    "module_fingerprint",
    "reference_key",
    "straightness",
    "straightness_gaps",
    "tensor_fingerprint",
]
