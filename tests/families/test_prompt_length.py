"""The prompt length (T5 tokens, diffusers' ``max_sequence_length``) is a setting of the families with a T5 encoder
(SD3, Flux): pair generation takes it, the manifest records it, a model trained on the pairs reads its prompts the
same way, and its checkpoint and export (``instaflow.json``) record it for InstaFlowPipeline and load_teacher. More
than 512 tokens is a one-line error; a [schnell]-like Flux folder with more than 256 only warns; a family without T5
refuses the setting in one line."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import REPO
from helpers import assert_one_line_error, fit_quietly, run_main, story_pairs

from instaflow_pl.checkpoints import read_checkpoint, read_record
from instaflow_pl.data.manifest import Manifest
from instaflow_pl.errors import UserError
from instaflow_pl.export import export_checkpoint
from instaflow_pl.families import FAMILIES
from instaflow_pl.families.flux_tiny import build_tiny as build_flux
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.modules import ReflowModule
from instaflow_pl.pipeline import InstaFlowPipeline
from instaflow_pl.teachers import load_teacher

T5_FAMILIES = ["sd3", "flux"]
TOKENS = 48


@pytest.mark.parametrize("name", T5_FAMILIES)
def test_prompt_length_travels_from_pairs_to_the_export(name, tmp_path):
    family = FAMILIES[name]
    base = family.build_tiny(tmp_path / "base")
    default = family.prompt_length(ModelFolder.open(base).load_encoder())
    assert default != TOKENS
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car in the city\n")
    story_pairs(f"{name}/pairs", base, tmp_path / "pairs", prompts, f"--model.init_args.max_sequence_length={TOKENS}",
                "--data.init_args.repeats=4", "--model.init_args.steps=1")  # fmt: skip
    assert Manifest.read(tmp_path / "pairs" / "manifest.json").max_sequence_length == TOKENS

    module = ReflowModule(base_model=str(base), ema_decay=0.0, val_steps=[1])
    assert family.prompt_length(module.encoder) == default
    fit_quietly(module, tmp_path / "pairs", tmp_path / "fit", steps=1)
    assert family.prompt_length(module.encoder) == TOKENS
    assert module.condition(["a cat"]).embeds.shape[1] in (TOKENS, 77 + TOKENS)  # Flux: T5 only; SD3: CLIP + T5
    module.trainer.save_checkpoint(tmp_path / "last.ckpt")
    record = read_record(read_checkpoint(tmp_path / "last.ckpt"), "ReflowModule")
    assert record.conditioning["max_sequence_length"] == TOKENS

    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "export")
    assert json.loads((tmp_path / "export" / "instaflow.json").read_text())["max_sequence_length"] == TOKENS
    assert family.prompt_length(load_teacher(tmp_path / "export").encoder) == TOKENS
    assert family.prompt_length(InstaFlowPipeline.from_pretrained(tmp_path / "export").prompt_encoder()) == TOKENS
    assert f"max_sequence_length={TOKENS}" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("name", T5_FAMILIES)
def test_more_than_512_tokens_is_a_one_line_error(name, tmp_path, capsys):
    base = FAMILIES[name].build_tiny(tmp_path / "base")
    args = ["predict", "--config", str(REPO / f"configs/tiny/{name}/pairs.yaml"),
            f"--model.init_args.teacher={base}", f"--model.init_args.output_dir={tmp_path / 'pairs'}",
            "--model.init_args.max_sequence_length=513"]  # fmt: skip
    assert_one_line_error(run_main(args, capsys), "max_sequence_length must be between 1 and 512", "got 513")


def test_schnell_with_more_than_256_tokens_only_warns(tmp_path):
    family = FAMILIES["flux"]
    schnell = load_teacher(build_flux(tmp_path / "schnell", guidance_embeds=False), steps=1)
    with pytest.warns(UserWarning, match=r"max_sequence_length 300: FLUX.1 \[schnell\]-like models are used with"):
        family.set_prompt_length(schnell.encoder, 300)
    assert schnell.encoder.max_sequence_length == 300
    dev = load_teacher(FAMILIES["flux"].build_tiny(tmp_path / "dev"), steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # [dev] takes 512 without a word
        family.set_prompt_length(dev.encoder, 512)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in T5_FAMILIES])
def test_families_without_t5_refuse_the_setting(name, tmp_path):
    family = FAMILIES[name]
    encoder = ModelFolder.open(family.build_tiny(tmp_path / "base")).load_encoder()
    assert family.prompt_length(encoder) is None
    with pytest.raises(UserError, match="max_sequence_length is a setting of families with a T5 prompt encoder"):
        family.set_prompt_length(encoder, 64)
