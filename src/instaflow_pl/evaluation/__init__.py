"""Evaluation as in the InstaFlow paper: FID and CLIP score on captions, NFE and speed (``instaflow-pl evaluate``)."""

from instaflow_pl.evaluation.captions import CaptionBatch, CaptionDataModule, load_captions
from instaflow_pl.evaluation.module import Evaluation, EvaluationWriter, ModelToEvaluate
from instaflow_pl.evaluation.reference import ReferenceImages
from instaflow_pl.evaluation.store import EvaluationSpec, EvaluationStore, RowSpec

__all__ = [
    "CaptionBatch",
    "CaptionDataModule",
    "Evaluation",
    "EvaluationSpec",
    "EvaluationStore",
    "EvaluationWriter",
    "ModelToEvaluate",
    "ReferenceImages",
    "RowSpec",
    "load_captions",
]
