"""The recipes' own numbers: sd15 / sdxl / sd3 configs instantiated at their native shapes on the tiny folder of their
family (steps, guidance, solver, batch sizes, dtypes). test_configs_run.py runs every config for a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from instaflow_pl.cli import cli_main, main
from instaflow_pl.families import FAMILIES
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.modules import DistillModule, PairGenerator, ReflowModule

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "sweeps")  # see test_sweeps.py
REAL_STAGES = ("pairs", "reflow", "pairs_distill", "distill")


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
    assert model.teacher.solver_name == "dpm++" and model.teacher.model.network.dtype.itemsize == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(Path(p).relative_to(REPO)))
def test_config_is_valid_yaml_with_class_paths(path):
    config = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"].startswith("instaflow_pl.")


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
        cli_main(["fit", "--config", str(REPO / "configs/tiny/sd/distill.yaml"), "--model.help", "DistillModule"])
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


# ---- model families: configs/{sdxl,sd3}/ instantiate on the family's tiny folders ----


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """``get(family, kind)``: the family's tiny folder (``base``) or a copy of it marked as a velocity (k-RF) folder
    (``velocity``), each built once for this module."""
    from instaflow_pl.model_folder import mark_velocity_folder

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


REAL_PAIRS = {  # (steps, guidance, latent shape, solver) of configs/<family>/pairs.yaml and pairs_distill.yaml
    ("sdxl", "pairs"): (25, 5.0, (4, 128, 128), "dpm++"),
    ("sdxl", "pairs_distill"): (25, 1.5, (4, 128, 128), "euler"),
    ("sd3", "pairs"): (28, 7.0, (16, 128, 128), "euler"),
    ("sd3", "pairs_distill"): (25, 1.5, (16, 128, 128), "euler"),
    ("flux", "pairs"): (28, 3.5, (16, 128, 128), "euler"),
    ("flux", "pairs_distill"): (25, 1.5, (16, 128, 128), "euler"),
}
TEACHER_DTYPES = {"sdxl": torch.float16, "sd3": torch.float16, "flux": torch.bfloat16}
"""The teacher dtypes of the recipes: as each family's diffusers examples load it."""


@pytest.mark.parametrize("stage", REAL_STAGES)
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_configs_instantiate_on_the_tiny_folders(family_folder, tmp_path, family, stage):
    """configs/sdxl/, configs/sd3/ and configs/flux/ as written, with only the model folder (and the devices) swapped
    for tiny ones."""
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
        assert model.teacher.model.network.dtype == TEACHER_DTYPES[family]
        return
    assert isinstance(cli.model, ReflowModule if stage == "reflow" else DistillModule)
    assert cli.model.velocity.family.name == family
    assert cli.datamodule.expected_latent_shape == native
    assert cli.model.hparams.gradient_checkpointing and cli.model.velocity.network.is_gradient_checkpointing
    text_dtype = torch.bfloat16 if family in ("sd3", "flux") else torch.float32  # T5-XXL: 9.5 GB in bf16
    assert next(cli.model.encoder.parameters()).dtype == text_dtype
    root = config["trainer"]["default_root_dir"]
    assert root == f"outputs/{family}/{stage}"
    assert cli.trainer.checkpoint_callback.dirpath.endswith(f"{root}/checkpoints"), "interpolation resolved"
    batch = config["data"]["init_args"]["batch_size"]
    trainer = config["trainer"]
    global_batch = batch * trainer["devices"] * trainer.get("num_nodes", 1) * trainer.get("accumulate_grad_batches", 1)
    assert global_batch == (64 if stage == "reflow" else 1024), "InstaFlow's batch sizes"
    assert cli.trainer.max_steps == (70000 if stage == "reflow" else 21500)


