"""``instaflow-pl evaluate``: FID / CLIP / NFE / speed of models on a caption set, resumable and rank-independent.

The models are the tiny velocity folder (a k-RF, Euler) and the tiny SD folder (a diffusion teacher through its
scheduler); FID uses InceptionV3 with random weights from a local file in the real file's format; CLIP is the tiny CLIP
folder; the reference is a folder of tiny PNGs. One uninterrupted in-process evaluation is the reference run that
the twice-run, the SIGKILL-resume and the 2-rank DDP runs must reproduce number for number.
"""

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from instaflow_pl.cli import cli_main, main
from instaflow_pl.data.prompts import coco_captions_per_image
from instaflow_pl.faults import CRASH_ENV
from instaflow_pl.tiny import build_tiny_clip, build_tiny_reference

TINY = REPO / "configs/eval/tiny.yaml"
WORDS = ["a photo of a cat", "a red car", "a dog in the city", "an old house", "a small bird", "a blue sea",
         "a white horse", "a green tree", "a man riding a horse", "a woman sitting on a house"]  # fmt: skip


def coco_file(path: Path, images: int = 10, seed: int = 0) -> Path:
    """A COCO captions file: two captions per image, annotations and images in shuffled order."""
    rng = random.Random(seed)
    ids = rng.sample(range(100, 1000), images)
    annotations = []
    for k, image in enumerate(ids):
        annotations.append({"id": 5000 + k, "image_id": image, "caption": f" {WORDS[k % len(WORDS)]}. "})
        annotations.append({"id": 9000 + k, "image_id": image, "caption": "a second caption"})
    rng.shuffle(annotations)
    path.write_text(json.dumps({"images": [{"id": i} for i in ids], "annotations": annotations}))
    return path


@dataclass
class Inputs:
    sd: Path
    velocity: Path
    clip: Path
    reference: Path
    captions: Path
    weights: Path
    cache: Path


@pytest.fixture(scope="module")
def inputs(tiny_sd, tiny_velocity, inception_weights, tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("evaluate")
    return Inputs(
        sd=tiny_sd,
        velocity=tiny_velocity,
        clip=build_tiny_clip(root / "clip"),
        reference=build_tiny_reference(root / "reference", count=12, size=16),
        captions=coco_file(root / "captions_val2017.json"),
        weights=inception_weights,
        cache=root / "fid-cache",
    )


def models(i: Inputs) -> str:
    """Two models, three rows: the flow at 1 and 2 Euler steps, the SD teacher at 2 DPM-Solver++ steps, guided."""
    return (
        f"[{{name: flow, folder: {i.velocity}, steps: [1, 2]}}, "
        f"{{name: sd, folder: {i.sd}, solver: dpm++, steps: [2], guidance: [2.0]}}]"
    )


def evaluate_args(i: Inputs, out: Path, *extra: str) -> list[str]:
    """The tiny evaluation config on the test inputs: 8 samples a row in shards of 4, Inception (64 features)."""
    return [
        "evaluate", "--config", str(TINY), f"--model.init_args.output_dir={out}",
        f"--model.init_args.models={models(i)}",
        f"--model.init_args.reference_folder={i.reference}", f"--model.init_args.clip_model={i.clip}",
        f"--model.init_args.cache_dir={i.cache}", "--model.init_args.fid_features=null",
        f"--model.init_args.inception_weights={i.weights}", "--model.init_args.feature_dim=64",
        "--model.init_args.shard_size=4", "--model.init_args.timing_batches=1", "--model.init_args.grid_columns=3",
        f"--data.init_args.captions={i.captions}", "--data.init_args.num_samples=8", "--data.init_args.batch_size=2",
        *extra,
    ]  # fmt: skip


def numbers(out: Path) -> list[tuple]:
    """Each row's (model, steps, guidance, NFE, FID, CLIP) from report.json (not the speed, which is measured)."""
    report = json.loads((out / "report.json").read_text())
    return [(r["model"], r["steps"], r["guidance"], r["nfe"], r["fid"], r["clip"]) for r in report["rows"]]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> Path:
    """One evaluation run in this process, start to end."""
    out = tmp_path_factory.mktemp("uninterrupted") / "eval"
    cli_main(evaluate_args(inputs, out))
    return out


# ---- captions and reference ----------------------------------------------------------------------------------------


def test_coco_captions_are_the_first_caption_of_each_image_by_image_id(tmp_path):
    path = coco_file(tmp_path / "captions.json")
    data = json.loads(path.read_text())
    by_image = sorted({a["image_id"] for a in data["annotations"]})
    first = {a["image_id"]: a["caption"].strip() for a in sorted(data["annotations"], key=lambda a: -a["id"])}
    assert coco_captions_per_image(path) == [first[image] for image in by_image]
    assert "a second caption" not in coco_captions_per_image(path)


def test_reference_against_itself_is_zero_and_its_statistics_are_cached(inputs, tmp_path, monkeypatch):
    from instaflow_pl.evaluation import ReferenceImages
    from instaflow_pl.evaluation.report import frechet_distance
    from instaflow_pl.metrics import inception_features

    net = inception_features(inputs.weights, feature_dim=64)
    reference = ReferenceImages(inputs.reference, resolution=16, batch_size=5)
    stats = reference.statistics(net, tmp_path)
    features = torch.cat([net(batch) for batch in reference.batches()])
    assert stats.count == 12 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert abs(frechet_distance(stats, features)) < 1e-6 * max(stats.cov.trace().item(), 1.0)
    assert frechet_distance(stats, features[:6] * 1.5) > 1e-3 * stats.cov.trace().item()  # and it can fail

    def unread(self):
        pytest.fail("the reference folder was read again: the cache was not used")
        yield

    monkeypatch.setattr(ReferenceImages, "batches", unread)
    again = reference.statistics(net, tmp_path)
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.cov, stats.cov)
    other = ReferenceImages(inputs.reference, resolution=16, center_crop=False)
    assert other.key != reference.key, "the resize settings are part of the cache key"


