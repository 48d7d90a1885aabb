"""A model folder is read once (ModelFolder): its kind, family, configs, and one clear error per problem; names
written by older versions ("sd" for a released folder, the digits demo's folders recorded as "sd") still read."""

from __future__ import annotations

import json
import shutil

import pytest

from instaflow_pl.data.manifest import Manifest
from instaflow_pl.data.synthetic import random_triples_manifest
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES
from instaflow_pl.kinds import KIND_FILE, RELEASED_KIND, VELOCITY_KIND
from instaflow_pl.model_folder import ModelFolder, mark_velocity_folder


def test_a_released_folder_read_once(tiny_sd):
    folder = ModelFolder.open(tiny_sd)
    assert folder.kind == RELEASED_KIND and folder.family is FAMILIES["sd"] and folder.info == {}
    assert folder.network_config["_class_name"] == "UNet2DConditionModel"
    assert folder.scheduler_config["_class_name"] == "PNDMScheduler"
    assert folder.pixels_per_latent == 2 and folder.geometry.shape == (4, 8, 8)
    assert folder.index["_class_name"] == "StableDiffusionPipeline"


def test_a_velocity_folder_and_the_older_names(tiny_sd, tmp_path):
    folder = tmp_path / "rf"
    shutil.copytree(tiny_sd, folder)
    mark_velocity_folder(folder, family="sd")
    assert ModelFolder.open(folder).kind == VELOCITY_KIND
    (folder / KIND_FILE).write_text(json.dumps({"kind": "sd"}))  # what older versions could write
    assert ModelFolder.open(folder).kind == RELEASED_KIND


def test_a_digits_folder_recorded_as_sd_is_a_digits_folder(tmp_path):
    """Folders the demo wrote before the digits family existed: no family in instaflow.json (or "sd")."""
    base = FAMILIES["digits"].build_tiny(tmp_path / "digits")
    for info in ({"kind": "velocity"}, {"kind": "velocity", "family": "sd"}):
        (base / KIND_FILE).write_text(json.dumps(info))
        assert ModelFolder.open(base).family is FAMILIES["digits"]
    assert FAMILIES["digits"].answers_to("sd") and not FAMILIES["sdxl"].answers_to("sd")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "model_index.json").unlink(), "no model_index.json"),
        (lambda root: (root / KIND_FILE).write_text("{"), "instaflow.json is not valid JSON"),
        (lambda root: (root / KIND_FILE).write_text('{"kind": "diffusion"}'), "unknown model kind 'diffusion'"),
        (lambda root: (root / "unet" / "config.json").write_text("["), "unet/config.json is not valid JSON"),
        (lambda root: shutil.rmtree(root / "vae"), "has no vae/ subfolder; a Stable Diffusion folder needs"),
        (lambda root: (root / KIND_FILE).write_text('{"family": "kandinsky"}'), "unknown model family 'kandinsky'"),
    ],
)
def test_each_problem_is_one_clear_error(tiny_sd, tmp_path, damage, message):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_sd, folder)
    damage(folder)
    with pytest.raises(UserError, match=message):
        ModelFolder.open(folder)


def test_a_manifest_written_with_kind_sd_reads_as_released(tmp_path):
    manifest = random_triples_manifest(4)
    assert manifest.teacher_kind == RELEASED_KIND
    text = manifest.to_json().replace('"released"', '"sd"')
    (tmp_path / "manifest.json").write_text(text)
    assert Manifest.read(tmp_path / "manifest.json") == manifest


@pytest.mark.parametrize(("family", "tokens"), [("sd3", 256), ("sd", None)])
def test_a_manifest_written_before_the_prompt_length_reads_as_the_length_then(tmp_path, family, tokens):
    """SD3 pairs generated before max_sequence_length was recorded used 256 T5 tokens: they still resume."""
    manifest = random_triples_manifest(4, family=family)
    data = json.loads(manifest.to_json())
    data.pop("max_sequence_length")
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.read(tmp_path / "manifest.json").max_sequence_length == tokens


def test_a_digits_checkpoint_recorded_as_sd_is_a_digits_checkpoint(tmp_path):
    """Checkpoints the demo wrote before the digits family existed record ``family: sd``: a digits module resumes
    them, and export writes a digits folder."""
    from instaflow_pl.checkpoints import CheckpointRecord
    from instaflow_pl.export.checkpoint import checkpoint_family
    from instaflow_pl.modules import ReflowModule

    base = FAMILIES["digits"].build_tiny(tmp_path / "digits")
    module = ReflowModule(base_model=str(base), ema_decay=0.0, val_steps=[1])
    checkpoint = {"state_dict": module.state_dict()}
    record = module.checkpoint_record(set())
    CheckpointRecord(**{**record.__dict__, "family": "sd"}).write(checkpoint)
    module.on_load_checkpoint(checkpoint)  # no refusal
    assert checkpoint_family(CheckpointRecord(**{**record.__dict__, "family": "sd"}), "old.ckpt") is FAMILIES["digits"]
    sd_module = ReflowModule(base_model=str(FAMILIES["sd"].build_tiny(tmp_path / "sd")), ema_decay=0.0, val_steps=[1])
    CheckpointRecord(**{**record.__dict__, "family": "digits"}).write(checkpoint)
    with pytest.raises(UserError, match="the checkpoint holds an digits model"):
        sd_module.on_load_checkpoint(checkpoint)
