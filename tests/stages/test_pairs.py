"""Pair generation under Trainer.predict: the dataset, its manifest, reruns, refusals, formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import pairs_args
from litdata import StreamingDataset

from instaflow_pl.cli import cli_main
from instaflow_pl.conventions import noise_from_seed
from instaflow_pl.data import TriplesDataModule
from instaflow_pl.data.store import decode_tensor
from instaflow_pl.errors import UserError
from instaflow_pl.teachers import load_teacher


def read_all(root: Path) -> dict[int, dict]:
    """Every stored record by index, tensors in their storage dtype."""
    dtype = json.loads((root / "manifest.json").read_text())["x1_dtype"]
    records = {}
    for item in StreamingDataset(str(root)):
        records[int(item["index"])] = {k: decode_tensor(v, dtype) if k in ("x0", "x1") else v for k, v in item.items()}
    return records


def generate(tiny_sd, prompts_file, out, *extra):
    cli_main(pairs_args(tiny_sd, prompts_file, out, *extra))


def test_generation_writes_shards_manifest_and_index(tiny_sd, prompts_file, tmp_path):
    out = tmp_path / "pairs"
    generate(tiny_sd, prompts_file, out, "--data.init_args.repeats=4")  # 20 samples, shards of 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["guidance"] == 6.0 and manifest["solver"] == "dpm++"
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["x1_dtype"] == "fp16"
    assert manifest["teacher_fingerprint"] == load_teacher(tiny_sd).fingerprint
    assert sorted(p.name for p in out.glob("shard-*.bin")) == ["shard-000000.bin", "shard-000001.bin"]
    records = read_all(out)
    assert sorted(records) == list(range(20))
    assert records[5]["seed"] == 5 and records[5]["prompt"] == "a red car in the city"  # repeats: 4 per prompt
    assert records[5]["x1"].dtype == torch.float16 and "x0" not in records[5]
    # Sample 5 regenerated alone (batch of one) from its seed equals what was stored.
    teacher = load_teacher(tiny_sd, solver="dpm++", steps=8)
    alone = teacher.sample(noise_from_seed(5, (4, 8, 8))[None], [records[5]["prompt"]], guidance=6.0).x[0]
    assert torch.allclose(alone.half().float(), records[5]["x1"].float(), rtol=1e-3, atol=1e-3)


def test_batch_size_does_not_change_the_data(tiny_sd, prompts_file, tmp_path):
    generate(tiny_sd, prompts_file, tmp_path / "b8", "--data.init_args.batch_size=8")
    generate(tiny_sd, prompts_file, tmp_path / "b3", "--data.init_args.batch_size=3")
    a, b = read_all(tmp_path / "b8"), read_all(tmp_path / "b3")
    assert a.keys() == b.keys()
    for i in a:
        assert a[i]["seed"] == b[i]["seed"] and a[i]["prompt"] == b[i]["prompt"]
        assert torch.allclose(a[i]["x1"].float(), b[i]["x1"].float(), rtol=1e-3, atol=1e-3)


def test_rerunning_a_finished_job_does_nothing(tiny_sd, prompts_file, tmp_path, caplog):
    out = tmp_path / "pairs"
    generate(tiny_sd, prompts_file, out)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO)
    generate(tiny_sd, prompts_file, out)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert before == after
    assert "is complete (20 samples); nothing to do" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ("--model.init_args.guidance=2.0", "guidance: 6.0 != 2.0"),
        ("--model.init_args.solver=ddim", "solver: 'dpm\\+\\+' != 'ddim'"),
        ("--model.init_args.latent_shape=[4,16,16]", "latent_shape"),
        ("--data.init_args.limit=3", "count: 20 != 12"),
    ],
)
def test_rerun_with_different_settings_refuses(tiny_sd, prompts_file, tmp_path, change, message):
    out = tmp_path / "pairs"
    generate(tiny_sd, prompts_file, out)
    with pytest.raises(UserError, match=f"already holds a different dataset .*{message}"):
        generate(tiny_sd, prompts_file, out, change)


def test_rerun_with_a_different_teacher_refuses(tiny_sd, tiny_velocity, prompts_file, tmp_path):
    out = tmp_path / "pairs"
    generate(tiny_sd, prompts_file, out)
    with pytest.raises(UserError, match="teacher_kind: 'released' != 'velocity'"):
        generate(tiny_velocity, prompts_file, out, "--model.init_args.solver=euler")


def test_output_folder_holding_something_else_refuses(tiny_sd, prompts_file, tmp_path):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no manifest.json"):
        generate(tiny_sd, prompts_file, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_unknown_solver_and_bad_shape_are_user_errors(tiny_sd, prompts_file, tmp_path):
    with pytest.raises(UserError, match="solver 'rk9' does not fit"):
        generate(tiny_sd, prompts_file, tmp_path / "a", "--model.init_args.solver=rk9")
    with pytest.raises(UserError, match="does not fit the teacher's network"):
        generate(tiny_sd, prompts_file, tmp_path / "b", "--model.init_args.latent_shape=[3,8,8]")


@pytest.mark.parametrize("x1_dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_x0_as_tensor_and_x1_dtypes(tiny_velocity, prompts_file, tmp_path, x1_dtype, torch_dtype):
    out = tmp_path / "pairs"
    generate(
        tiny_velocity,
        prompts_file,
        out,
        "--model.init_args.solver=heun",
        "--model.init_args.steps=2",
        "--model.init_args.x0_format=tensor",
        f"--model.init_args.x1_dtype={x1_dtype}",
    )
    records = read_all(out)
    assert records[3]["x1"].dtype == torch_dtype
    assert torch.equal(records[3]["x0"], noise_from_seed(3, (4, 8, 8)).to(torch_dtype))
    data = TriplesDataModule(str(out), batch_size=5, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch.x0[3], noise_from_seed(3, (4, 8, 8)).to(torch_dtype).float())
