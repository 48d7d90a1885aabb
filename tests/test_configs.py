"""Every YAML in configs/ runs: tiny ones for real, sd15 / sdxl / sd3 ones parsed and instantiated on the tiny folder
of their family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_dataset

from instaflow_pl.cli import cli_main, main
from instaflow_pl.families import FAMILIES, family_of_folder
from instaflow_pl.modules import DistillModule, PairGenerator, ReflowModule

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "sweeps")  # see test_sweeps.py
TINY_STAGES = ("pairs", "reflow", "pairs_2rf", "distill")
REAL_STAGES = ("pairs", "reflow", "pairs_distill", "distill")


def test_every_config_is_covered_here():
    covered = {
        "tiny/pairs.yaml", "tiny/pairs_2rf.yaml", "tiny/reflow.yaml", "tiny/distill.yaml", "tiny/reflow_lora.yaml",
        "sd15/pairs.yaml", "sd15/pairs_distill.yaml", "sd15/reflow.yaml", "sd15/distill.yaml",
        "sd15/reflow_lora.yaml", "sd15/distill_lpips.yaml",
        # run end to end (every stage, through the CLI) by test_demo.py::test_demo_stages_run_cache_and_refuse_...
        "demo/1rf.yaml", "demo/pairs_1rf.yaml", "demo/2rf.yaml", "demo/pairs_2rf.yaml", "demo/distill_2rf.yaml",
        "demo/distill_1rf.yaml",
        "eval/tiny.yaml", "eval/coco5k.yaml",  # below; test_evaluate.py runs eval/tiny.yaml with Inception
        # per family (below): the tiny ones run, the real ones are instantiated on the family's tiny folders
        *(f"{setting}/{stage}.yaml" for setting in ("tiny/sdxl", "tiny/sd3") for stage in TINY_STAGES),
        *(f"{family}/{stage}.yaml" for family in ("sdxl", "sd3") for stage in REAL_STAGES),
    }  # fmt: skip
    assert {str(p.relative_to(REPO / "configs")) for p in CONFIGS} == covered, "add new configs to these tests"


def test_tiny_pairs_config_runs_as_written(tiny_sd, tmp_path):
    config = yaml.safe_load((REPO / "configs/tiny/pairs.yaml").read_text())
    prompts = REPO / config["data"]["init_args"]["prompts"]
    out = tmp_path / "pairs"
    cli_main(
        [
            "predict",
            "--config",
            str(REPO / "configs/tiny/pairs.yaml"),
            f"--model.init_args.teacher={tiny_sd}",
            f"--model.init_args.output_dir={out}",
            f"--data.init_args.prompts={prompts}",
        ]
    )
    assert (out / "index.json").is_file()


def test_sd15_pairs_config_instantiates_on_the_tiny_folder(tiny_sd, tmp_path):
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/sd15/pairs.yaml"),
            f"--model.init_args.teacher={tiny_sd}",
            f"--model.init_args.output_dir={tmp_path / 'out'}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
        ],
        run=False,
    )
    model = cli.model
    assert isinstance(model, PairGenerator)
    assert (model.steps, model.guidance, model.latent_shape) == (25, 6.0, (4, 64, 64))
    assert model.teacher.solver_name == "dpm++" and model.teacher.model.unet.dtype.itemsize == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(Path(p).relative_to(REPO)))
def test_config_is_valid_yaml_with_class_paths(path):
    config = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"].startswith("instaflow_pl.")


def test_tiny_pairs_2rf_config_runs_on_a_velocity_teacher(tiny_velocity, tmp_path):
    out = tmp_path / "pairs"
    cli_main(["predict", "--config", str(REPO / "configs/tiny/pairs_2rf.yaml"),
              f"--model.init_args.teacher={tiny_velocity}", f"--model.init_args.output_dir={out}",
              f"--data.init_args.prompts={REPO / 'configs/tiny/prompts.txt'}"])  # fmt: skip
    assert (out / "index.json").is_file()


@pytest.mark.parametrize(
    "stage, module_class", [("reflow", ReflowModule), ("distill", DistillModule), ("reflow_lora", ReflowModule)]
)
def test_tiny_training_configs_fit_a_few_steps(tiny_sd, tiny_velocity, tmp_path, stage, module_class):
    base = tiny_sd if stage.startswith("reflow") else tiny_velocity
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=16)
    cli = cli_main(["fit", "--config", str(REPO / f"configs/tiny/{stage}.yaml"),
                    f"--model.init_args.base_model={base}", f"--data.init_args.path={data}",
                    f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=4",
                    "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                    "--trainer.logger=false"])  # fmt: skip
    assert isinstance(cli.model, module_class)
    assert cli.trainer.global_step == 4
    assert "val/mse@1" in cli.trainer.callback_metrics and "train/loss" in cli.trainer.callback_metrics
    assert list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize(
    "name, module_class",
    [
        ("reflow", ReflowModule),
        ("distill", DistillModule),
        ("pairs_distill", PairGenerator),
        ("reflow_lora", ReflowModule),
        ("distill_lpips", DistillModule),
    ],
)
def test_sd15_configs_instantiate_on_the_tiny_folder(tiny_sd, tiny_velocity, tmp_path, name, module_class):
    key = "teacher" if module_class is PairGenerator else "base_model"
    folder = tiny_sd if name.startswith("reflow") else tiny_velocity
    extra = [f"--model.init_args.output_dir={tmp_path / 'out'}"] if module_class is PairGenerator else []
    if name == "distill_lpips":  # random LPIPS backbone: the VGG weights file is not on test machines
        extra.append("--model.init_args.lpips_pretrained=false")
    cli = cli_main(
        ["--config", str(REPO / f"configs/sd15/{name}.yaml"), f"--model.init_args.{key}={folder}",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
         "--trainer.precision=32-true", *extra],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model, module_class)
    config = yaml.safe_load((REPO / f"configs/sd15/{name}.yaml").read_text())
    if module_class is not PairGenerator:
        assert cli.datamodule.expected_latent_shape == [4, 64, 64]
        root = config["trainer"]["default_root_dir"]
        assert cli.trainer.checkpoint_callback.dirpath.endswith(f"{root}/checkpoints"), "interpolation resolved"
        assert cli.model.hparams.ema_decay == config["model"]["init_args"]["ema_decay"]
        init = config["model"]["init_args"]
        lora = cli.model.hparams.lora
        assert (lora and {k: lora[k] for k in init["lora"]}) == init.get("lora") and cli.model.hparams.tf32

        if name == "distill_lpips":
            assert cli.model.distance.lpips.resize == 224 and cli.model.distance.lpips.vae.dtype == torch.bfloat16


def test_module_help_lists_the_shared_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs/tiny/distill.yaml"), "--model.help", "DistillModule"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model.student_steps", "--model.distance", "--model.ema_decay", "--model.warmup_steps"):
        assert option in text, option
    assert "default: 0.0" in text.split("--model.prompt_dropout")[-1][:300], "DistillModule's own default"


def _eval_config(tmp_path, name: str, edit) -> Path:
    config = yaml.safe_load((REPO / f"configs/eval/{name}.yaml").read_text())
    edit(config["model"]["init_args"], config["data"]["init_args"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_eval_tiny_config_runs_as_written(tiny_sd, tmp_path):
    """configs/eval/tiny.yaml with the folders `make evaluate` writes, made here instead."""
    from instaflow_pl.tiny import build_tiny_clip, build_tiny_reference

    def edit(model, data):
        assert [m["folder"] for m in model["models"]] == ["outputs/tiny/sd"]
        model["models"][0]["folder"] = str(tiny_sd)
        model["reference_folder"] = str(build_tiny_reference(tmp_path / "reference"))
        model["clip_model"] = str(build_tiny_clip(tmp_path / "clip"))
        model.update(output_dir=str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"))
        data["captions"] = str(REPO / data["captions"])

    cli_main(["evaluate", "--config", str(_eval_config(tmp_path, "tiny", edit))])
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert [(r["steps"], r["guidance"]) for r in report["rows"]] == [(2, 1.0), (2, 6.0), (8, 1.0), (8, 6.0)]
    assert all(r["clip"] is not None and r["ms_per_image"] for r in report["rows"])
    assert (tmp_path / "eval/grid.png").is_file() and (tmp_path / "eval/report.md").is_file()


def test_eval_coco5k_config_instantiates_on_the_tiny_folders(tiny_sd, tiny_velocity, inception_weights, tmp_path):
    from instaflow_pl.evaluation import CaptionDataModule, Evaluation
    from instaflow_pl.metrics import InceptionFeatures
    from instaflow_pl.tiny import build_tiny_clip, build_tiny_reference

    def edit(model, data):
        for entry in model["models"]:
            entry["folder"] = str(tiny_sd if entry.get("solver") == "dpm++" else tiny_velocity)
        model["reference_folder"] = str(build_tiny_reference(tmp_path / "reference", count=4))
        model["clip_model"] = str(build_tiny_clip(tmp_path / "clip"))
        model["inception_weights"] = str(inception_weights)

    cli = cli_main(["--config", str(_eval_config(tmp_path, "coco5k", edit)), "--trainer.accelerator=cpu",
                    "--trainer.devices=1"], run=False)  # fmt: skip
    assert isinstance(cli.model, Evaluation) and isinstance(cli.datamodule, CaptionDataModule)
    rows = [(r.name, r.steps, r.guidance, r.solver, r.dtype) for r in cli.model.rows]
    assert rows == [("InstaFlow (2-RF + distill)", 1, 1.0, "euler", "fp16")] + [
        ("2-RF", n, 1.5, "euler", "fp16") for n in (1, 2, 4, 25)
    ] + [("SD 1.5 (teacher)", 25, 6.0, "dpm++", "fp16")]
    assert isinstance(cli.model.features, InceptionFeatures) and cli.model.features.num_features == 2048
    assert cli.datamodule.num_samples == 5000 and cli.datamodule.source.endswith("captions_val2017.json")
    assert cli.model.reference_images.resolution == 512 and cli.model.reference_images.center_crop


# ---- model families: configs/tiny/{sdxl,sd3}/ run, configs/{sdxl,sd3}/ instantiate on the family's tiny folders ----

TINY_LATENTS = {"sdxl": [4, 8, 8], "sd3": [16, 8, 8]}
"""Latent shapes of the tiny folders (sample_size 8); the real configs use the native 4/16 x 128 x 128."""


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """``get(family, kind)``: the family's tiny folder (``base``) or a copy of it marked as a velocity (k-RF) folder
    (``velocity``), each built once for this module."""
    from instaflow_pl.teachers import mark_velocity_folder

    built: dict[tuple[str, str], Path] = {}

    def get(family: str, kind: str = "base") -> Path:
        if (family, kind) not in built:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            base = FAMILIES[family].build_tiny(root / family)
            velocity = root / f"{family}-rf"
            shutil.copytree(base, velocity)
            mark_velocity_folder(velocity, stage="test")
            built[(family, "base")], built[(family, "velocity")] = base, velocity
        return built[(family, kind)]

    return get


@pytest.mark.parametrize("stage", ["pairs", "pairs_2rf"])
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_tiny_family_pairs_configs_run_as_written(family_folder, tmp_path, family, stage):
    config = yaml.safe_load((REPO / f"configs/tiny/{family}/{stage}.yaml").read_text())
    written = f"outputs/tiny/{family}-2rf" if stage == "pairs_2rf" else f"outputs/tiny/{family}"
    assert config["model"]["init_args"]["teacher"] == written
    teacher = family_folder(family, "base" if stage == "pairs" else "velocity")
    out = tmp_path / "pairs"
    cli_main(["predict", "--config", str(REPO / f"configs/tiny/{family}/{stage}.yaml"),
              f"--model.init_args.teacher={teacher}", f"--model.init_args.output_dir={out}",
              f"--data.init_args.prompts={REPO / config['data']['init_args']['prompts']}"])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    solver = {"sdxl": "dpm++", "sd3": "euler"}[family] if stage == "pairs" else "euler"  # auto: SD3's shifted Euler
    assert (manifest["family"], manifest["solver"], manifest["latent_shape"]) == (family, solver, TINY_LATENTS[family])
    assert (out / "index.json").is_file()


@pytest.mark.parametrize("stage, module_class", [("reflow", ReflowModule), ("distill", DistillModule)])
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_tiny_family_training_configs_fit_a_few_steps(family_folder, tmp_path, family, stage, module_class):
    base = family_folder(family, "base" if stage == "reflow" else "velocity")
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=16, shape=TINY_LATENTS[family], family=family)
    cli = cli_main(["fit", "--config", str(REPO / f"configs/tiny/{family}/{stage}.yaml"),
                    f"--model.init_args.base_model={base}", f"--data.init_args.path={data}",
                    f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=4",
                    "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                    "--trainer.logger=false"])  # fmt: skip
    assert isinstance(cli.model, module_class) and cli.model.velocity.family.name == family
    assert cli.trainer.global_step == 4
    assert "val/mse@1" in cli.trainer.callback_metrics and "train/loss" in cli.trainer.callback_metrics
    assert list((tmp_path / "run").rglob("*.ckpt"))


REAL_PAIRS = {  # (steps, guidance, latent shape, solver) of configs/<family>/pairs.yaml and pairs_distill.yaml
    ("sdxl", "pairs"): (25, 5.0, (4, 128, 128), "dpm++"),
    ("sdxl", "pairs_distill"): (25, 1.5, (4, 128, 128), "euler"),
    ("sd3", "pairs"): (28, 7.0, (16, 128, 128), "euler"),
    ("sd3", "pairs_distill"): (25, 1.5, (16, 128, 128), "euler"),
}


@pytest.mark.parametrize("stage", REAL_STAGES)
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_family_configs_instantiate_on_the_tiny_folders(family_folder, tmp_path, family, stage):
    """configs/sdxl/ and configs/sd3/ as written, with only the model folder (and the devices) swapped for tiny ones."""
    pairs = stage.startswith("pairs")
    folder = family_folder(family, "base" if stage in ("pairs", "reflow") else "velocity")
    key = "teacher" if pairs else "base_model"
    extra = [f"--model.init_args.output_dir={tmp_path / 'out'}"] if pairs else []
    cli = cli_main(
        ["--config", str(REPO / f"configs/{family}/{stage}.yaml"), f"--model.init_args.{key}={folder}",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
         "--trainer.precision=32-true", *extra],
        run=False,
    )  # fmt: skip
    config = yaml.safe_load((REPO / f"configs/{family}/{stage}.yaml").read_text())
    native = [4 if family == "sdxl" else 16, 128, 128]
    if pairs:
        model = cli.model
        assert isinstance(model, PairGenerator) and model.teacher.family.name == family
        steps, guidance, shape, solver = REAL_PAIRS[(family, stage)]
        assert (model.steps, model.guidance, model.latent_shape, model.teacher.solver_name) == (
            steps, guidance, shape, solver
        )  # fmt: skip
        assert model.teacher.model.unet.dtype == torch.float16
        return
    assert isinstance(cli.model, ReflowModule if stage == "reflow" else DistillModule)
    assert cli.model.velocity.family.name == family
    assert cli.datamodule.expected_latent_shape == native
    assert cli.model.hparams.gradient_checkpointing and cli.model.velocity.unet.is_gradient_checkpointing
    text_dtype = torch.bfloat16 if family == "sd3" else torch.float32  # T5-XXL: 9.5 GB in bf16
    assert next(cli.model.encoder.parameters()).dtype == text_dtype
    root = config["trainer"]["default_root_dir"]
    assert root == f"outputs/{family}/{stage}"
    assert cli.trainer.checkpoint_callback.dirpath.endswith(f"{root}/checkpoints"), "interpolation resolved"
    batch = config["data"]["init_args"]["batch_size"]
    global_batch = batch * config["trainer"]["devices"] * config["trainer"].get("accumulate_grad_batches", 1)
    assert global_batch == (64 if stage == "reflow" else 1024), "InstaFlow's batch sizes"
    assert cli.trainer.max_steps == (70000 if stage == "reflow" else 21500)


def test_tiny_command_writes_a_folder_of_the_family(tmp_path, capsys):
    main(["tiny", "--family", "sd3", str(tmp_path / "sd3")])
    assert family_of_folder(tmp_path / "sd3").name == "sd3"
    main(["tiny", "--family", "sd3", str(tmp_path / "sd3")])
    assert "already holds a model" in capsys.readouterr().out
    for args, fragment in [
        (["--family", "flux", str(tmp_path / "flux")], "unknown model family 'flux'; known: sd3, sdxl, sd"),
        (["--family", "sdxl", str(tmp_path / "sd3")], "holds a model of the sd3 family, not sdxl"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["tiny", *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "flux").exists()
