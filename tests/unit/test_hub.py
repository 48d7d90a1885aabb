"""A missing path that looks like a hub id fails in under 2 s without a network (or with HF_HUB_OFFLINE), in one line.

"No network" is played by servers on 127.0.0.1: one that accepts connections and never answers (a black hole, the
slow case: huggingface_hub alone waited here for over two minutes) and a closed port. Nothing else is contacted.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import REPO

from instaflow_pl.cli import main
from instaflow_pl.errors import UserError
from instaflow_pl.metrics.clip_score import load_clip
from instaflow_pl.model_folder import resolve_model_folder

LIMIT_S = 2.0


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE off (the test session turns it on), so the hub is really asked."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def silent_hub(online, monkeypatch):
    """The hub's endpoint is a loopback socket that completes connections and never answers."""
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield


@pytest.fixture
def closed_hub(online, monkeypatch):
    """The hub's endpoint is a loopback port nobody listens on."""
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def timed_error(load, name: str) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        load(name)
    return str(error.value), time.monotonic() - start


@pytest.mark.parametrize("load", [resolve_model_folder, load_clip], ids=["model", "clip"])
@pytest.mark.parametrize(
    "hub, says",
    [
        ("offline", "HF_HUB_OFFLINE is set"),
        ("silent_hub", "did not answer within 1.5 s (no network?)"),
        ("closed_hub", "cannot be reached (ConnectionRefusedError"),
    ],
)
def test_a_hub_id_without_a_network_fails_fast(request, load, hub, says):
    if hub != "offline":
        request.getfixturevalue(hub)
    message, seconds = timed_error(load, "someone/missing-model")
    print(f"{load.__name__} {hub}: {seconds:.2f} s: {message}")
    assert seconds < LIMIT_S, f"{seconds:.2f} s"
    assert "'someone/missing-model' is not a local folder" in message and says in message, message
    assert "\n" not in message and "give the path of a downloaded copy" in message


def test_a_cached_hub_model_loads_without_a_network(silent_hub, tmp_path, monkeypatch):
    """A model already in the hub cache is used as it is, network or not."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--cached-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--someone--cached-model" / "refs").mkdir()
    (cache / "models--someone--cached-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    start = time.monotonic()
    assert resolve_model_folder("someone/cached-model") == snapshot
    assert time.monotonic() - start < LIMIT_S


def test_the_command_says_it_in_one_line(tmp_path, capsys, request):
    """Through ``instaflow-pl fit``: first with HF_HUB_OFFLINE (no probe; it also warms the imports), then against the
    silent hub; the hub costs the second run under 2 s more than the first."""
    args = [
        "fit",
        "--config",
        str(REPO / "configs/tiny/sd/reflow.yaml"),
        "--model.init_args.base_model=someone/missing-model",
        f"--data.init_args.path={tmp_path}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]

    def run() -> tuple[str, float]:
        start = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            main(args)
        seconds = time.monotonic() - start
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and err[-1].startswith("instaflow-pl: error: model 'someone/missing-model'"), err
        return err[-1], seconds

    line, offline = run()
    assert "HF_HUB_OFFLINE is set" in line
    request.getfixturevalue("silent_hub")
    line, silent = run()
    assert "did not answer within 1.5 s" in line
    print(f"instaflow-pl fit, hub id: {offline:.2f} s with HF_HUB_OFFLINE, {silent:.2f} s against a silent hub")
    assert silent - offline < LIMIT_S, f"{silent:.2f} s against a silent hub, {offline:.2f} s offline"


def test_local_looking_paths_never_reach_the_hub(silent_hub, tmp_path):
    for name in ["./someone/missing-model", str(Path("~") / "missing"), str(tmp_path / "missing")]:
        message, seconds = timed_error(resolve_model_folder, name)
        assert "model folder not found" in message and seconds < 0.5, (name, message)
