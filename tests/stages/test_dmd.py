"""DMDModule on the tiny SD folders: zero generator gradient at the start (fake score = teacher), a short fit with the
update ratio, exact resume (both optimizers, the update counter, the seeded noise), the export as a one-step student,
and one line for each bad option."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from instaflow_pl.data import TriplesDataModule
from instaflow_pl.errors import UserError
from instaflow_pl.modules import DMDModule
from instaflow_pl.modules.dmd import DiffusionParametrisation, FlowParametrisation

PROMPTS = ["a cat", "a dog", "a red car", "a house"]


def dmd(base, teacher=None, **options) -> DMDModule:
    options = {"ema_decay": 0.9, "generator_every": 2, "val_steps": [1], **options}
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    return DMDModule(str(base), teacher=None if teacher is None else str(teacher), optimizer=optimizer, **options)


@pytest.mark.parametrize(
    ("teacher", "param"), [("tiny_velocity", FlowParametrisation), ("tiny_sd", DiffusionParametrisation)]
)
def test_generator_gradient_is_zero_while_the_fake_score_is_the_teacher(tiny_velocity, teacher, param, request):
    """At construction the fake score is a copy of the teacher: without guidance the generator's gradient is 0."""
    module = dmd(tiny_velocity, request.getfixturevalue(teacher), real_guidance=1.0)
    assert isinstance(module.param, param)
    cond = module.condition(PROMPTS)
    x = module.generate(torch.randn(4, 4, 8, 8), cond, grad=True)
    module.generator_loss(x, cond).loss.backward()
    grads = [p.grad for p in module.velocity.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) == 0.0
    assert all(not p.requires_grad for p in module.teacher.parameters())


def _fit(module: DMDModule, data, root, steps: int, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(module, TriplesDataModule(str(data), batch_size=4, val_fraction=0.0), ckpt_path=ckpt_path)
    return trainer


def _state(module: DMDModule, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith(("teacher.", "encoder."))}
    for i, optimizer in enumerate(trainer.optimizers):
        for j, entry in enumerate(optimizer.state_dict()["state"].values()):
            state.update({f"opt{i}.{j}.{k}": v.clone() for k, v in entry.items() if torch.is_tensor(v)})
    return state


def test_fit_resumes_exactly_and_exports_a_one_step_student(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=16)
    whole = dmd(tiny_velocity)
    trainer = _fit(whole, data, tmp_path / "whole", steps=4)
    assert trainer.global_step == 4 and whole.generator_updates == 2  # iterations 0 and 2 update the generator
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/fake_loss"]) and torch.isfinite(metrics["train/generator_loss"])
    checkpoint = torch.load(tmp_path / "whole/checkpoints/epoch=0-step=2.ckpt", weights_only=True)
    assert checkpoint["dmd"] == {"generator_updates": 1}
    assert not [k for k in checkpoint["state_dict"] if k.startswith(("teacher.", "encoder."))]
    assert any(k.startswith("fake_score.") for k in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2

    resumed = dmd(tiny_velocity)
    again = _fit(resumed, data, tmp_path / "resumed", 4, tmp_path / "whole/checkpoints/epoch=0-step=2.ckpt")
    assert again.global_step == 4 and resumed.generator_updates == 2
    expected, got = _state(whole, trainer), _state(resumed, again)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, differing[:5]

    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.teachers import load_teacher

    out = tmp_path / "export"
    export_checkpoint(tmp_path / "whole/checkpoints/epoch=0-step=4.ckpt", out)
    info = json.loads((out / "instaflow.json").read_text())
    assert info["module"] == "DMDModule" and info["stage"] == "dmd" and info["student_steps"] == 1
    x0 = torch.randn(2, 4, 8, 8)
    exported = load_teacher(out, steps=1).sample(x0, PROMPTS[:2]).x
    with torch.no_grad():
        trained = whole.sample(x0, PROMPTS[:2], steps=1).x  # the EMA weights, as the export holds
    assert torch.allclose(exported, trained, atol=1e-5), (exported - trained).abs().max()


def test_fake_score_lora_trains_adapters_and_checkpoints_leave_its_base_out(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=8)
    module = dmd(tiny_velocity, fake_lora={"rank": 2, "alpha": 2})
    trainable = [n for n, p in module.fake_score.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _fit(module, data, tmp_path / "run", steps=2)
    state = torch.load(tmp_path / "run/checkpoints/epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    fake = [k for k in state if k.startswith("fake_score.")]
    assert fake and all("lora_" in k for k in fake)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"generator_every": 0}, "generator_every must be >= 1"),
        ({"t_min": 0.5, "t_max": 0.2}, "0 <= t_min < t_max <= 1"),
        ({"real_guidance": -1.0}, "real_guidance must be >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"warmup_steps": 10}, "constant learning rates"),
    ],
)
def test_bad_dmd_options_are_one_line(tiny_velocity, options, message):
    with pytest.raises(UserError, match=message) as error:
        dmd(tiny_velocity, **options)
    assert "\n" not in str(error.value)
