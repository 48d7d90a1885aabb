"""ReflowModule and DistillModule: losses, t-distributions, distances, EMA, checkpoints, clear errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import write_dataset
from torch import nn

from instaflow_pl.conventions import noise_from_seed, sample_seed
from instaflow_pl.data import PairRecord, PairStore, TripleBatch, TriplesDataModule
from instaflow_pl.data.synthetic import random_triples_manifest
from instaflow_pl.errors import UserError
from instaflow_pl.modules import DistillModule, ReflowModule
from instaflow_pl.modules.losses import Distance, LPIPSDistance, l2_distance, pseudo_huber_distance
from instaflow_pl.modules.reflow import interpolate
from instaflow_pl.modules.timesampling import sample_t
from instaflow_pl.tiny import build_tiny_images


class ConstantVelocity(nn.Module):
    """v(x, t, cond) = c, a learnable constant field: its flow is a straight line X0 -> X0 + c."""

    def __init__(self, shape=(4, 8, 8)):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(shape))

    def forward(self, x, t, cond):
        return self.c.expand_as(x)


def trainer(tmp_path, max_steps, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


def test_interpolation_runs_from_noise_at_0_to_data_at_1():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.0, 1.0])), torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.allclose(interpolate(x0, x1, torch.tensor([0.25, 0.25])), torch.full((2, 3), 0.25))


def test_t_distributions():
    torch.manual_seed(0)
    uniform, logit, u_shaped = (sample_t(n, 200_000) for n in ("uniform", "logit_normal", "u_shaped"))
    for t in (uniform, logit, u_shaped):
        assert 0.0 <= t.min() and t.max() <= 1.0
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(logit.mean() - 0.5) < 0.01 and abs(u_shaped.mean() - 0.5) < 0.01
    # cosh(4 (t - 1/2)) puts cosh(2) / 1 = 3.76 times more density at the ends than in the middle.
    ends = ((u_shaped < 0.05) | (u_shaped > 0.95)).float().mean()
    middle = ((u_shaped > 0.45) & (u_shaped < 0.55)).float().mean()
    assert 3.0 < ends / middle < 4.2, (ends / middle).item()
    assert ((logit > 0.45) & (logit < 0.55)).float().mean() > ((logit < 0.05) | (logit > 0.95)).float().mean()
    with pytest.raises(UserError, match="unknown t distribution 'beta'"):
        sample_t("beta", 3)


def test_reflow_loss_is_zero_for_the_straight_field(tiny_sd):
    module = ReflowModule(str(tiny_sd), velocity=ConstantVelocity(), ema_decay=0.0)
    shift = torch.randn(4, 8, 8)
    x0 = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        module.velocity.c.copy_(shift)
    batch = TripleBatch(x0, x0 + shift, ["a"] * 5, torch.arange(5))
    out = module.compute_loss(batch, module.condition(batch.prompts))
    assert out.loss.item() < 1e-10 and out.t.shape == (5,)
    with torch.no_grad():
        module.velocity.c.zero_()
    assert math.isclose(module.compute_loss(batch, module.condition(batch.prompts)).loss.item(),
                        shift.pow(2).mean().item(), rel_tol=1e-5)  # fmt: skip


def test_reflow_learns_the_straight_field_and_logs_losses_by_t(tiny_sd, tmp_path):
    """Triples X1 = X0 + shift: training recovers the shift; the EMA follows; mse@1 falls to ~0."""
    shift = torch.linspace(-1, 1, 4 * 8 * 8).view(4, 8, 8)
    manifest = random_triples_manifest(64, (4, 8, 8), shard_size=16)
    store = PairStore(tmp_path / "d", manifest)
    store.open()
    for shard in range(manifest.num_shards):
        records = []
        for i in manifest.shard_range(shard):
            x0 = noise_from_seed(sample_seed(manifest.seed, i), (4, 8, 8))
            records.append(PairRecord(i, sample_seed(manifest.seed, i), f"p{i}", x0 + shift))
        store.write_shard(shard, records)
    store.finalize()
    data = TriplesDataModule(str(tmp_path / "d"), batch_size=16, val_fraction=0.25)
    module = ReflowModule(
        str(tiny_sd), velocity=ConstantVelocity(), ema_decay=0.5, val_steps=[1, 4],
        optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
    )  # fmt: skip
    fit = trainer(tmp_path, 150, log_every_n_steps=1)
    fit.fit(module, datamodule=data)
    assert torch.allclose(module.velocity.c, shift, atol=0.05)
    assert {"train/loss_t0.00-0.25", "train/loss_t0.75-1.00"} <= set(fit.logged_metrics)
    metrics = fit.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/mse@1"] < 1e-3 and metrics["val/straightness"] < 1e-6
    with module.sampling_weights() as averaged:
        ema_c = averaged.c.clone()
    assert not torch.equal(ema_c, module.velocity.c)


def test_distill_student_is_x0_plus_velocity_at_t0(tiny_velocity):
    module = DistillModule(str(tiny_velocity), ema_decay=0.0)
    batch = TripleBatch(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), ["a cat", "a dog"], torch.arange(2))
    cond = module.condition(batch.prompts)
    expected = batch.x0 + module.velocity(batch.x0, torch.zeros(2), cond)
    out = module.compute_loss(batch, cond)
    assert torch.allclose(out.per_sample, l2_distance(expected, batch.x1), atol=1e-6)
    assert out.loss.requires_grad


def test_distances():
    a, b = torch.zeros(2, 4), torch.full((2, 4), 2.0)
    assert torch.equal(l2_distance(a, b), torch.tensor([4.0, 4.0]))
    assert torch.allclose(pseudo_huber_distance(a, b, c=0.5), torch.tensor([math.sqrt(4.25) - 0.5] * 2))
    assert torch.allclose(pseudo_huber_distance(a, a + 1e-4, c=1.0), torch.zeros(2), atol=1e-8)
    terms = Distance({"l2": 2.0, "huber": 1.0}, huber_c=0.5)(a, b)
    assert torch.allclose(terms["total"], 2.0 * terms["l2"] / 2.0 + terms["huber"])
    with pytest.raises(UserError, match="unknown distance"):
        Distance({"l1": 1.0})


def test_lpips_on_decoded_latents_and_missing_weights(tiny_sd, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    distance = LPIPSDistance(vae, net="alex", pretrained=False)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(distance(x, x), torch.zeros(2), atol=1e-6)
    assert (distance(x, torch.randn(2, 4, 8, 8)) > 0).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UserError, match=r"LPIPS needs .*torch-home/hub/checkpoints/vgg16-397923af.pth"):
        LPIPSDistance(vae, net="vgg", pretrained=True)
    with pytest.raises(UserError, match=r"alexnet-owt-7be5be79.pth"):
        DistillModule(str(tiny_sd), distance={"lpips": 1.0}, lpips_net="alex")


def test_distill_with_lpips_trains(tiny_velocity, tmp_path):
    root = write_dataset(tmp_path / "d", count=16, shard_size=16)
    module = DistillModule(
        str(tiny_velocity), distance={"l2": 1.0, "lpips": 0.5}, lpips_net="alex", lpips_pretrained=False,
        ema_decay=0.0, val_steps=[1],
    )  # fmt: skip
    fit = trainer(tmp_path, 2, limit_val_batches=0)
    fit.fit(module, datamodule=TriplesDataModule(str(root), batch_size=8))
    assert {"train/distance_l2", "train/distance_lpips"} <= set(fit.logged_metrics)


def test_checkpoint_leaves_out_the_text_encoder_and_refuses_another_module_kind(tiny_sd, tiny_velocity, tmp_path):
    root = write_dataset(tmp_path / "d", count=16, shard_size=16)
    module = ReflowModule(str(tiny_sd), ema_decay=0.9, val_steps=[1])
    fit = trainer(tmp_path, 2)
    fit.fit(module, datamodule=TriplesDataModule(str(root), batch_size=8, val_fraction=0.5))
    path = tmp_path / "reflow.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain types only: no pickle needed to read it
    assert checkpoint["instaflow_pl"]["module"] == "ReflowModule"
    assert not any(k.startswith("encoder.") for k in checkpoint["state_dict"])
    assert any(k.startswith("ema.module.network.") for k in checkpoint["state_dict"])
    again = ReflowModule.load_from_checkpoint(path, base_model=str(tiny_sd))
    key = "ema.module.network.conv_in.weight"
    assert torch.equal(again.state_dict()[key], module.state_dict()[key])
    with pytest.raises(UserError, match="written by ReflowModule, not DistillModule"):
        trainer(tmp_path, 3).fit(
            DistillModule(str(tiny_velocity)), datamodule=TriplesDataModule(str(root), batch_size=8), ckpt_path=path
        )


def test_latent_shape_mismatch_is_refused_before_training(tiny_sd, tmp_path):
    root = write_dataset(tmp_path / "d", count=16, shard_size=16, shape=(3, 8, 8))
    with pytest.raises(UserError, match=r"have shape \[3, 8, 8\], but the model's network takes \[4, H, W\]"):
        trainer(tmp_path, 1).fit(ReflowModule(str(tiny_sd)), datamodule=TriplesDataModule(str(root), batch_size=8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t_distribution": "gamma"}, "unknown t distribution 'gamma'"),
        ({"val_guidance": -1.0}, "val_guidance must be >= 0"),
        ({"val_steps": [0, 4]}, "val_steps must be step counts >= 1"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"freeze": ["network."]}, None),
        ({"freeze": ["unet."]}, None),  # the network's name before the rename still names it
    ],
)
def test_bad_module_options(tiny_sd, kwargs, message):
    if message is None:  # freezing everything is only caught when the optimizer is built
        module = ReflowModule(str(tiny_sd), **kwargs)
        with pytest.raises(UserError, match="every velocity parameter is frozen"):
            module.configure_optimizers()
        return
    with pytest.raises(UserError, match=message):
        ReflowModule(str(tiny_sd), **kwargs)


def test_zero_student_steps_is_refused(tiny_velocity):
    with pytest.raises(UserError, match="student_steps must be >= 1"):
        DistillModule(str(tiny_velocity), student_steps=0)


def test_ema_follows_the_decay_formula():
    from instaflow_pl.modules.ema import EMA

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)  # the first update copies
    assert torch.equal(ema.state_dict()["module.0.weight"], model[0].weight)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    state = ema.state_dict()
    assert torch.allclose(state["module.0.weight"], torch.full((2, 3), 0.9 * 1.0 + 0.1 * 3.0))
    assert state["module.1.num_batches_tracked"].item() == 7 and ema.n_averaged.item() == 2
    with ema.swapped_into(model) as averaged:  # the average in the model itself, then the weights back
        assert torch.allclose(averaged[0].weight, torch.full((2, 3), 1.2))
    assert torch.equal(model[0].weight, torch.full((2, 3), 3.0)) and model[0].weight.requires_grad


def test_ema_averages_trainable_parameters_only():
    from instaflow_pl.modules.ema import EMA

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert sorted(k for k in ema.state_dict() if k.startswith("module.")) == ["module.1.bias", "module.1.weight"]
    assert ema.numel() == 6
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict() | {"module.0.weight": torch.zeros(2, 3)})  # format 1 kept frozen ones
    with pytest.raises(RuntimeError, match="Missing key"):
        restored.load_state_dict({"n_averaged": torch.tensor(1)})


def test_one_rectified_flow_from_images_with_fresh_noise(tiny_sd, tmp_path):
    """Images + prompts, no pairs: X0 is fresh noise each step, X1 the VAE latents; validation uses fixed noises."""
    from instaflow_pl.data import ImagePromptDataModule

    folder = build_tiny_images(tmp_path / "images", count=12)
    data = ImagePromptDataModule(str(folder), resolution=16, batch_size=4, val_fraction=0.25)
    module = ReflowModule(str(tiny_sd), encode_images=True, ema_decay=0.0, val_steps=[1, 2])
    data.setup("fit")
    batch = module.to_latents(next(iter(data.train_dataloader())))
    assert batch.x0 is None and batch.x1.shape == (4, 4, 8, 8)
    torch.manual_seed(0)
    first = module.compute_loss(batch, module.condition(batch.prompts)).loss
    torch.manual_seed(1)
    second = module.compute_loss(batch, module.condition(batch.prompts)).loss
    assert first != second  # fresh noise (and t) each call
    fit = trainer(tmp_path, 3, limit_val_batches=1)
    fit.fit(module, datamodule=data)
    assert "val/mse@1" in fit.callback_metrics and torch.isfinite(fit.callback_metrics["val/mse@1"])
    fit.save_checkpoint(tmp_path / "rf1.ckpt")
    saved = torch.load(tmp_path / "rf1.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("vae.", "encoder.")) for k in saved), "frozen parts come from base_model"


def test_image_folder_errors(tmp_path):
    from instaflow_pl.data import ImagePromptDataModule

    with pytest.raises(UserError, match="metadata.jsonl not found"):
        ImagePromptDataModule(str(tmp_path)).setup("fit")
    folder = build_tiny_images(tmp_path / "images", count=2)
    (folder / "00001.png").unlink()
    with pytest.raises(UserError, match=r"image .*00001.png .* not found"):
        ImagePromptDataModule(str(folder)).setup("fit")


class NaNAtCall(ConstantVelocity):
    """A constant field that returns NaN on its n-th call (a blow-up in the middle of training)."""

    def __init__(self, nan_call: int):
        super().__init__()
        self.calls, self.nan_call = 0, nan_call

    def forward(self, x, t, cond):
        self.calls += 1
        out = super().forward(x, t, cond)
        return out * float("nan") if self.calls == self.nan_call else out


def test_nonfinite_loss_stops_with_the_step_and_samples_and_keeps_the_last_good_checkpoint(tiny_sd, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = write_dataset(tmp_path / "d", count=32, shard_size=16)
    module = ReflowModule(str(tiny_sd), velocity=NaNAtCall(4), ema_decay=0.0, val_steps=[1])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    fit = trainer(tmp_path, 10, limit_val_batches=0, callbacks=[checkpoints])
    with pytest.raises(UserError, match=r"non-finite loss at step 3 on the batch of samples \[\d+, \d+, \d+, \d+\]"):
        fit.fit(module, datamodule=TriplesDataModule(str(root), batch_size=4, shuffle=False))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_can_skip_the_batch(tiny_sd, tmp_path):
    root = write_dataset(tmp_path / "d", count=32, shard_size=16)
    module = ReflowModule(str(tiny_sd), velocity=NaNAtCall(2), ema_decay=0.5, val_steps=[1], on_nonfinite="skip")
    fit = trainer(tmp_path, 5, limit_val_batches=0)
    with pytest.warns(UserWarning, match="non-finite loss at step 1 .* batch skipped"):
        fit.fit(module, datamodule=TriplesDataModule(str(root), batch_size=4))
    assert module.skipped_batches == 1
    assert torch.isfinite(module.velocity.c).all() and torch.isfinite(module.ema.state_dict()["module.c"]).all()


class HugeLossReflow(ReflowModule):
    """Reflow whose loss is scaled by 1e6, so every gradient is far above any clipping threshold."""

    def compute_loss(self, batch, cond):
        out = super().compute_loss(batch, cond)
        out.loss = out.loss * 1e6
        return out


def _fused_adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradient_clipping_clips_with_a_fused_optimizer(tiny_sd, tmp_path, precision):
    """The recipes' combination (fused AdamW, clipping at 1.0, bf16-mixed) steps, and the step uses the clipped
    gradient: after one AdamW step, exp_avg = (1 - beta1) * gradient, whose global norm is then 0.1 * 1.0."""
    data = TriplesDataModule(write_dataset(tmp_path / "pairs", count=8), batch_size=4)
    module = HugeLossReflow(tiny_sd, velocity=ConstantVelocity(), optimizer=_fused_adamw, ema_decay=0.0)
    trainer(tmp_path, 1, precision=precision, gradient_clip_val=1.0, limit_val_batches=0).fit(module, data)
    state = module.trainer.optimizers[0].state[module.velocity.c]
    assert module.trainer.optimizers[0].defaults["fused"]
    assert torch.linalg.vector_norm(state["exp_avg"]).item() == pytest.approx(0.1, rel=1e-4)


def test_gradient_clipping_by_value_clips_each_entry(tiny_sd, tmp_path):
    data = TriplesDataModule(write_dataset(tmp_path / "pairs", count=8), batch_size=4)
    module = HugeLossReflow(tiny_sd, velocity=ConstantVelocity(), optimizer=_fused_adamw, ema_decay=0.0)
    trainer(tmp_path, 1, gradient_clip_val=0.5, gradient_clip_algorithm="value", limit_val_batches=0).fit(module, data)
    exp_avg = module.trainer.optimizers[0].state[module.velocity.c]["exp_avg"]
    assert exp_avg.abs().max().item() == pytest.approx(0.05, rel=1e-5)


def test_a_gradient_scaler_with_a_fused_optimizer_and_clipping_is_one_line():
    """16-mixed on a GPU has a gradient scaler, and a fused AdamW unscales only inside its step: refused in one line
    (Lightning turns 16-mixed into bf16-mixed on CPUs, so the trainer is a stand-in here)."""
    from types import SimpleNamespace

    from instaflow_pl.modules.base import check_clipping

    fused = _fused_adamw([nn.Parameter(torch.zeros(2))])
    scaled = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    stand_in = SimpleNamespace(gradient_clip_val=1.0, precision="16-mixed", precision_plugin=scaled, optimizers=[fused])
    with pytest.raises(UserError, match="fused=true unscales them only inside its step") as info:
        check_clipping(stand_in)
    assert "\n" not in str(info.value)
    check_clipping(SimpleNamespace(**{**vars(stand_in), "gradient_clip_val": None}))  # no clipping: fine
    check_clipping(SimpleNamespace(**{**vars(stand_in), "precision_plugin": SimpleNamespace(scaler=None)}))  # bf16
    foreach = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], foreach=True)
    check_clipping(SimpleNamespace(**{**vars(stand_in), "optimizers": [foreach]}))  # unscaled by Lightning first


def test_records_from_before_the_network_rename_are_upgraded_and_injected_velocities_left_alone():
    from instaflow_pl.checkpoints import read_record, upgrade_parameter_name

    state = {"velocity.unet.w": 1, "ema.module.unet.w": 2, "encoder.x": 3}
    old = {"instaflow_pl": {"module": "ReflowModule", "unet_config": {"a": 1}, "family": "sdxl"}, "state_dict": state}
    record = read_record(old, "ReflowModule")
    assert record.network_config == {"a": 1} and record.family == "sdxl" and "unet_config" not in old["instaflow_pl"]
    assert set(old["state_dict"]) == {"velocity.network.w", "ema.module.network.w", "encoder.x"}
    injected = {"instaflow_pl": {"module": "ReflowModule"}, "state_dict": {"velocity.unet.w": 1}}  # its own child
    assert read_record(injected).network_config is None and set(injected["state_dict"]) == {"velocity.unet.w"}
    assert upgrade_parameter_name("unet.down_blocks") == "network.down_blocks"
    assert upgrade_parameter_name("head.unet.w") == "head.unet.w"
