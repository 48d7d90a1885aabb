"""Sharded, resumable ``Trainer.predict`` runs: the machine under pair generation and evaluation.

- ``store.py``: the output folder, opened against the record of its settings or refused (``ShardedFolder``);
- ``work.py``: shard arithmetic, the round-robin split over ranks, micro-batches over units (``WorkBatches``);
- ``writer.py``: the prediction writer that commits whole units (``ShardWriter``);
- ``module.py``: the LightningModule base that ties them together (``ShardedPredict``).
"""

from instaflow_pl.predict.module import ShardedPredict
from instaflow_pl.predict.store import ShardedFolder
from instaflow_pl.predict.work import WorkBatches, WorkUnit, round_robin, shard_count, shard_range
from instaflow_pl.predict.writer import ShardWriter

__all__ = [
    "ShardWriter",
    "ShardedFolder",
    "ShardedPredict",
    "WorkBatches",
    "WorkUnit",
    "round_robin",
    "shard_count",
    "shard_range",
]
