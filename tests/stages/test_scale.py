"""What makes the SD-size recipe lean and fast, tested on the tiny folder: LoRA (training, checkpoints, both export
formats against stock diffusers), the EMA of trainable weights only, lean LPIPS, and the speed options."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, write_dataset
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import adam
from helpers import fit_quietly as fit

from instaflow_pl.data.triples import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.export import export_checkpoint
from instaflow_pl.modules import DistillModule, ReflowModule
from instaflow_pl.modules.lora import LoraOptions
from instaflow_pl.speed import attention_processors, set_tf32

LORA = {"rank": 2, "alpha": 4.0}  # alpha != rank: the scale must travel with the exported file


@pytest.fixture(scope="module")
def lora_run(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = write_dataset(root / "pairs", count=12, shard_size=4)
    module = ReflowModule(str(tiny_sd), lora=LORA, ema_decay=0.5, val_steps=[1], optimizer=adam)
    trainer = fit(module, data, root)
    ckpt = root / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), ckpt


def test_lora_trains_only_the_adapters_and_ema_and_optimizer_cover_them(lora_run):
    module, _ = lora_run
    trainable = {n: p.numel() for n, p in module.velocity.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    total = sum(p.numel() for p in module.velocity.parameters())
    assert module.ema.numel() == sum(trainable.values()) < total / 20
    state = module.trainer.optimizers[0].state
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(trainable.values())
    assert any(p.abs().sum() > 0 for n, p in module.velocity.named_parameters() if ".lora_B." in n)


def test_lora_checkpoint_leaves_out_the_base_weights_and_resumes(lora_run, tiny_sd):
    module, ckpt = lora_run
    checkpoint = torch.load(ckpt, weights_only=True)
    velocity_keys = [k for k in checkpoint["state_dict"] if k.startswith("velocity.")]
    assert velocity_keys and all(".lora_" in k for k in velocity_keys)
    record = checkpoint["instaflow_pl"]
    assert record["lora"]["rank"] == 2 and record["base_weights_omitted"] and record["format_version"] == 2
    again = ReflowModule.load_from_checkpoint(ckpt, base_model=str(tiny_sd))
    assert again.hparams.lora == module.hparams.lora
    mine, theirs = module.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _unet_velocity(unet, x, t, embeds):
    return unet(x, (1 - t) * 1000, encoder_hidden_states=embeds, return_dict=False)[0]


def test_lora_exports_merged_and_as_a_file_that_stock_diffusers_loads(lora_run, tiny_sd, tmp_path):
    module, ckpt = lora_run
    merged, lora_dir = tmp_path / "merged", tmp_path / "lora"
    export_checkpoint(ckpt, merged)
    export_checkpoint(ckpt, lora_dir, lora_format="file")
    assert json.loads((lora_dir / "instaflow.json").read_text())["kind"] == "lora"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.7])
    embeds = module.condition(PROMPTS[:2]).embeds
    with torch.no_grad():
        exported = _unet_velocity(UNet2DConditionModel.from_pretrained(merged, subfolder="unet"), x, t, embeds)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
        base = _unet_velocity(pipe.unet, x, t, embeds)
        pipe.load_lora_weights(lora_dir)
        loaded = _unet_velocity(pipe.unet, x, t, embeds)
        with module.sampling_weights() as velocity:
            ours = velocity(x, t, module.condition(PROMPTS[:2]))
    scale = ours.abs().max()
    assert (exported - ours).abs().max() / scale <= 1e-5, "the merged export is the EMA LoRA model"
    assert (loaded - exported).abs().max() / scale <= 1e-5, "stock load_lora_weights gives the merged velocity"
    assert (base - exported).abs().max() / scale > 1e-3, "the adapters must change the velocity"


def test_lora_file_export_of_a_run_without_lora_is_refused(tiny_sd, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=8, shard_size=4)
    trainer = fit(ReflowModule(str(tiny_sd), ema_decay=0.0, val_steps=[1]), data, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(UserError, match="did not train LoRA adapters"):
        export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "out", lora_format="file")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "lora.rank must be >= 1"),
        ({"rank": 2, "dropout": 1.5}, "lora.dropout"),
        ({"rank": 2, "target_modules": ["no_such_layer"]}, "match no layer"),
        ({"rnak": 2}, "unknown option"),
    ],
)
def test_bad_lora_options_are_one_line_errors(tiny_sd, options, message):
    with pytest.raises(UserError, match=message):
        ReflowModule(str(tiny_sd), lora=options, ema_decay=0.0)


def test_frozen_blocks_stay_out_of_the_ema_and_the_checkpoint_and_export_restores_them(tiny_sd, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=8, shard_size=4)
    module = ReflowModule(str(tiny_sd), freeze=["network.down_blocks"], ema_decay=0.9, val_steps=[1], optimizer=adam)
    trainer = fit(module, data, tmp_path)
    trainer.save_checkpoint(tmp_path / "frozen.ckpt")
    keys = torch.load(tmp_path / "frozen.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("velocity.network.down_blocks", "ema.module.network.down_blocks")) for k in keys)
    assert any(k.startswith("ema.module.network.up_blocks") for k in keys)
    export_checkpoint(tmp_path / "frozen.ckpt", tmp_path / "out")
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet").state_dict()
    with module.sampling_weights():
        expected = module.velocity.network.state_dict()
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in exported)


# ---- lean LPIPS ----------------------------------------------------------------------------------------------------


def _lpips_loss_and_grad(tiny_velocity, **options):
    generator = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 8, 8, generator=generator).requires_grad_(True)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    torch.manual_seed(0)  # the LPIPS net's random (pnet_rand) weights are drawn from the global generator
    module = DistillModule(
        str(tiny_velocity), distance={"lpips": 1.0}, lpips_pretrained=False, ema_decay=0.0, **options
    )
    loss = module.distance.lpips(pred, target)
    loss.sum().backward()
    return loss.detach(), pred.grad, module.distance.lpips


def test_lean_lpips_options_keep_the_loss(tiny_velocity):
    loss, grad, naive = _lpips_loss_and_grad(tiny_velocity)
    ckpt_loss, ckpt_grad, lean = _lpips_loss_and_grad(tiny_velocity, lpips_checkpointing=True)
    assert lean.checkpointed > 3 and naive.checkpointed == 0
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ckpt_grad, grad, rtol=1e-5, atol=1e-8)
    bf16_loss, bf16_grad, bf16 = _lpips_loss_and_grad(tiny_velocity, lpips_dtype="bf16")
    assert bf16.vae.dtype == torch.bfloat16 and bf16_loss.dtype == torch.float32
    torch.testing.assert_close(bf16_loss, loss, rtol=0.05, atol=0)  # bf16 rounding, not another loss
    assert not torch.equal(bf16_loss, loss)
    resized_loss, _, resized = _lpips_loss_and_grad(tiny_velocity, lpips_resize=48)
    assert resized.decode(torch.zeros(1, 4, 8, 8)).shape[-2:] == (48, 48)
    assert not torch.allclose(resized_loss, loss)


def test_bad_lpips_options_are_one_line_errors(tiny_velocity):
    with pytest.raises(UserError, match="lpips_dtype must be one of"):
        DistillModule(str(tiny_velocity), distance={"lpips": 1.0}, lpips_pretrained=False, lpips_dtype="fp8")
    with pytest.raises(UserError, match="lpips_resize must be >= 16"):
        DistillModule(str(tiny_velocity), distance={"lpips": 1.0}, lpips_pretrained=False, lpips_resize=4)


# ---- speed options --------------------------------------------------------------------------------------------------


def _loss(module: ReflowModule, batch: TripleBatch) -> torch.Tensor:
    torch.manual_seed(0)
    return module.compute_loss(batch, module.condition(batch.prompts)).loss


def _batch() -> TripleBatch:
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    return TripleBatch(x0, x1, PROMPTS[:2], torch.arange(2))


def test_attention_is_sdpa_and_channels_last_keeps_the_loss(tiny_sd):
    plain = ReflowModule(str(tiny_sd), ema_decay=0.0)
    assert attention_processors(plain.velocity.network) == {"AttnProcessor2_0"}  # diffusers' SDPA default stays on
    fast = ReflowModule(str(tiny_sd), ema_decay=0.0, channels_last=True)
    assert fast.velocity.network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_loss(fast, _batch()), _loss(plain, _batch()), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_compile_keeps_the_loss(tiny_sd):
    plain = ReflowModule(str(tiny_sd), ema_decay=0.0)
    compiled = ReflowModule(str(tiny_sd), ema_decay=0.0, compile=True)
    torch.testing.assert_close(_loss(compiled, _batch()), _loss(plain, _batch()), rtol=1e-5, atol=0)
    assert compiled.velocity.network._compiled_call_impl is not None
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their keys


def test_tf32_switch():
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"


def test_lora_options_parse_from_a_mapping():
    assert LoraOptions.parse({"rank": 8}).alpha is None
    assert LoraOptions.parse(None) is None
