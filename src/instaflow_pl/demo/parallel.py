"""The demo's independent stages side by side, each in its own process on its share of the cores.

After ``pairs-1rf`` the demo's stages form independent branches: the 2-RF and what it feeds (its pairs, its students,
DMD), the 1-RF's direct distillation, piecewise reflow. A training step of the digits MLP gains little from a second
thread (1 thread about 1.35x the time of 2 here), so two stages on one thread each finish well before the same two
one after the other on two threads.

A stage's thread count follows from the stage graph and ``jobs`` alone, never from what happens to run beside it: a
stage that can run beside another (:func:`concurrent`) always gets ``cores // jobs`` threads in a process of its own,
the others (setup, 1rf, pairs-1rf, report) run in this process on every core. A thread count changes a step's
rounding (about 2e-7 after 50 steps), so this keeps every stage's numbers independent of the schedule and of the
machine's speed; ``--jobs 1`` runs every stage in this process on every core, as the notebook does.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from instaflow_pl.demo.plan import STAGES, DemoPlan
from instaflow_pl.errors import UserError

PRIORITY = ("2rf", "perflow", "distill-1rf", "pairs-2rf", "dmd", "distill-2rf")
"""Which ready stage starts first when a process is free: the long stages that only need the 1-RF's pairs first (the
2-RF opens the longest chain), then the short pairs-2rf and the 2-RF's students. With the stage times measured at
one thread (2rf 273 s, perflow 429, pairs-2rf 56, distill-2rf 279, dmd 271, distill-1rf 272 on 2026-12-03), a
simulation of this scheduler has the two processes end 824 s after they start, against 880 s for the 2-RF's chain
first (the measured figure of that run); the best any order can do is 790."""

STATUS_SECONDS = 60.0
"""How often the running stages' progress is printed."""


class Node(Protocol):
    """What the scheduler reads of a stage (:class:`~instaflow_pl.demo.stages.Stage`)."""

    upstream: tuple[str, ...]
    optional: tuple[str, ...]


Graph = Mapping[str, Node]
"""The stages by name."""


def ancestors(name: str, graph: Graph) -> set[str]:
    """Stages whose outputs ``name`` reads, directly or not (optional inputs included)."""
    found: set[str] = set()
    todo = [name]
    while todo:
        current = graph[todo.pop()]
        for upstream in current.upstream + current.optional:
            if upstream not in found:
                found.add(upstream)
                todo.append(upstream)
    return found


def concurrent(name: str, graph: Graph) -> bool:
    """Whether some stage can run beside ``name``: one that is neither upstream nor downstream of it."""
    mine = ancestors(name, graph)
    return any(other != name and other not in mine and name not in ancestors(other, graph) for other in graph)


