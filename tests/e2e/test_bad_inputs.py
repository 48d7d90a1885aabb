"""Bad input, tried and answered: one catalog of mistakes a user can make, each through the ``instaflow-pl`` command.

Every entry of ``CATALOG`` runs the command (in this process, through ``instaflow_pl.cli.main``, exactly as the console
script does) and must end with exit status 2 and one clear line on stderr, ``instaflow-pl: error: ...``, that names the
thing at fault and says what to do; no traceback; and no data lost: every file the case started with (datasets,
checkpoints, configs, prompt files, a file in the way) is still there, byte for byte. A prompt longer than the
tokenizer allows is not an error: it is truncated with one warning (``test_a_too_long_prompt_is_one_warning``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, pairs_args, write_dataset

from instaflow_pl.cli import main

REFLOW = REPO / "configs/tiny/sd/reflow.yaml"
DISTILL = REPO / "configs/tiny/sd/distill.yaml"


@dataclass
class Inputs:
    """What the cases start from (shared, never changed) and a fresh folder for the case's own files."""

    sd: Path  # the tiny SD folder
    velocity: Path  # the tiny k-RF folder
    data: Path  # a good triples dataset
    reflow_ckpt: Path  # a checkpoint written by ReflowModule
    prompts: Path  # a good prompt file
    case: Path  # this case's folder

    def dataset_copy(self, name: str = "pairs") -> Path:
        return Path(shutil.copytree(self.data, self.case / name))

    def config(self, source: Path, edit: Callable[[dict], None]) -> Path:
        config = yaml.safe_load(source.read_text())
        edit(config)
        path = self.case / source.name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def fit(self, *extra: str, config: Path = REFLOW, data: Path | None = None, base: Path | None = None) -> list:
        return [
            "fit",
            "--config",
            str(config),
            f"--model.init_args.base_model={base or self.sd}",
            f"--data.init_args.path={data or self.data}",
            f"--trainer.default_root_dir={self.case / 'run'}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=1",
            *extra,
        ]

    def pairs(self, *extra: str, prompts: Path | None = None, out: Path | None = None) -> list:
        return pairs_args(self.sd, prompts or self.prompts, out or self.case / "out", *extra)


@dataclass
class BadInput:
    """One mistake: how to make it (the command's arguments), and what the one line must say."""

    id: str
    args: Callable[[Inputs], list]
    says: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _truncated_shard(i: Inputs) -> list:
    data = i.dataset_copy()
    shard = data / "shard-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    return i.fit(data=data)


def _shard_of_another_dataset(i: Inputs) -> list:
    data = i.dataset_copy()
    other = write_dataset(i.case / "other", count=16, shard_size=8, seed=1)  # same sizes, another manifest
    shutil.copyfile(other / "shard-000001.bin", data / "shard-000001.bin")
    return i.fit(data=data)


def _manifest_missing(i: Inputs) -> list:
    data = i.dataset_copy()
    (data / "manifest.json").unlink()
    return i.fit(data=data)


def _unfinished_dataset(i: Inputs) -> list:
    data = i.dataset_copy()
    (data / "index.json").unlink()
    return i.fit(data=data)


def _no_dataset(i: Inputs) -> list:
    return i.fit(data=i.case / "no-such-pairs")


def _unknown_yaml_key(i: Inputs) -> list:
    return i.fit(config=i.config(REFLOW, lambda c: c["model"]["init_args"].update(t_distributon="uniform")))


def _wrong_type(i: Inputs) -> list:
    return i.fit(config=i.config(REFLOW, lambda c: c["data"]["init_args"].update(batch_size="sixteen")))


def _unknown_trainer_key(i: Inputs) -> list:
    return i.fit(config=i.config(REFLOW, lambda c: c["trainer"].update(max_stepz=3)))


def _checkpoint_of_another_module(i: Inputs) -> list:
    return i.fit(f"--ckpt_path={i.reflow_ckpt}", config=DISTILL, base=i.velocity, data=i.data)


def _not_a_checkpoint(i: Inputs) -> list:
    return i.fit(f"--ckpt_path={_write(i.case / 'notes.ckpt', 'not a checkpoint')}")


