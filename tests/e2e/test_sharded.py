"""Sharded training (``--trainer.strategy=sharded``: FSDP2 through Lightning) on two CPU ranks over gloo.

* Equivalence: the sharded fit logs the same per-step losses and validation metrics as the DDP fit of the same
  config (float tolerance: the gradient is reduce-scattered rather than all-reduced, and clipped by a global norm
  summed shard by shard), gradient clipping active; the two exports match to 1e-5.
* Resume: a sharded fit SIGKILLed mid-epoch and resumed from its last (distributed) checkpoint logs what the
  uninterrupted sharded fit logs, to the last bit, and ends with equal weights and EMA.
* Bad input: what does not compose with sharding is one line before any rank starts.
"""

from __future__ import annotations

import csv
import signal
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_dataset
from helpers import run_process_group

from instaflow_pl.cli import cli_main
from instaflow_pl.errors import UserError
from instaflow_pl.faults import CRASH_ENV

TOLERANCE = 1e-5
"""Sharded against DDP: relative tolerance of each logged number (measured differences are ~1e-7)."""


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def sharded_config(tmp_path: Path, family: str = "sd", every: int = 3, stage: str = "reflow") -> Path:
    """configs/tiny/FAMILY/STAGE.yaml without the callbacks that sample on rank zero alone (a sharded model samples
    on every rank), checkpointing every ``every`` steps, clipping gradients (so the clipping is compared too)."""
    config = yaml.safe_load((REPO / f"configs/tiny/{family}/{stage}.yaml").read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    trainer["callbacks"][0]["init_args"].update(every_n_train_steps=every, save_top_k=-1)
    trainer["gradient_clip_val"] = 0.05
    path = tmp_path / f"{stage}-{family}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def latent_shape(base: Path) -> tuple[int, int, int]:
    from instaflow_pl.model_folder import ModelFolder

    folder = ModelFolder.open(base)
    return folder.family.latent_geometry(folder.network_config).shape


def fit(config: Path, base: Path, data: Path, root: Path, strategy: str, steps: int, *extra: str, env=None):
    args = [
        "fit", "--config", str(config), f"--model.init_args.base_model={base}", f"--data.init_args.path={data}",
        "--data.init_args.batch_size=4", "--model.init_args.val_steps=[1,2]", f"--trainer.default_root_dir={root}",
        f"--trainer.strategy={strategy}", "--trainer.devices=2", f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", *extra,
    ]  # fmt: skip
    return run_process_group(args, env={"MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1", **(env or {})}, timeout=400)


def logged(root: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value of every train/loss and val/* number under ``root`` (later versions winning)."""
    out = {}
    for path in sorted(root.rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if value and (key == "train/loss" or key.startswith("val/")):
                    out[(int(row["step"]), key)] = float(value)
    return out


def exported_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):  # the network's, and the base model's parts
        out |= {f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()}
    return out


def export(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from instaflow_pl.export import export_checkpoint

    export_checkpoint(checkpoint, out)
    return exported_weights(out)


def compare_with_ddp(tmp_path: Path, base: Path, family: str, stage: str = "reflow", *extra: str) -> None:
    data = write_dataset(tmp_path / "pairs", count=40, shard_size=8, shape=latent_shape(base), family=family)
    config = sharded_config(tmp_path, family, stage=stage)
    runs = {}
    for strategy in ("ddp", "sharded"):
        result = fit(config, base, data, tmp_path / strategy, strategy, 6, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[strategy] = logged(tmp_path / strategy)
    ddp, sharded = runs["ddp"], runs["sharded"]
    assert ddp.keys() == sharded.keys()
    assert len([k for k in ddp if k[1] == "train/loss"]) == 6 and any(k[1].startswith("val/") for k in ddp)
    largest = max(abs(ddp[k] - sharded[k]) / max(abs(ddp[k]), 1e-8) for k in ddp)
    print(f"{family}: largest relative difference of a logged number, sharded vs DDP: {largest:.2e}")
    assert largest < TOLERANCE

    checkpoint = tmp_path / "sharded" / "checkpoints" / "last.ckpt"
    assert (checkpoint / ".metadata").is_file(), "the sharded fit writes a distributed checkpoint folder"
    from instaflow_pl.families import FAMILIES

    base_weights = exported_weights(base)
    reference = export(tmp_path / "ddp" / "checkpoints" / "last.ckpt", tmp_path / "export-ddp")
    got = export(checkpoint, tmp_path / "export-sharded")
    assert got.keys() == reference.keys()
    network = FAMILIES[family].network_folder
    trained = [k for k in got if k.startswith(f"{network}/")]
    assert trained and any(not torch.equal(got[k], base_weights[k]) for k in trained), (
        "the export holds trained weights"
    )
    largest = max((got[k] - reference[k]).abs().max().item() for k in got)
    print(f"{family}: largest weight difference of the exports, sharded vs DDP: {largest:.2e}")
    assert largest < TOLERANCE


@pytest.mark.slow
def test_sharded_fit_matches_ddp_and_exports_the_same_folder(tiny_sd, tmp_path):
    """SD, reflow: two 2-rank fits and two exports (~80 s of two cores; make test-all: make test's budget)."""
    compare_with_ddp(tmp_path, tiny_sd, "sd")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sharded_fit_matches_ddp_for_other_families(family, tmp_path_factory, tmp_path):
    from instaflow_pl.families import FAMILIES

    base = FAMILIES[family].build_tiny(tmp_path_factory.mktemp("tiny") / family)
    compare_with_ddp(tmp_path, base, family)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "extra"),
    [("reflow", ("--model.init_args.lora={rank: 2, alpha: 4.0}",)), ("distill", ())],
    ids=["reflow-lora", "distill"],
)
def test_sharded_lora_and_distillation_match_ddp(stage, extra, tiny_sd, tiny_velocity, tmp_path):
    """LoRA adapters (only they train, the rest frozen) and the one-step distillation module, sharded vs DDP."""
    compare_with_ddp(tmp_path, tiny_velocity if stage == "distill" else tiny_sd, "sd", stage, *extra)


@pytest.mark.slow
def test_sharded_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_fit(tiny_sd, tmp_path):
    """32 training triples over 2 ranks in batches of 4: 4 steps an epoch. Checkpoints every 3 steps; killed before
    step 7, the last checkpoint is step 6 (epoch 1, batch 2): mid-epoch. CPU, one thread: exact equality."""
    from instaflow_pl.checkpoints import read_checkpoint

    data = write_dataset(tmp_path / "pairs", count=40, shard_size=8)
    config = sharded_config(tmp_path)
    full = fit(config, tiny_sd, data, tmp_path / "full", "sharded", steps=9)
    assert full.returncode == 0, full.stderr[-3000:]
    root = tmp_path / "run"
    killed = fit(config, tiny_sd, data, root, "sharded", steps=9, env={CRASH_ENV: "fit_step:7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    state = read_checkpoint(last)
    assert state["global_step"] == 6 and state["global_step"] % 4 != 0, "the checkpoint is mid-epoch"
    resumed = fit(config, tiny_sd, data, root, "sharded", 9, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = {k: v for k, v in logged(tmp_path / "full").items() if k[0] >= 6}
    got = {k: v for k, v in logged(root).items() if k[0] >= 6}
    assert sorted({s for s, m in expected if m == "train/loss"}) == [6, 7, 8]
    assert got == expected  # to the last bit
    final, reference = read_checkpoint(last)["state_dict"], read_checkpoint(tmp_path / "full/checkpoints/last.ckpt")
    reference = reference["state_dict"]
    assert final.keys() == reference.keys() and any(k.startswith("ema.") for k in final)
    assert all(torch.equal(final[k], reference[k]) for k in reference), "final weights (and EMA) equal exactly"


# ---- bad input: one line, before any rank starts ----------------------------------------------------------------


def bad_fit(tiny_sd, tmp_path, *extra: str) -> None:
    data = write_dataset(tmp_path / "pairs", count=16, shard_size=8)
    cli_main(
        ["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
         f"--data.init_args.path={data}", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.devices=2",
         "--trainer.logger=false", "--trainer.enable_progress_bar=false", *extra]
    )  # fmt: skip


def test_sharded_refuses_rank_zero_samplers_and_compile_in_one_line(tiny_sd, tmp_path):
    with pytest.raises(UserError, match=r"^SampleGrid, SampleQuality, Trajectories sample on rank zero alone"):
        bad_fit(tiny_sd, tmp_path, "--trainer.strategy=sharded")
    with pytest.raises(UserError, match=r"^compile: true does not compose with strategy sharded"):
        bad_fit(tiny_sd, tmp_path, "--trainer.strategy=sharded", "--model.init_args.compile=true")


def test_a_checkpoint_of_the_other_kind_is_one_line(tiny_sd, tmp_path):
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a sharded checkpoint \(a folder of shards\), and this run's strategy"):
        bad_fit(tiny_sd, tmp_path, "--trainer.strategy=ddp", f"--ckpt_path={folder}")
    single = tmp_path / "single.ckpt"
    torch.save({"instaflow_pl": {"module": "ReflowModule", "format_version": 2}, "state_dict": {}}, single)
    with pytest.raises(UserError, match=r"is a single-file \(unsharded\) checkpoint, and this run is sharded"):
        bad_fit(tiny_sd, tmp_path, "--trainer.strategy=sharded", f"--ckpt_path={single}")


def test_a_network_without_blocks_to_wrap_is_one_line():
    from torch import nn

    from instaflow_pl.sharding import shard_network

    with pytest.raises(UserError, match=r"^sharded training found no block to wrap in the Sequential"):
        shard_network(nn.Sequential(nn.Linear(2, 2)), ("BasicTransformerBlock",), mesh=None, mixed_precision=None)


# ---- the memory model (bench/sharding_memory.py) ----------------------------------------------------------------


def test_memory_model_counts_bytes_per_parameter_and_runs_quick(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is a folder of the repository, not of the package
    from bench.sharding_memory import GiB, Measured, per_gpu, quick_rows, table

    model = Measured("m", params=10**9, lora_params=10**6, largest_unit=10**7, activations=0, checkpointed=GiB)
    one, eight = per_gpu(model, 1), per_gpu(model, 8)
    assert one["ddp"] == pytest.approx(20e9 / GiB + 1) and eight["ddp"] == one["ddp"], "DDP replicates 20 B/param"
    assert eight["sharded"] == pytest.approx(20e9 / 8 / GiB + 2 * 2e7 / GiB + 1), "1/8 of it, plus 2 bf16 units"
    assert one["lora"] == pytest.approx((4e9 + 20e6) / GiB + 1), "frozen fp32 base, trained adapters"
    rows = quick_rows()
    assert [r.name for r in rows] == ["tiny sdxl", "tiny sd3"]
    assert all(r.params > 0 and 0 < r.checkpointed <= r.activations for r in rows)
    assert "| tiny sd3 |" in table(rows)
