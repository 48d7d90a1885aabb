"""Benchmarks of instaflow-pl: each reports ratios against a baseline run in the same process (`make bench`).

Importing the package sets an offline, quiet environment (no network, no W&B server, no progress bars) before
torch, Lightning or diffusers are imported anywhere, so every entry point (``bench/run.py``, ``python -m
bench.pairs``, the memory benchmark's child processes) runs under the same settings.
"""

from bench.common import quiet_offline_env

quiet_offline_env()
