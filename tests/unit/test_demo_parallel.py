"""The demo's scheduler: which stages run side by side, on how many threads, in which order, and what a failure does.

The stages are stand-ins (each writes its outputs) and their processes run at once in this process; the real
processes run in the slow demo test (tests/e2e/test_demo.py) and in ``make demo``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import instaflow_pl.demo.parallel as parallel
import instaflow_pl.demo.stages as stages
from instaflow_pl.demo.plan import STAGES, DemoPlan
from instaflow_pl.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_the_stages_that_can_run_side_by_side_follow_from_the_stage_graph():
    graph = {s.name: s for s in stages._stage_list()}
    side_by_side = [n for n in STAGES if parallel.concurrent(n, graph)]
    assert side_by_side == ["2rf", "pairs-2rf", "distill-2rf", "distill-1rf", "perflow", "dmd"]
    assert parallel.stage_threads("2rf", jobs=2, cores=2, graph=graph) == 1
    assert parallel.stage_threads("2rf", jobs=2, cores=16, graph=graph) == 8
    assert parallel.stage_threads("2rf", jobs=1, cores=2, graph=graph) is None  # --jobs 1: here, every core
    assert parallel.stage_threads("1rf", jobs=2, cores=2, graph=graph) is None
    after_pairs = ["2rf", "pairs-2rf", "distill-2rf", "distill-1rf", "perflow", "dmd", "report"]
    assert parallel.ready(after_pairs, {"setup", "1rf", "pairs-1rf"}, graph) == ["2rf", "perflow", "distill-1rf"]
    # the report waits for the optional stages still to run, not for those not asked for
    assert "report" not in parallel.ready(["perflow", "report"], set(STAGES) - {"perflow", "report"}, graph)
    assert parallel.ready(["report"], set(STAGES) - {"report", "perflow", "dmd"}, graph) == ["report"]


class Finished:
    """A stage process that has already ended with ``exitcode`` (its sentinel is a closed pipe: ready at once)."""

    def __init__(self, exitcode: int):
        self.exitcode = exitcode
        read, write = os.pipe()
        os.close(write)
        self.sentinel = read

    def join(self) -> None:
        pass

    def terminate(self) -> None:
        pass


@pytest.fixture
def fake_stages(monkeypatch, tmp_path):
    """The demo's stages with the real names and graph; each run appends its name to ``ran`` and writes outputs."""
    ran: list[tuple[str, int | None]] = []
    real = stages._stage_list()

    def fake(current):
        def outputs(plan):
            return [plan.path("out", current.name)]

        def run(plan):
            ran.append((current.name, None))
            outputs(plan)[0].parent.mkdir(parents=True, exist_ok=True)
            outputs(plan)[0].write_text("{}")

        return dataclasses.replace(current, run=run, outputs=outputs)

    monkeypatch.setattr(stages, "_stage_list", lambda: [fake(s) for s in real])
    monkeypatch.setattr(stages, "budgets", lambda plan, stage: [1])
    plan = DemoPlan(tmp_path / "demo", REPO / "configs" / "demo")
    return plan, ran


def test_side_by_side_stages_run_in_their_own_processes_long_stages_first(fake_stages, monkeypatch):
    plan, ran = fake_stages
    launched = []

    def launch(run, plan, name, threads, log):
        launched.append(name)
        stages.stage(name).run(plan)
        ran[-1] = (name, threads)
        return Finished(0)

    monkeypatch.setattr(parallel, "spawn", launch)
    monkeypatch.setattr("instaflow_pl.runtime.available_cores", lambda: 4)
    times = stages.run_stages(plan, jobs=2)
    assert list(times) == list(STAGES)  # in stage order, whatever order they finished in
    assert ran[:3] == [("setup", None), ("1rf", None), ("pairs-1rf", None)]  # in this process, every core
    # two at a time, each pair of launches in PRIORITY order among the ready stages
    assert launched == ["2rf", "perflow", "distill-1rf", "pairs-2rf", "dmd", "distill-2rf"]
    assert all(threads == 2 for name, threads in ran[3:-1])
    assert ran[-1] == ("report", None)
    assert stages.run_stages(plan, jobs=2) == {}  # all done: skipped


def test_a_failed_stage_is_named_with_its_log_and_nothing_new_starts(fake_stages, monkeypatch, capsys):
    plan, ran = fake_stages
    launched = []

    def launch(run, plan, name, threads, log):
        launched.append(name)
        if name == "2rf":
            log.write_text("step 1\rstep 2\nerror: the pairs are corrupt\n")
            return Finished(2)
        stages.stage(name).run(plan)
        return Finished(0)

    monkeypatch.setattr(parallel, "spawn", launch)
    with pytest.raises(UserError, match=r"demo stage 2rf failed \(exit 2\); its whole output is in .*logs/2rf.log"):
        stages.run_stages(plan, jobs=2)
    assert launched == ["2rf", "perflow"]  # the stage beside it finished; nothing started after the failure
    assert "error: the pairs are corrupt" in capsys.readouterr().out
    assert stages.finished(plan, "perflow") and not stages.finished(plan, "2rf")
    assert parallel.log_tail(plan.path("logs", "2rf.log")) == "step 2\nerror: the pairs are corrupt"


def test_progress_reads_the_last_count_a_bar_wrote(tmp_path):
    log = tmp_path / "x.log"
    assert parallel.progress(log) == ""
    log.write_text("train:  10%|#   | 600/6000 [00:10<01:30]\rtrain:  20%|##  | 1200/6000 [00:20<01:20]")
    assert parallel.progress(log) == "1200/6000"


def test_demo_jobs_must_be_positive(capsys):
    from instaflow_pl.demo import demo_main

    with pytest.raises(SystemExit):
        demo_main(["--jobs", "0"])
    assert "--jobs must be 1 or more" in capsys.readouterr().err
