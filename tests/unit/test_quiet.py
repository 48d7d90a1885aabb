"""Quiet, readable runs: the command listing, hidden library noise, the step progress bar, threads."""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import time
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from instaflow_pl import runtime
from instaflow_pl.callbacks.progress import StepProgressBar
from instaflow_pl.callbacks.threads import AdaptiveThreads, CpuLoad, threads_for
from instaflow_pl.cli import COMMANDS, main


def test_help_lists_every_command_with_a_description(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    names = ("fit", "validate", "test", "predict", "pairs", "export", "sample", "tiny", "demo", "sweep", "evaluate")
    for name in names:
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None and len(line.split()) > 3, name
    assert "FID, CLIP score, speed" in COMMANDS["evaluate"]


def test_quiet_hides_library_noise_only_while_a_command_runs(caplog):
    noise = "Found 463 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with runtime.quiet():
            warnings.warn(noise, UserWarning, stacklevel=1)
            warnings.warn("prompt_dropout must be in [0, 1]", UserWarning, stacklevel=1)  # the project's own: kept
            log.info(tip)
            log.info("Seed set to 0")
        warnings.warn(noise, UserWarning, stacklevel=1)  # outside a command: a library user sees it
        log.info(tip)
    assert [str(w.message)[:20] for w in caught] == ["prompt_dropout must ", noise[:20]]
    assert [r.getMessage() for r in caplog.records] == ["Seed set to 0", tip]


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_bounded_fit_shows_steps_out_of_max_steps(tmp_path):
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=7, max_epochs=-1, callbacks=[bar], logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2))  # 3 batches an epoch, 3 epochs
    shown = str(bar.train_progress_bar)
    assert bar.train_progress_bar.total == 7 and bar.train_progress_bar.n == 7, shown
    assert shown.startswith("train") and "7/7" in shown and "it/s" in shown and "Epoch" not in shown


def test_thread_count_is_one_per_core_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("INSTAFLOW_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.thread_count() == runtime.available_cores() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.thread_count() == 3
    monkeypatch.setenv("INSTAFLOW_THREADS", "1")
    assert runtime.thread_count() == 1


@pytest.mark.parametrize("chosen", [None, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_openmp_threads_spin_briefly_then_sleep_unless_the_user_chose(monkeypatch, chosen):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (chosen or {}).items():
        monkeypatch.setenv(name, value)
    runtime.configure_openmp()
    if chosen is None:
        assert os.environ["GOMP_SPINCOUNT"] == runtime.SPIN_COUNT and "OMP_WAIT_POLICY" not in os.environ
    else:
        assert {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} == {
            "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, **chosen
        }  # fmt: skip


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_cpu_load_counts_other_processes_and_not_this_one(monkeypatch):
    load = CpuLoad()
    # (wall seconds, busy CPU seconds of the process's cores, CPU seconds of this process)
    samples = iter([(11.0, 21.0, 5.5), (12.0, 22.4, 6.5)])
    monkeypatch.setattr(load, "_sample", lambda: next(samples))
    load._last = (10.0, 20.0, 5.0)
    assert load.others() == pytest.approx(0.5)  # 1.0 core busy in 1 s, of which 0.5 this process's own
    assert load.others() == pytest.approx(0.4)  # 1.4 busy, 1.0 own
    assert load._last == (12.0, 22.4, 6.5)


def test_cpu_load_sees_at_least_what_a_child_process_burned():
    """On the real counters: whatever else runs on a shared (CI) machine only adds to what is seen, so the measure is
    bounded below by a child's own CPU time over the window (less one clock tick per core for rounding)."""
    start, child_cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    load = CpuLoad()
    busy = multiprocessing.get_context("fork").Process(target=_burn, args=(0.6,))
    busy.start()
    busy.join()
    seen = load.others()
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    burned = (after.ru_utime + after.ru_stime) - (child_cpu.ru_utime + child_cpu.ru_stime)
    ticks = 2 * len(load.cpus) / os.sysconf("SC_CLK_TCK")
    assert burned > 0.3 and seen * wall >= burned - ticks, (seen, wall, burned)


def test_adaptive_threads_drop_to_one_on_a_shared_machine_and_come_back(monkeypatch):
    before = torch.get_num_threads()
    callback = AdaptiveThreads(cores=2, interval=0.0)
    callback.setup(None, None, "fit")
    loads = iter([1.2, 1.1, 0.1, 0.9, 0.1, 0.1])
    monkeypatch.setattr(callback.load, "others", lambda: next(loads))
    torch.set_num_threads(2)
    try:
        seen = []
        for _ in range(6):
            callback.on_train_batch_start()
            seen.append(torch.get_num_threads())
        # busy from the start: one at once; back to two only after two idle checks in a row (a burst does not flip it)
        assert seen == [1, 1, 1, 1, 1, 2] and callback.switches == 2
        callback.on_fit_end()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_take_the_cores_other_processes_leave_free():
    assert [threads_for(2, others) for others in (0.0, 0.4, 0.5, 1.0, 1.9, 3.0)] == [2, 2, 1, 1, 1, 1]
    assert [threads_for(16, others) for others in (0.3, 1.0, 2.5, 15.5)] == [16, 15, 13, 1]


def test_only_the_commands_adapt_threads_and_only_when_the_user_did_not_choose(monkeypatch):
    monkeypatch.delenv("INSTAFLOW_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    assert runtime.adapts_threads()
    monkeypatch.setenv("INSTAFLOW_THREADS", "2")
    assert not runtime.adapts_threads()


def test_a_fit_prints_parameters_per_part_and_no_flops(tiny_sd, tmp_path, caplog):
    from conftest import REPO, write_dataset

    data = write_dataset(tmp_path / "pairs", count=16)
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
              f"--data.init_args.path={data}", f"--trainer.default_root_dir={tmp_path / 'run'}",
              "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--model.init_args.tf32=true"])  # fmt: skip
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "velocity" in text and "trainable 792 K, frozen 41.9 K, total 834 K" in text, text
    assert "FLOPs" not in text and "Flops" not in text and "Skipping setting a default" not in text
    assert text.count("tf32: true has no effect on cpu") == 1
