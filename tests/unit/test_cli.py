"""The instaflow-pl command as users run it: help, the tiny builder, one-line errors without tracebacks."""

from __future__ import annotations

import pytest
from conftest import REPO, pairs_args, run_cli

pytestmark = pytest.mark.slow  # each case starts fresh processes (~6 s of imports each)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


def test_pairs_help_explains_the_options():
    result = run_cli(["pairs", "--config", str(REPO / "configs/tiny/sd/pairs.yaml"), "--model.help", "PairGenerator"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Diffusers-format folder" in result.stdout and "shard_size" in result.stdout


def test_tiny_command_builds_once(tmp_path):
    out = tmp_path / "sd"
    first = run_cli(["tiny", str(out)])
    assert first.returncode == 0 and (out / "model_index.json").is_file()
    second = run_cli(["tiny", str(out)])
    assert second.returncode == 0 and "already holds a model" in second.stdout


def test_errors_are_one_line(tiny_sd, prompts_file, tmp_path):
    missing = run_cli(pairs_args(tmp_path / "no-such-model", prompts_file, tmp_path / "a"))
    assert_one_line_error(missing, "instaflow-pl: error: model folder not found", "no-such-model")

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_prompts = run_cli(pairs_args(tiny_sd, empty, tmp_path / "b"))
    assert_one_line_error(no_prompts, "holds no prompts", "empty.txt")

    blocker = tmp_path / "a-file"  # an output folder below a file cannot be created, even by root
    blocker.write_text("keep me")
    unwritable = run_cli(pairs_args(tiny_sd, prompts_file, blocker / "out"))
    assert_one_line_error(unwritable, "cannot write to output folder", "a-file/out")
    assert blocker.read_text() == "keep me"


def test_config_mistakes_are_reported_by_the_parser(tiny_sd, prompts_file, tmp_path):
    unknown = run_cli(pairs_args(tiny_sd, prompts_file, tmp_path / "a", "--model.init_args.guidnace=3"))
    assert unknown.returncode == 2 and "guidnace" in unknown.stderr and "Traceback" not in unknown.stderr
    wrong_type = run_cli(pairs_args(tiny_sd, prompts_file, tmp_path / "b", "--model.init_args.steps=many"))
    assert wrong_type.returncode == 2 and "steps" in wrong_type.stderr and "Traceback" not in wrong_type.stderr
