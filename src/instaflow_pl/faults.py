"""Fault injection for the crash-safety tests (a no-op unless the environment asks for a fault).

``INSTAFLOW_PL_CRASH_AT=point:n`` makes the process SIGKILL itself when it reaches ``point`` with number ``n`` (a shard
of pair generation, a training step); ``point:n:oserror`` raises the ``OSError`` a full disk gives (ENOSPC) there
instead. Points: ``chunk_written``, ``shard_moved``, ``committed``, ``before_index`` (``data/store.py``),
``fit_step`` (before training step ``n`` runs, ``modules/base.py``) and ``eval_shard`` / ``eval_committed`` (before /
after evaluation shard ``n`` is committed, counted over all rows: ``evaluation/store.py``).
"""

from __future__ import annotations

import errno
import os
import signal

CRASH_ENV = "INSTAFLOW_PL_CRASH_AT"


def crashpoint(point: str, n: int) -> None:
    """Kill this process (or raise ENOSPC) here if ``INSTAFLOW_PL_CRASH_AT`` names ``point:n``."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    if wanted == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"{point}:{n}:oserror":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