def stage_threads(name: str, jobs: int, cores: int, graph: Graph) -> int | None:
    """Threads of a stage's own process, or None when it runs in this process on every core."""
    if jobs <= 1 or not concurrent(name, graph):
        return None
    return max(1, cores // jobs)


def ready(pending: list[str], done: set[str], graph: Graph) -> list[str]:
    """Pending stages whose upstream stages are done, the first to start first."""
    names = [n for n in pending if set(graph[n].upstream) | (set(graph[n].optional) & set(pending)) <= done]
    return sorted(names, key=lambda n: (PRIORITY.index(n) if n in PRIORITY else -1, STAGES.index(n)))


def progress(log: Path) -> str:
    """The last ``done/total`` count a progress bar wrote to a stage's log ('' when none yet)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    counts = re.findall(r"(\d+)/(\d+) \[", tail)
    return f"{counts[-1][0]}/{counts[-1][1]}" if counts else ""


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log, each progress bar's redraws folded into its last state."""
    text = log.read_bytes().decode(errors="replace") if log.is_file() else ""  # not read_text: it turns \r into \n
    rows = [row.split("\r")[-1] for row in text.split("\n")]
    return "\n".join([row for row in rows if row.strip()][-lines:])


Runner = Callable[[DemoPlan, str], None]
"""Runs a stage by name (a module-level function, so a spawned process can be handed it)."""


def run_in_child(run: Runner, plan: DemoPlan, name: str, threads: int, log: Path) -> None:
    """A stage in a spawned process on ``threads`` threads, its output appended to ``log`` (exit 2 on a
    :class:`~instaflow_pl.errors.UserError`, whose line ends the log)."""
    os.environ["INSTAFLOW_THREADS"] = str(threads)  # read when the stage's command starts: fixed, not adapted
    from instaflow_pl.runtime import configure_openmp

    configure_openmp()  # before torch loads in this process
    sys.stdout.flush()
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    try:
        run(plan, name)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


@dataclass
class Running:
    """A stage running in its own process."""

    name: str
    process: object
    log: Path
    start: float = field(default_factory=time.perf_counter)


Launch = Callable[[Runner, DemoPlan, str, int, Path], object]
"""Starts a stage's process (``multiprocessing.Process``-like: ``sentinel``, ``exitcode``, ``join``)."""


def spawn(run: Runner, plan: DemoPlan, name: str, threads: int, log: Path) -> object:
    """Start :func:`run_in_child` in a fresh interpreter (``spawn``: torch's threads do not survive a fork)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=run_in_child, args=(run, plan, name, threads, log), name=f"demo-{name}"
    )
    process.start()
    return process


def wait_any(running: list[Running], timeout: float) -> None:
    """Return when a running stage's process ends, or after ``timeout`` seconds."""
    from multiprocessing.connection import wait

    wait([r.process.sentinel for r in running], timeout=timeout)


def run_scheduled(
    plan: DemoPlan,
    pending: list[str],
    jobs: int,
    graph: Graph,
    run: Runner,
    skip: Callable[[str], bool],
    begin: Callable[[str], None],
    end: Callable[[str, float], None],
    launch: Launch | None = None,
    cores: int | None = None,
) -> None:
    """Run the ``pending`` stages, up to ``jobs`` of the concurrent ones at a time in their own processes.

    Args:
        plan: The demo's plan (handed to each stage's process).
        pending: Stages to run unless ``skip`` says they are done; every other stage is done.
        jobs: Stages at most side by side.
        graph: Every stage by name (its upstream and optional stages).
        run: Runs a stage, here or in its process.
        skip: Whether a stage whose upstream stages are done is done already (asked once, as it becomes ready).
        begin: Called as a stage starts (prints its header, records it as started).
        end: Called with its wall seconds when it has finished (checks its outputs, records it as done).
        launch: Starts a stage's process (default :func:`spawn`).
        cores: Cores to share (default: those this process may use).

    Raises:
        UserError: a stage failed; the stages running beside it are finished first and nothing new is started.
    """
    from instaflow_pl.runtime import available_cores

    cores, launch = cores or available_cores(), launch or spawn
    pending, running, failed = list(pending), [], []
    done = {n for n in graph if n not in pending}
    next_status = time.perf_counter() + STATUS_SECONDS
    try:
        while pending or running:
            here = None
            for name in [] if failed else ready(pending, done, graph):
                threads = stage_threads(name, jobs, cores, graph)
                if skip(name):
                    pending.remove(name)
                    done.add(name)
                    here = ""  # look again: stages after it may be ready now
                    break
                if threads is None:
                    if not running:  # it needs what runs beside it, or the machine to itself
                        here = name
                        break
                elif len(running) < jobs:
                    pending.remove(name)
                    log = plan.path("logs", f"{name}.log")
                    log.parent.mkdir(parents=True, exist_ok=True)
                    begin(name)
                    print(f"   in its own process on {threads} thread(s); its output: {log}", flush=True)
                    running.append(Running(name, launch(run, plan, name, threads, log), log))
            if here == "":
                continue
            if here is not None:
                pending.remove(here)
                begin(here)
                start = time.perf_counter()
                run(plan, here)
                end(here, time.perf_counter() - start)
                done.add(here)
                continue
            if not running:
                break  # a stage failed: nothing new starts
            wait_any(running, max(0.0, next_status - time.perf_counter()))
            for item in [r for r in running if r.process.exitcode is not None]:
                running.remove(item)
                item.process.join()
                if item.process.exitcode == 0:
                    end(item.name, time.perf_counter() - item.start)
                    done.add(item.name)
                else:
                    failed.append(item)
                    print(f"\n{item.name} failed; the last lines of {item.log}:\n{log_tail(item.log)}", flush=True)
            if running and time.perf_counter() >= next_status:
                next_status = time.perf_counter() + STATUS_SECONDS
                states = ", ".join(f"{r.name} {progress(r.log) or 'starting'}" for r in running)
                print(f"   running: {states}", flush=True)
    finally:
        for item in running:  # interrupted: stop the stages beside it (they resume from their last checkpoint)
            item.process.terminate()
            item.process.join()
    if failed:
        first = failed[0]
        raise UserError(
            f"demo stage {first.name} failed (exit {first.process.exitcode}); its whole output is in {first.log}; "
            f"fix the cause and rerun: finished stages are kept"
        )
