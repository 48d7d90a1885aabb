"""Setup under DDP: every rank ends on any rank's error, and work done once is done by rank 0 while the others wait.

Lightning runs the ``setup`` hooks of the datamodule, the callbacks and the module on every rank, and then a collective
(a barrier, the model's broadcast). A rank that raised there left the others waiting in that collective for good. Each
of the project's ``setup`` hooks is therefore wrapped by :func:`setup_on_every_rank`: after its body, the ranks tell one
another whether it failed, so one rank's :class:`UserError` ends every rank with the same one line (printed once,
by rank 0, with the failing rank named). Outside DDP (one process, or no trainer) nothing changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from instaflow_pl.errors import UserError

T = TypeVar("T")


class RankUserError(UserError):
    """Another rank's :class:`UserError`, raised on this rank too so every rank stops.

    Attributes:
        printed_by_rank_zero: True on ranks other than 0: rank 0 prints the line, the others exit without repeating it.
    """

    def __init__(self, message: str, printed_by_rank_zero: bool):
        super().__init__(message)
        self.printed_by_rank_zero = printed_by_rank_zero


def _group() -> tuple[int, int] | None:
    """(rank, world size) of the running process group, or None outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def raise_if_any_rank_failed(error: BaseException | None, what: str = "setup") -> None:
    """Collective: every rank calls it with its own outcome (None when it succeeded); raises on every rank if any
    rank failed, else returns. Also a barrier.

    On the failing rank its own exception is raised again (a :class:`UserError` with the rank named); the others raise
    :class:`RankUserError` with the same line, or a ``RuntimeError`` pointing at the failing rank's traceback.
    """
    group = _group()
    if group is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    rank, world = group
    mine = None if error is None else (isinstance(error, UserError), str(error), type(error).__name__)
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine)
    failed = [(r, outcome) for r, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    first, (user_error, message, kind) = failed[0]
    if user_error:
        if kind != RankUserError.__name__:  # a RankUserError already names its rank (a collective inside a setup)
            message = f"rank {first} of {world}: {message}"
        raise RankUserError(message, printed_by_rank_zero=rank != 0) from None
    if error is not None and not isinstance(error, UserError):
        raise error
    raise RuntimeError(f"rank {first} of {world} failed in {what} ({kind}: {message}); see its traceback") from None


def setup_on_every_rank(hook: Callable[..., T]) -> Callable[..., T]:
    """Wrap a ``setup`` hook so that under DDP every rank raises when any rank's ``setup`` raised."""

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        result, error = None, None
        try:
            result = hook(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            error = err
        raise_if_any_rank_failed(error, f"{type(args[0]).__name__}.setup")
        return result  # type: ignore[return-value]

    return wrapper


def rank_zero_first(compute: Callable[[], tuple[T, Any]], read: Callable[[Any], T], what: str) -> T:
    """Work done once: under DDP rank 0 runs ``compute`` while the other ranks wait, then they ``read`` what it left.

    ``compute`` returns the value and a small picklable token (e.g. the path of the cache file it wrote), which the
    other ranks receive and pass to ``read``. An error on any rank, in ``compute`` or ``read``, ends every rank.
    Outside DDP: ``compute``'s value.
    """
    group = _group()
    if group is None:
        return compute()[0]
    import torch.distributed as dist

    value, token, error = None, None, None
    if group[0] == 0:
        try:
            value, token = compute()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            error = err
    raise_if_any_rank_failed(error, what)
    shared = [token]
    dist.broadcast_object_list(shared, src=0)
    if group[0] != 0:
        try:
            value = read(shared[0])
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
            error = err
    raise_if_any_rank_failed(error, what)
    return value  # type: ignore[return-value]
