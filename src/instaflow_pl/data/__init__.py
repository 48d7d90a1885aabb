"""Data: prompt sources, the triples format and its writer, and the DataModule that streams triples."""

from instaflow_pl.data.images import ImagePromptDataModule
from instaflow_pl.data.manifest import MANIFEST_FILE, Manifest
from instaflow_pl.data.prompts import load_prompts, prompts_digest
from instaflow_pl.data.store import INDEX_FILE, PairRecord, PairStore
from instaflow_pl.data.triples import TripleBatch, TriplesDataModule, collate_triples

__all__ = [
    "INDEX_FILE",
    "ImagePromptDataModule",
    "MANIFEST_FILE",
    "Manifest",
    "PairRecord",
    "PairStore",
    "TripleBatch",
    "TriplesDataModule",
    "collate_triples",
    "load_prompts",
    "prompts_digest",
]
