"""DMDModule on the tiny SD folders: zero generator gradient at the start (fake score = teacher), a short fit with the
update ratio, exact resume (both optimizers, the update counter, the seeded noise), the export as a one-step student,
the GAN head (stage 2) and the paired regression term, LoRA on both networks, and one line for each bad option."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from instaflow_pl.data import ImagePromptDataModule, TriplesDataModule
from instaflow_pl.errors import UserError
from instaflow_pl.modules import DMDModule
from instaflow_pl.modules.dmd import DiffusionParametrisation, FlowParametrisation
from instaflow_pl.modules.dmd_gan import generator_gan_loss
from instaflow_pl.tiny import build_tiny_images

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


def _fit(module: DMDModule, data, root, steps: int, ckpt_path=None, datamodule=None) -> L.Trainer:
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
    datamodule = datamodule or TriplesDataModule(str(data), batch_size=4, val_fraction=0.0)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
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
        ({"generator_every": -3}, "generator_every must be >= 1"),
        ({"gan_critic_weight": -1.0}, "gan_critic_weight must be >= 0"),
        ({"regression_weight": -0.5}, "regression_weight must be >= 0"),
        ({"gan_t_min": 1.5}, "gan_t_min must be in"),
        ({"gan_real": "images"}, "gan_real must be one of data, pairs"),
    ],
)
def test_bad_dmd_options_are_one_line(tiny_velocity, options, message):
    with pytest.raises(UserError, match=message) as error:
        dmd(tiny_velocity, **options)
    assert "\n" not in str(error.value)


def _resume_matches(make, data, tmp_path, steps: int = 4) -> tuple[DMDModule, L.Trainer]:
    """Fit ``make()`` for ``steps``, resume another from the step-2 checkpoint, assert every trained tensor and
    optimizer state agree exactly; (the uninterrupted module, its trainer)."""
    whole = make()
    trainer = _fit(whole, data, tmp_path / "whole", steps=steps)
    resumed = make()
    again = _fit(resumed, data, tmp_path / "resumed", steps, tmp_path / "whole/checkpoints/epoch=0-step=2.ckpt")
    assert again.global_step == steps and resumed.generator_updates == whole.generator_updates
    expected, got = _state(whole, trainer), _state(resumed, again)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, differing[:5]
    return whole, trainer


def test_the_gan_term_reaches_the_generator_while_the_dmd_gradient_is_zero(tiny_velocity):
    """At construction the DMD gradient is 0 (fake score = teacher, no guidance): the generator's gradient is then
    the GAN term's alone, through the fake score's bottleneck and the head."""
    module = dmd(tiny_velocity, real_guidance=1.0, gan_generator_weight=1.0, gan_critic_weight=0.01)
    assert module.gan_head is not None
    cond = module.condition(PROMPTS)
    x = module.generate(torch.randn(4, 4, 8, 8), cond, grad=True)
    loss = module.generator_loss(x, cond).loss + generator_gan_loss(module.gan_logits(x, cond)).mean()
    loss.backward()
    grads = [p.grad for p in module.velocity.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) > 0
    assert all(p.grad is not None for p in module.gan_head.parameters())


def test_gan_stage_resumes_exactly_and_trains_the_head_with_the_fake_score(tiny_velocity, tmp_path):
    """gan_real: pairs (the triples' X1 as the real side): both GAN terms run, the head's parameters are in the fake
    score's optimizer and its checkpoints, and a resumed fit equals the uninterrupted one."""
    data = write_dataset(tmp_path / "data", count=16)
    options = {"gan_generator_weight": 1e-3, "gan_critic_weight": 1e-2, "gan_real": "pairs"}

    def make() -> DMDModule:
        torch.manual_seed(0)  # the head's initial weights
        return dmd(tiny_velocity, **options)

    head_before = make().gan_head.state_dict()
    whole, trainer = _resume_matches(make, data, tmp_path)
    metrics = trainer.callback_metrics
    for name in ("train/gan_generator_loss", "train/gan_critic_loss", "train/dmd_loss", "train/critic_real"):
        assert torch.isfinite(metrics[name]), name
    head = whole.gan_head.state_dict()
    assert any(not torch.equal(head[k], head_before[k]) for k in head), "the critic trained the head"
    fake_params = {id(p) for group in trainer.optimizers[1].param_groups for p in group["params"]}
    assert {id(p) for p in whole.gan_head.parameters()} <= fake_params
    state = torch.load(tmp_path / "whole/checkpoints/epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("gan_head.") for k in state)


def test_gan_stage_on_images_encodes_them_as_the_real_side(tiny_velocity, tmp_path):
    """Images + prompts (ImagePromptDataModule, encode_images): the real side of the critic is their VAE latents."""
    data = ImagePromptDataModule(str(build_tiny_images(tmp_path / "images", count=8)), resolution=16, batch_size=4)
    module = dmd(tiny_velocity, encode_images=True, gan_generator_weight=1e-3, gan_critic_weight=1e-2)
    trainer = _fit(module, None, tmp_path / "run", steps=3, datamodule=data)
    assert trainer.global_step == 3 and module.generator_updates == 2
    assert torch.isfinite(trainer.callback_metrics["train/gan_critic_loss"])
    state = torch.load(tmp_path / "run/checkpoints/epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("vae.") for k in state), "the VAE comes from base_model"


def test_a_gan_weight_without_real_images_is_one_line(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=8)
    with pytest.raises(UserError, match="gan_critic_weight > 0 need real images.*ImagePromptDataModule") as error:
        _fit(dmd(tiny_velocity, gan_critic_weight=1e-2), data, tmp_path / "run", steps=2)
    assert "\n" not in str(error.value)


def test_stage_two_starts_from_stage_ones_weights(tiny_velocity, tmp_path):
    """init_from: the generator, its EMA and the fake score of a stage-1 checkpoint; the new GAN head starts fresh."""
    data = write_dataset(tmp_path / "data", count=8)
    stage1 = dmd(tiny_velocity)
    _fit(stage1, data, tmp_path / "stage1", steps=2)
    ckpt = tmp_path / "stage1/checkpoints/epoch=0-step=2.ckpt"
    stage2 = dmd(tiny_velocity, init_from=str(ckpt), gan_critic_weight=1e-2, gan_real="pairs")
    for prefix in ("velocity.", "ema.", "fake_score."):
        mine = {k: v for k, v in stage2.state_dict().items() if k.startswith(prefix)}
        theirs = stage1.state_dict()
        assert mine and all(torch.equal(v, theirs[k]) for k, v in mine.items()), prefix
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["fake_score.extra"] = torch.zeros(1)
    torch.save(state, other)
    with pytest.raises(UserError, match="does not fit this DMD run"):
        dmd(tiny_velocity, init_from=str(other))


# ---- the paired regression term (original DMD) ----------------------------------------------------------------------


def test_regression_term_is_the_one_step_distance_to_the_stored_x1(tiny_velocity, tmp_path):
    """The generator's one Euler step from the batch's X0, X0 + v(X0, 0), against its X1: the l2 distance; with the
    DMD gradient 0 at construction the generator's gradient is the weighted regression's."""
    data = TriplesDataModule(str(write_dataset(tmp_path / "data", count=8)), batch_size=4, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = dmd(tiny_velocity, real_guidance=1.0, regression_weight=0.5)
    cond = module.condition(batch.prompts)
    with torch.no_grad():
        one_step = batch.x0 + module.velocity(batch.x0, torch.zeros(len(batch)), cond)
    expected = (one_step - batch.x1).pow(2).flatten(1).mean(1).mean()
    loss = module.regression_loss(batch, cond)
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
    _fit(module, None, tmp_path / "run", steps=2, datamodule=data)


def test_regression_without_stored_x0_is_one_line(tiny_velocity, tmp_path):
    data = ImagePromptDataModule(str(build_tiny_images(tmp_path / "images", count=8)), resolution=16, batch_size=4)
    with pytest.raises(UserError, match="regression_weight > 0 needs triples") as error:
        _fit(dmd(tiny_velocity, encode_images=True, regression_weight=1.0), None, tmp_path / "run", 2, datamodule=data)
    assert "\n" not in str(error.value)


# ---- the teacher must be frozen --------------------------------------------------------------------------------------


def test_a_teacher_that_requires_grad_is_one_line(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=8)
    module = dmd(tiny_velocity)
    module.teacher.requires_grad_(True)
    with pytest.raises(UserError, match=r"teacher \(real score\) must be frozen, but \d+ of its parameters") as error:
        _fit(module, data, tmp_path / "run", steps=1)
    assert "\n" not in str(error.value)


def test_a_teacher_that_is_the_generators_own_module_is_one_line(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=8)
    module = dmd(tiny_velocity)
    module.teacher.model = module.velocity  # the real score would move with the generator
    with pytest.raises(UserError, match="shares .* parameters with the generator") as error:
        _fit(module, data, tmp_path / "run", steps=1)
    assert "\n" not in str(error.value)


# ---- LoRA on the generator and the fake score -----------------------------------------------------------------------


def test_lora_on_both_networks_trains_adapters_only_resumes_exactly_and_exports(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "data", count=16)
    options = {"lora": {"rank": 2, "alpha": 3.0}, "fake_lora": {"rank": 2, "alpha": 2.0}}
    before = dmd(tiny_velocity, **options)
    for network in (before.velocity, before.fake_score):
        trainable = [n for n, p in network.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    whole, trainer = _resume_matches(lambda: dmd(tiny_velocity, **options), data, tmp_path)
    for optimizer in trainer.optimizers:
        names = {id(p): n for n, p in whole.named_parameters()}
        assert all("lora_" in names[id(p)] for g in optimizer.param_groups for p in g["params"])
    ckpt = tmp_path / "whole/checkpoints/epoch=0-step=4.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    networks = [k for k in state if k.startswith(("velocity.", "fake_score."))]
    assert networks and all("lora_" in k for k in networks), "frozen base weights stay out of checkpoints"
    trained = {k: v for k, v in whole.state_dict().items() if "lora_" in k}
    initial = before.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in trained.items() if k.startswith("velocity."))
    assert any(not torch.equal(v, initial[k]) for k, v in trained.items() if k.startswith("fake_score."))

    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.teachers import load_teacher

    export_checkpoint(ckpt, tmp_path / "export")
    x0 = torch.randn(2, 4, 8, 8)
    exported = load_teacher(tmp_path / "export", steps=1).sample(x0, PROMPTS[:2]).x
    with torch.no_grad():
        ours = whole.sample(x0, PROMPTS[:2], steps=1).x
    assert torch.allclose(exported, ours, atol=1e-5), (exported - ours).abs().max()

    export_checkpoint(ckpt, tmp_path / "lora", lora_format="file")
    from safetensors.torch import load_file

    adapters = load_file(tmp_path / "lora/pytorch_lora_weights.safetensors")
    generator_adapters = [k for k in state if k.startswith("velocity.") and "lora_" in k]
    assert len(adapters) == len(generator_adapters), "the generator's adapters, not the fake score's"