def _truncated_checkpoint(i: Inputs) -> list:
    data = i.reflow_ckpt.read_bytes()
    return i.fit(f"--ckpt_path={_write(i.case / 'cut.ckpt', data[: len(data) // 2])}")


def _checkpoint_of_another_version(i: Inputs) -> list:
    import torch

    checkpoint = torch.load(i.reflow_ckpt, weights_only=True, map_location="cpu")
    checkpoint["hyper_parameters"]["renamed_option"] = 1  # what a newer or older version could have saved
    torch.save(checkpoint, i.case / "other-version.ckpt")
    return i.fit(f"--ckpt_path={i.case / 'other-version.ckpt'}")


def _wrong_latent_shape(i: Inputs) -> list:
    return i.fit(data=write_dataset(i.case / "rgb-pairs", count=16, shard_size=8, shape=(3, 8, 8)))


def _missing_lpips_weights(i: Inputs) -> list:
    return i.fit("--model.init_args.distance={l2: 1.0, lpips: 1.0}", config=DISTILL, base=i.velocity)


def _tiny(i: Inputs, family: str, drop: str | None = None) -> Path:
    from instaflow_pl.families import FAMILIES

    folder = FAMILIES[family].build_tiny(i.case / family)
    if drop is not None:
        shutil.rmtree(folder / drop)
    return folder