# ---- the command ---------------------------------------------------------------------------------------------------


def test_report_table_grid_and_a_second_run_give_identical_numbers(inputs, uninterrupted, tmp_path, caplog):
    rows = numbers(uninterrupted)
    assert [r[:4] for r in rows] == [("flow", 1, 1.0, 1), ("flow", 2, 1.0, 2), ("sd", 2, 2.0, 4)]
    assert all(r[4] > 0 and 0 <= r[5] <= 100 for r in rows), rows
    assert len({r[4] for r in rows}) == 3, "rows differ by their models and steps"
    report = json.loads((uninterrupted / "report.json").read_text())
    assert report["evaluation"]["num_samples"] == 8 and report["reference"]["count"] == 12
    assert all(r["timing"]["device"] and r["ms_per_image"] > 0 for r in report["rows"])
    table = (uninterrupted / "report.md").read_text()
    assert "| model | steps | guidance | NFE | FID | CLIP | ms/img |" in table and "| sd | 2 | 2 | 4 |" in table
    from PIL import Image

    with Image.open(uninterrupted / "grid.png") as grid:
        assert grid.height == 3 * 32 and grid.width > 3 * 32  # 3 rows of 32 px; labels + 3 captions wide

    second = tmp_path / "second"
    cli_main(evaluate_args(inputs, second))
    assert numbers(second) == rows
    assert (second / "grid.png").read_bytes() == (uninterrupted / "grid.png").read_bytes()

    before = files(uninterrupted)
    caplog.clear()
    cli_main(evaluate_args(inputs, uninterrupted))  # complete: nothing recomputed, nothing rewritten
    assert "every shard is computed" in caplog.text and "the report is up to date" in caplog.text
    assert files(uninterrupted) == before


