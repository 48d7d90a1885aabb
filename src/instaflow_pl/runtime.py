"""How the project's own commands run: OpenMP's wait policy, torch's thread count, and quiet output.

Only the ``instaflow-pl`` entry point (:func:`instaflow_pl.cli.main`) uses these; importing the package changes
nothing for a library user.

* Threads. Idle OpenMP threads spin briefly, then sleep (``GOMP_SPINCOUNT``, set before torch is imported: libgomp
  reads it once, when it loads): a training step is thousands of small parallel regions, and threads that sleep at
  once pay a wake-up on each (the demo's step took 2.5x as long), while threads that spin forever take cores from
  any neighbour. The commands start with one torch thread per core this process may use, and
  :class:`~instaflow_pl.callbacks.threads.AdaptiveThreads` drops to one while other processes use the machine
  (``bench/busy_machine.py`` measures every candidate idle and busy; README "Threads"). The user's
  ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` and ``INSTAFLOW_THREADS`` / ``OMP_NUM_THREADS`` win (a chosen count is
  kept, not adapted).
* Quiet output. :func:`quiet` hides library lines a user cannot act on (Lightning's eval-mode and logging-interval
  warnings, its "Tip:" and TPU/HPU lines, the pytree deprecation, transformers' tokenizer length warning, W&B's
  deprecated-setting and git-root warnings and its metric summary), for the duration of a command only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

HIDDEN_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"Your `IterableDataset` has `__len__` defined",
    r"The '\w+_dataloader' does not have many workers",
    r"Couldn't infer the batch indices fetched from your dataloader",
    r"The given buffer is not writable, and PyTorch does not support non-writable tensors",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a",
)
"""Library warnings (message regexes) the project's commands do not show: nothing in them is for the user to do."""

HIDDEN_LOG_LINES = (
    "Tip:",
    "TPU available:",
    "HPU available:",
    "GPU available: False",
    "was configured so",
    "stopped: `max_steps=",
    "Token indices sequence length is longer than",
    "Trainer already configured with model summary callbacks",
    # Flux folders record their native latent size as `sample_size` (families/flux.py), a key diffusers' Flux
    # transformer does not take: "The config attributes {'sample_size': 8} were passed to FluxTransformer2DModel, ..."
    "were passed to FluxTransformer2DModel, but are not expected and will be ignored",
)
"""Library log records (substrings) the project's commands do not show. The project's own truncation warning says
when a prompt was cut."""

HIDDEN_WANDB_WARNINGS = ("The anonymous setting has no effect", "git root ")
"""W&B terminal warnings about settings Lightning passes, not the user."""

_QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "transformers.tokenization_utils_base",
    "transformers.tokenization_utils_tokenizers",
    "diffusers.configuration_utils",
)


SPIN_COUNT = "300000"
"""libgomp's ``GOMP_SPINCOUNT`` for the project's commands: how long an idle OpenMP thread spins before it sleeps
(``bench/busy_machine.py`` chose it; README "Threads")."""
_USER_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_USER_THREADS = ("INSTAFLOW_THREADS", "OMP_NUM_THREADS")


def configure_openmp() -> None:
    """Let idle OpenMP threads spin briefly, then sleep (``GOMP_SPINCOUNT``), unless the user chose a wait policy.

    Must run before torch is imported: libgomp reads the variables once, when it loads.
    """
    if not any(name in os.environ for name in _USER_WAIT):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def thread_count() -> int:
    """Torch threads for the project's commands: ``INSTAFLOW_THREADS`` or ``OMP_NUM_THREADS`` if set, else one per
    available core."""
    for name in ("INSTAFLOW_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return available_cores()


def threads_chosen() -> bool:
    """Whether the user set the thread count (``INSTAFLOW_THREADS`` or ``OMP_NUM_THREADS``)."""
    return any(os.environ.get(name, "").strip().isdigit() for name in _USER_THREADS)


def adapts_threads() -> bool:
    """Whether a command's threads follow the machine's load (:class:`~instaflow_pl.callbacks.threads.AdaptiveThreads`):
    when the user did not choose a count, on a machine with more than one core and load counters to read."""
    from instaflow_pl.callbacks.threads import CpuLoad

    return not threads_chosen() and available_cores() > 1 and CpuLoad.available()


_command_depth = 0


@contextlib.contextmanager
def command() -> Iterator[int]:
    """While the ``instaflow-pl`` command runs (nested commands, e.g. the demo's stages, count once): threads chosen
    for the machine (:func:`configure_threads`); code that imports the package keeps its own."""
    global _command_depth
    threads = configure_threads()
    _command_depth += 1
    try:
        yield threads
    finally:
        _command_depth -= 1


def command_running() -> bool:
    """Whether an ``instaflow-pl`` command is running in this process (then its threads follow the machine's load)."""
    return _command_depth > 0


def configure_threads() -> int:
    """Set torch's intra-op thread count for a command (see :func:`thread_count`); returns it."""
    import torch

    threads = thread_count()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_quiet_depth = 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide library output a user cannot act on while a command runs (restored afterwards)."""
    global _quiet_depth
    line_filter = _DropLines(HIDDEN_LOG_LINES)
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved_env = {name: os.environ.get(name) for name in ("WANDB_QUIET",)}
    os.environ.setdefault("WANDB_QUIET", "true")  # no per-run metric summary; the run folder is still printed
    with warnings.catch_warnings():
        for pattern in HIDDEN_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        for logger in loggers:
            logger.addFilter(line_filter)
        _quiet_depth += 1
        try:
            yield
        finally:
            _quiet_depth -= 1
            for logger in loggers:
                logger.removeFilter(line_filter)
            _restore_wandb()
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_wandb_termwarn = None


def quiet_wandb() -> None:
    """Inside :func:`quiet`: hide W&B's warnings about settings Lightning passes (called before a logger starts)."""
    global _wandb_termwarn
    if _quiet_depth == 0 or _wandb_termwarn is not None:
        return
    import wandb

    original = wandb.termwarn

    def termwarn(string: str, *args, **kwargs):
        if not any(str(string).startswith(fragment) for fragment in HIDDEN_WANDB_WARNINGS):
            return original(string, *args, **kwargs)
        return None

    _wandb_termwarn = original
    wandb.termwarn = termwarn


def _restore_wandb() -> None:
    global _wandb_termwarn
    if _wandb_termwarn is not None and _quiet_depth == 0:
        sys.modules["wandb"].termwarn = _wandb_termwarn
        _wandb_termwarn = None


def hidden(message: str) -> bool:
    """Whether :func:`quiet` hides a warning with this message (for tests)."""
    return any(re.search(pattern, message) for pattern in HIDDEN_WARNINGS)