def _unknown_family(i: Inputs) -> list:
    folder = Path(shutil.copytree(i.sd, i.case / "kandinsky"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    return i.fit(base=folder)


def _family_pairs(i: Inputs, teacher: Path, *extra: str) -> list:
    return pairs_args(teacher, i.prompts, i.case / "out", *extra)


def _pairs_of_another_family(i: Inputs) -> list:
    return i.fit(base=_tiny(i, "sdxl"))  # the shared dataset comes from an SD teacher


def _checkpoint_of_another_family(i: Inputs) -> list:
    data = write_dataset(i.case / "sdxl-pairs", count=16, shard_size=8, family="sdxl")
    return i.fit(f"--ckpt_path={i.reflow_ckpt}", base=_tiny(i, "sdxl"), data=data)


CATALOG = [
    # model families
    BadInput(
        "unknown-family",
        _unknown_family,
        ("KandinskyPipeline (model_index.json _class_name)", "not a known family", "StableDiffusion3Pipeline (sd3)"),
    ),
    BadInput(
        "sdxl-folder-without-text-encoder-2",
        lambda i: _family_pairs(i, _tiny(i, "sdxl", drop="text_encoder_2")),
        ("has no text_encoder_2/ subfolder", "a Stable Diffusion XL folder needs"),
    ),
    BadInput(
        "sd3-folder-without-tokenizer-2",
        lambda i: _family_pairs(i, _tiny(i, "sd3", drop="tokenizer_2"), "--model.init_args.solver=auto"),
        ("has no tokenizer_2/ subfolder", "a Stable Diffusion 3 folder needs"),
    ),
    BadInput(
        "pairs-of-another-family",
        _pairs_of_another_family,
        ("come from an sd teacher", "an sdxl model", "generate pairs with a teacher of the model's family"),
    ),
    BadInput(
        "checkpoint-of-another-family",
        _checkpoint_of_another_family,  # the CLI restores the checkpoint's base_model, so the data no longer fits
        ("come from an sdxl teacher", "the model being trained is an sd model"),
    ),
    BadInput(
        "latent-channels-of-another-family",
        lambda i: _family_pairs(
            i, _tiny(i, "sd3"), "--model.init_args.solver=auto", "--model.init_args.latent_shape=[4,8,8]"
        ),
        ("latent shape [4, 8, 8] does not fit", "[16, H, W]"),
    ),
    BadInput(
        "solver-of-another-family",
        lambda i: _family_pairs(i, _tiny(i, "sd3"), "--model.init_args.solver=ddim"),
        ("solver 'ddim' does not fit a Stable Diffusion 3 teacher", "euler"),
    ),
    # configs and the command line
    BadInput("unknown-yaml-key", _unknown_yaml_key, ("model.init_args", "'t_distributon' is not accepted", "spelling")),
    BadInput("unknown-trainer-key", _unknown_trainer_key, ("'trainer.max_stepz'", "check the spelling")),
    BadInput("unknown-option", lambda i: i.fit("--trainer.max_stepz=3"), ("--trainer.max_stepz=3", "spelling")),
    BadInput("wrong-type", _wrong_type, ("data.init_args.batch_size must be of type int", "'sixteen'", "fix the")),
    BadInput(
        "zero-batch-size",
        lambda i: i.fit("--data.init_args.batch_size=0"),
        ("data.batch_size must be >= 1, got 0", "set data.init_args.batch_size"),
    ),
    BadInput(
        "negative-batch-size",
        lambda i: i.pairs("--data.init_args.batch_size=-4"),
        ("batch_size must be >= 1, got -4", "to 1 or more"),
    ),
    BadInput("negative-guidance", lambda i: i.pairs("--model.init_args.guidance=-1"), ("guidance must be >= 0",)),
    BadInput("val-fraction-out-of-range", lambda i: i.fit("--data.init_args.val_fraction=1.5"), ("val_fraction",)),
    # checkpoints and models
    BadInput(
        "missing-checkpoint",
        lambda i: i.fit(f"--ckpt_path={i.case / 'nowhere.ckpt'}"),
        ("checkpoint not found", "nowhere.ckpt", "give a .ckpt file"),
    ),
    BadInput(
        "checkpoint-of-another-module",
        _checkpoint_of_another_module,
        ("written by ReflowModule, not DistillModule", "resume it with ReflowModule"),
    ),
    BadInput("not-a-checkpoint", _not_a_checkpoint, ("notes.ckpt is not a readable checkpoint", "give a .ckpt file")),
    BadInput(
        "checkpoint-of-another-version",
        _checkpoint_of_another_version,
        ("other-version.ckpt do not parse", "renamed_option are not accepted by ReflowModule", "start from an export"),
    ),
    BadInput("truncated-checkpoint", _truncated_checkpoint, ("cut.ckpt is not a readable checkpoint", "truncated")),
    BadInput(
        "missing-model-folder",
        lambda i: i.fit(base=i.case / "no-such-model"),
        ("model folder not found", "no-such-model", "make tiny"),
    ),
    # data
    BadInput("truncated-shard", _truncated_shard, ("shard-000001.bin is corrupt", "regenerate the dataset")),
    BadInput(
        "shard-of-another-dataset",
        _shard_of_another_dataset,
        ("shard-000001.bin does not belong to this dataset", "put the original back"),
    ),
    BadInput("manifest-missing", _manifest_missing, ("manifest.json not found", "run pair generation first")),
    BadInput("unfinished-dataset", _unfinished_dataset, ("has no index.json", "rerun the same pairs command")),
    BadInput("no-dataset", _no_dataset, ("no-such-pairs", "run pair generation first")),
    BadInput("wrong-latent-shape", _wrong_latent_shape, ("have shape [3, 8, 8]", "generate pairs with")),
    BadInput(
        "empty-prompt-file",
        lambda i: i.pairs(prompts=_write(i.case / "empty.txt", "")),
        ("empty.txt holds no prompts", "add one prompt per line"),
    ),
    BadInput(
        "undecodable-prompt-file",
        lambda i: i.pairs(prompts=_write(i.case / "latin1.txt", "une photo d'un ch\xe2teau\n".encode("latin-1"))),
        ("latin1.txt is not UTF-8 text", "re-encode it as UTF-8"),
    ),
    BadInput(
        "missing-prompt-file",
        lambda i: i.pairs(prompts=i.case / "prompts-missing.txt"),
        ("prompt file not found", "prompts-missing.txt", "check the path"),
    ),
    # weights of the metrics and losses (never downloaded)
    BadInput(
        "missing-lpips-weights",
        _missing_lpips_weights,
        ("LPIPS needs", "vgg16-397923af.pth", "copy the file there"),
        env={"TORCH_HOME": "{case}/torch-home"},
    ),
    BadInput(
        "missing-inception-weights",
        lambda i: i.fit(
            "--trainer.callbacks.init_args.fid_features=null",
            f"--trainer.callbacks.init_args.inception_weights={i.case / 'pt_inception.pth'}",
        ),
        ("FID Inception weights", "pt_inception.pth not found", "put the file there"),
    ),
    BadInput(
        "missing-clip-weights",
        lambda i: i.fit(f"--trainer.callbacks.init_args.clip_model={i.case / 'clip'}"),
        ("CLIP model folder", "not found", "put a CLIP model saved with save_pretrained there"),
    ),
    # where results go
    BadInput(
        "output-folder-not-writable",
        lambda i: i.pairs(out=_write(i.case / "a-file", "keep me") / "out"),  # below a file: even root cannot
        ("cannot write to output folder", "a-file/out", "choose a writable one"),
    ),
]


def test_the_catalog_holds_the_issue_list_and_more():
    ids = [case.id for case in CATALOG]
    assert len(ids) == len(set(ids)) and len(ids) >= 15
    required = {
        "unknown-yaml-key", "wrong-type", "missing-checkpoint", "checkpoint-of-another-module", "truncated-shard",
        "shard-of-another-dataset", "manifest-missing", "wrong-latent-shape", "empty-prompt-file",
        "undecodable-prompt-file", "missing-lpips-weights", "missing-inception-weights", "missing-clip-weights",
        "output-folder-not-writable", "zero-batch-size", "negative-batch-size", "negative-guidance",
    }  # fmt: skip
    assert required <= set(ids), required - set(ids)


@pytest.fixture(scope="module")
def shared(tiny_sd, tiny_velocity, tmp_path_factory) -> Inputs:
    """The good inputs every case starts from, and a ReflowModule checkpoint from a one-step fit."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_dataset(root / "pairs", count=16, shard_size=8)
    prompts = _write(root / "prompts.txt", "a photo of a cat\na red car\n")
    run = root / "reflow-run"
    code = _main(
        ["fit", "--config", str(REFLOW), f"--model.init_args.base_model={tiny_sd}", f"--data.init_args.path={data}",
         f"--trainer.default_root_dir={run}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    )  # fmt: skip
    assert code == 0
    return Inputs(tiny_sd, tiny_velocity, data, run / "checkpoints" / "last.ckpt", prompts, root)


def _main(args: list[str]) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CATALOG, ids=[case.id for case in CATALOG])
def test_bad_input_is_one_clear_line_and_loses_nothing(case: BadInput, shared: Inputs, tmp_path, capsys, monkeypatch):
    inputs = Inputs(**{**shared.__dict__, "case": tmp_path})
    for name, value in case.env.items():
        monkeypatch.setenv(name, value.format(case=tmp_path))
    args = case.args(inputs)
    before = {"case": _files(tmp_path), "data": _files(shared.data), "ckpt": shared.reflow_ckpt.read_bytes()}
    capsys.readouterr()

    code = _main(args)

    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-3000:]
    line = errors[0]
    assert line.startswith("instaflow-pl: error: ") and len(line) < 500, line
    for fragment in case.says:
        assert fragment in line, f"{fragment!r} not in: {line}"
    after = _files(tmp_path)
    assert {k: after.get(k) for k in before["case"]} == before["case"], "a file the case started with changed"
    assert _files(shared.data) == before["data"] and shared.reflow_ckpt.read_bytes() == before["ckpt"]


def test_a_too_long_prompt_is_one_warning(shared: Inputs, tmp_path, capsys):
    """Truncated to the tokenizer's length with one warning; not an error, and the dataset is written."""
    prompts = _write(tmp_path / "long.txt", "a photo of " + "a very long description " * 40 + "\na cat\n")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = _main(shared.pairs("--data.init_args.repeats=2", "--model.init_args.steps=2", prompts=prompts, out=out))
    assert code == 0, capsys.readouterr().err[-3000:]
    truncations = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(truncations) == 1, truncations
    assert "error" not in capsys.readouterr().err.lower()
    assert json.loads((out / "manifest.json").read_text())["count"] == 4