def test_other_rows_keep_the_earlier_report_and_go_to_wandb(inputs, uninterrupted, tmp_path, monkeypatch):
    """The finished evaluation, now with the flow's rows only: nothing is recomputed, the earlier report is kept, and
    the table and grid reach an offline W&B run."""
    import shutil
    import time

    import wandb
    from helpers import item_key, read_wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = Path(shutil.copytree(uninterrupted, tmp_path / "eval"))
    earlier = {name: (out / name).read_bytes() for name in ("report.md", "report.json", "grid.png")}
    flow_only = f"--model.init_args.models=[{{name: flow, folder: {inputs.velocity}, steps: [1, 2]}}]"
    cli_main([*evaluate_args(inputs, out), flow_only, "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert wandb.run is None
    assert numbers(out) == numbers(uninterrupted)[:2], "the stored shards are reused, not recomputed"
    assert {name: (out / "earlier-reports/1" / name).read_bytes() for name in earlier} == earlier

    run = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.time() + 30  # the W&B service may still be flushing the log on a busy machine
    while "exit" not in [r.WhichOneof("record_type") for r in read_wandb_records(run)] and time.time() < deadline:
        time.sleep(0.5)
    records = read_wandb_records(run)
    logged = {item_key(item) for record in records if record.HasField("history") for item in record.history.item}
    assert {"eval/fid/flow@1,w=1", "eval/clip/flow@2,w=1", "eval/ms_per_image/flow@2,w=1"} <= logged, sorted(logged)
    assert {"eval/report.nrows", "eval/grid._type"} <= logged, "the table and the grid (wandb.Table, wandb.Image)"
    rows = [json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
            if item_key(i) == "eval/report.nrows"]  # fmt: skip
    assert rows == [2]


@pytest.mark.slow
def test_killed_on_one_rank_resumed_on_two_ddp_ranks_gives_the_same_numbers(inputs, uninterrupted, tmp_path):
    """A real SIGKILL, then the same command on 2 DDP ranks (gloo): resume and rank-independence in one pair of runs
    (each process start costs seconds here). The shards both ranks computed equal the one-process run's bit for bit."""
    out = tmp_path / "eval"
    # Killed while the 2nd shard of the first row is being written (its features are computed, the file not yet in
    # place): only the first shard survives, and nothing half-written counts.
    killed = run_cli(evaluate_args(inputs, out), env={CRASH_ENV: "eval_shard:1", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in out.glob("rows/*/shard-*")] == ["shard-000000.safetensors"]
    assert not (out / "report.json").exists()
    resumed = run_cli(
        evaluate_args(inputs, out, "--trainer.strategy=ddp", "--trainer.devices=2"),
        env={"MASTER_PORT": "29643", "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "1/6 shards already computed" in resumed.stderr
    ranks = {shard_rank(path) for path in out.glob("rows/*/shard-*.safetensors")}
    assert ranks == {"0", "1"}, f"both ranks computed shards, got {ranks}"
    print("1 rank, uninterrupted:", numbers(uninterrupted), "\nkilled, resumed on 2 ranks:", numbers(out))
    assert numbers(out) == numbers(uninterrupted)
    for row in range(3):
        assert torch.equal(stored(out, row).features, stored(uninterrupted, row).features)
        assert torch.equal(stored(out, row).clip, stored(uninterrupted, row).clip)


def stored(out: Path, row: int):
    """Row ``row``'s stored shards, read back through the evaluation store."""
    from instaflow_pl.evaluation import EvaluationSpec, EvaluationStore, RowSpec

    spec = EvaluationSpec(**json.loads((out / "evaluation.json").read_text()))
    rows = [RowSpec(**json.loads(p.read_text())) for p in sorted(out.glob("rows/*/row.json"))]
    order = [r.id for r in rows]
    return EvaluationStore(out, spec, rows).read_row(order.index(sorted(order)[row]))


def shard_rank(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata()["rank"]


# ---- bad inputs: one line each, nothing lost -----------------------------------------------------------------------


def _not_a_model(i: Inputs, case: Path) -> list[str]:
    folder = case / "not-a-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "notes.txt").write_text("keep me")
    return [f"--model.init_args.models=[{{folder: {folder}}}]"]


def _empty_folder(case: Path) -> Path:
    (case / "empty").mkdir()
    (case / "empty" / "notes.txt").write_text("not an image")
    return case / "empty"


def _another_evaluation(i: Inputs, case: Path) -> list[str]:
    out = case / "eval"
    out.mkdir()
    spec = {"num_samples": 8, "seed": 1, "shard_size": 4, "captions_sha256": "x", "features": "y", "reference": "z",
            "clip": "", "grid_columns": 3, "format_version": 1}  # fmt: skip
    (out / "evaluation.json").write_text(json.dumps(spec))
    return []


BAD = [
    ("missing-captions", lambda i, c: [f"--data.init_args.captions={c / 'captions_val2017.json'}"],
     ("captions file not found", "captions_val2017.json", "check the path")),
    ("empty-reference-folder", lambda i, c: [f"--model.init_args.reference_folder={_empty_folder(c)}"],
     ("reference folder", "holds 0 images", "point reference_folder at")),
    ("missing-inception-weights", lambda i, c: [f"--model.init_args.inception_weights={c / 'pt_inception.pth'}"],
     ("FID Inception weights", "pt_inception.pth not found", "put the file there")),
    ("missing-clip-weights", lambda i, c: [f"--model.init_args.clip_model={c / 'clip'}"],
     ("CLIP model folder", "not found", "put a CLIP model saved with save_pretrained there")),
    ("num-samples-larger-than-captions", lambda i, c: ["--data.init_args.num_samples=11"],
     ("num_samples 11 is more than the 10 captions", "lower data.init_args.num_samples")),
    ("model-folder-not-a-model", _not_a_model, ("not-a-model is not a model to evaluate", "no unet/ subfolder")),
    ("missing-model-folder", lambda i, c: [f"--model.init_args.models=[{{folder: {c / 'no-such-model'}}}]"],
     ("model folder not found", "no-such-model")),
    ("output-dir-of-another-evaluation", _another_evaluation,
     ("holds an evaluation with other settings", "seed 1 in the folder, 0 now", "use a new output_dir")),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_line_and_loses_nothing(case, inputs, tmp_path, capsys):
    _, make, says = case
    extra = make(inputs, tmp_path)
    args = evaluate_args(inputs, tmp_path / "eval", *extra)
    if case[0] != "missing-inception-weights":  # the other cases need no real feature network
        args += ["--model.init_args.fid_features=instaflow_pl.metrics.RandomFeatures"]
    before = files(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("instaflow-pl: error: ") and len([x for x in err.splitlines() if "error:" in x]) == 1, err
    for fragment in says:
        assert fragment in line, f"{fragment!r} not in: {line}"
    after = files(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file the case started with changed"