def test_tiny_command_writes_a_folder_of_the_family(tmp_path, capsys):
    main(["tiny", "--family", "sd3", str(tmp_path / "sd3")])
    assert ModelFolder.open(tmp_path / "sd3").family.name == "sd3"
    main(["tiny", "--family", "sd3", str(tmp_path / "sd3")])
    assert "already holds a model" in capsys.readouterr().out
    for args, fragment in [
        (
            ["--family", "kandinsky", str(tmp_path / "kandinsky")],
            f"unknown model family 'kandinsky'; known: {', '.join(FAMILIES)}",
        ),
        (["--family", "sdxl", str(tmp_path / "sd3")], "holds a model of the sd3 family, not sdxl"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["tiny", *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "kandinsky").exists()


@pytest.mark.parametrize("stage", ["pairs", "reflow_lora", "distill"])
def test_flux_recipe_specifics(family_folder, tmp_path, stage):
    """configs/flux/: pairs from [dev] at its guidance input 3.5 and 512 T5 tokens; reflow and distillation with
    rank-64 adapters on both streams' attention projections, in bf16 (bf16-true, no EMA: a bf16 EMA cannot follow
    small updates), at InstaFlow's batches and steps."""
    folder = family_folder("flux", "base" if stage in ("pairs", "reflow_lora") else "velocity")
    pairs = stage == "pairs"
    key = "teacher" if pairs else "base_model"
    extra = [f"--model.init_args.output_dir={tmp_path / 'out'}"] if pairs else ["--trainer.precision=32-true"]
    cli = cli_main(
        ["--config", str(REPO / f"configs/flux/{stage}.yaml"), f"--model.init_args.{key}={folder}",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", *extra],
        run=False,
    )  # fmt: skip
    config = yaml.safe_load((REPO / f"configs/flux/{stage}.yaml").read_text())
    if pairs:
        assert cli.model.teacher.model.guidance_as_input and cli.model.guidance == 3.5
        assert cli.model.manifest_for(["a cat"], "x").max_sequence_length == 512
        return
    lora = cli.model.hparams.lora
    assert (lora["rank"], lora["alpha"]) == (64, 64.0)
    assert {"add_q_proj", "to_add_out", "to_out.0"} <= set(lora["target_modules"])
    assert config["trainer"]["precision"] == "bf16-true" and cli.model.hparams.ema_decay == 0.0
    trainer = config["trainer"]
    global_batch = (
        config["data"]["init_args"]["batch_size"] * trainer["devices"] * trainer.get("accumulate_grad_batches", 1)
    )
    assert (global_batch, trainer["max_steps"]) == ((64, 70000) if stage == "reflow_lora" else (1024, 21500))


def test_tiny_command_writes_captioned_images_that_the_image_datamodule_reads(tmp_path, capsys):
    """``instaflow-pl tiny --images DIR``: PNGs with a metadata.jsonl naming each one's strongest colour channel,
    the folder configs/tiny/sd/perflow_images.yaml trains on."""
    import json

    import numpy as np
    from PIL import Image

    from instaflow_pl.data import ImagePromptDataModule

    images = tmp_path / "images"
    main(["tiny", str(tmp_path / "sd"), "--images", str(images)])
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all((images / row["file_name"]).is_file() for row in rows)
    for row in rows:
        pixels = np.asarray(Image.open(images / row["file_name"])).reshape(-1, 3).mean(axis=0)
        assert row["text"] == f"a {('red', 'green', 'blue')[int(pixels.argmax())]} picture"
    data = ImagePromptDataModule(str(images), resolution=16, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.x0 is None and tuple(batch.x1.shape) == (4, 3, 16, 16) and -1 <= batch.x1.min() < batch.x1.max() <= 1
    main(["tiny", str(tmp_path / "sd"), "--images", str(images)])
    assert "already holds images" in capsys.readouterr().out
    config = yaml.safe_load((REPO / "configs/tiny/sd/perflow_images.yaml").read_text())
    assert config["data"]["init_args"]["folder"] == "outputs/tiny/images"
    assert config["model"]["init_args"]["encode_images"]
