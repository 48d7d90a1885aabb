"""Piecewise rectified flow as a mode of ReflowModule: online window targets from a teacher in the module, sampling
with K windows, checkpoints without the teacher, and one line for each bad option."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import write_dataset
from helpers import fit_quietly

from instaflow_pl.data import TripleBatch
from instaflow_pl.errors import UserError
from instaflow_pl.modules import DistillModule, ReflowModule
from instaflow_pl.solver import piecewise_grid
from instaflow_pl.teachers import load_teacher

PROMPTS = ["a cat", "a dog", "a red car", "a house"]


def windowed(base, teacher=None, **options) -> ReflowModule:
    options = {"ema_decay": 0.0, "val_steps": [4], "window_solver_steps": 2, **options}
    return ReflowModule(str(base), teacher=str(teacher or base), **options)


@pytest.mark.parametrize(("teacher", "solver", "guidance"), [("tiny_sd", "ddim", 3.0), ("tiny_velocity", "auto", 1.0)])
def test_one_window_online_target_is_the_stored_pair_target(teacher, solver, guidance, request):
    """K = 1, the teacher's full solve from pure noise: the target is X1 - X0 of the pair the teacher makes."""
    folder = request.getfixturevalue(teacher)
    module = windowed(folder, teacher_solver=solver, teacher_guidance=guidance, window_solver_steps=4)
    reference = load_teacher(folder, solver=solver, steps=4)
    x0 = torch.randn(4, 4, 8, 8)
    pair_x1 = reference.sample(x0, PROMPTS, guidance=guidance).x
    batch = TripleBatch(None, torch.randn(4, 4, 8, 8), PROMPTS, torch.arange(4))
    t = torch.rand(4)
    out = module.window_targets(batch, module.condition(PROMPTS), x0, t)
    difference = (out.target - (pair_x1 - x0)).abs().max().item()
    assert difference == 0.0, difference
    assert out.nfe == 4 * (2 if guidance > 1 else 1)


def test_cfg_sync_teacher_sees_the_students_condition(tiny_sd):
    module = windowed(tiny_sd, teacher_solver="ddim", cfg_sync=True, windows=2, val_steps=[2])
    cond = module.condition(PROMPTS)
    field, teacher_cond = module.teacher_field(PROMPTS, cond)
    assert teacher_cond is cond and not field.active
    guided = windowed(tiny_sd, teacher_solver="ddim", teacher_guidance=7.5)
    field, teacher_cond = guided.teacher_field(PROMPTS, cond)
    assert field.active and teacher_cond.null is not None


def test_windowed_fit_trains_saves_no_teacher_and_samples_on_the_piecewise_grid(tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "d", count=16)
    module = windowed(tiny_velocity, windows=4, val_steps=[4, 6])
    before = {k: v.clone() for k, v in module.velocity.state_dict().items()}
    trainer = fit_quietly(module, data, tmp_path / "run", steps=2)
    assert any(not torch.equal(before[k], v) for k, v in module.velocity.state_dict().items())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not any(m.training for m in module.teacher.model.modules())
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path or _last(tmp_path), weights_only=False)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    assert checkpoint["hyper_parameters"]["windows"] == 4
    solution = module.sample(torch.randn(2, 4, 8, 8), PROMPTS[:2], steps=6, trajectory=True)
    assert solution.times.tolist() == pytest.approx(piecewise_grid(6, 4)) and solution.nfe == 6
    with pytest.raises(UserError, match="3 sampling steps cannot cross 4 windows"):
        module.sample(torch.randn(1, 4, 8, 8), PROMPTS[:1], steps=3)


def _last(root):
    return str(sorted((root / "run").rglob("*.ckpt"))[-1])


def test_windowed_training_step_is_reproducible_from_its_seed(tiny_velocity):
    """The online noise and times come from the batch's seeded generator: the same seed, the same loss."""
    from instaflow_pl.modules.base import seeded_rng

    module = windowed(tiny_velocity, windows=2, val_steps=[2])
    batch = TripleBatch(None, torch.randn(4, 4, 8, 8), PROMPTS, torch.arange(4))
    losses = []
    for _ in range(2):
        with seeded_rng(1234):
            losses.append(module.compute_loss(batch, module.condition(PROMPTS)).loss.item())
    with seeded_rng(99):
        other = module.compute_loss(batch, module.condition(PROMPTS)).loss.item()
    assert losses[0] == losses[1] != other


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"windows": 0}, "windows must be an integer >= 1"),
        ({"windows": 4, "teacher": None}, "windows=4 needs a teacher"),
        ({"teacher_solver": "auto"}, "teacher's solver 'pndm' cannot solve a window"),
        ({"cfg_sync": True, "teacher_guidance": 7.5}, "cfg_sync runs the teacher on the student's condition"),
        ({"windows": 4, "val_steps": [1, 4]}, "val_steps [1, 4] has step counts below windows=4"),
        ({"window_solver_steps": 0}, "window_solver_steps must be >= 1"),
    ],
)
def test_bad_window_options_are_one_line(tiny_sd, options, message):
    options = {"teacher_solver": "ddim", **options}
    teacher = options.pop("teacher", tiny_sd)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ReflowModule(str(tiny_sd), teacher=None if teacher is None else str(teacher), ema_decay=0.0, **options)


def test_windows_with_distillation_is_one_line(tiny_velocity):
    with pytest.raises(UserError, match="windows=4 is piecewise reflow, an option of ReflowModule"):
        DistillModule(str(tiny_velocity), windows=4)


def test_export_records_windows_and_every_sampler_honours_them(tiny_sd, tmp_path, capsys):
    from helpers import assert_one_line_error, run_main

    from instaflow_pl import standalone_pipeline
    from instaflow_pl.conventions import noise_for_indices
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.model_folder import read_info
    from instaflow_pl.pipeline import InstaFlowPipeline

    data = write_dataset(tmp_path / "d", count=8)
    module = windowed(tiny_sd, teacher_solver="ddim", windows=2, val_steps=[2])
    fit_quietly(module, data, tmp_path / "run", steps=1)
    out = tmp_path / "export"
    export_checkpoint(sorted((tmp_path / "run").rglob("*.ckpt"))[-1], out)
    assert read_info(out)["windows"] == 2
    assert json.loads((out / "model_index.json").read_text())["windows"] == 2

    pipe = InstaFlowPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.windows == 2
    x0 = noise_for_indices(0, range(2), pipe.latent_shape())
    ours = pipe.sample_latents(x0, PROMPTS[:2], num_inference_steps=3)
    expected = module.sample(x0, PROMPTS[:2], steps=3).x
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    with pytest.raises(UserError, match="num_inference_steps=1 cannot cross the model's 2 time windows"):
        pipe.sample_latents(x0, PROMPTS[:2], num_inference_steps=1)
    stock = standalone_pipeline.InstaFlowPipeline.from_pretrained(out, trust_remote_code=True)  # model_index windows
    assert torch.equal(stock.sample_latents(x0, PROMPTS[:2], num_inference_steps=3), ours)
    for steps, windows in [(1, 1), (5, 1), (4, 4), (7, 4), (9, 3)]:
        assert standalone_pipeline.euler_grid(steps, windows) == piecewise_grid(steps, windows)

    teacher = load_teacher(out, steps=3)
    assert teacher.solver.time_grid == piecewise_grid(3, 2) and teacher.with_steps(5).solver.nfe == 5
    with pytest.raises(UserError, match="1 sampling steps cannot cross 2 windows"):
        load_teacher(out, steps=1)

    capsys.readouterr()  # the loads above wrote progress bars
    args = ["sample", "--model", out, "--prompt", "a cat", "--n", "1", "--out", tmp_path / "g.png"]
    assert_one_line_error(run_main([*args, "--steps", "1"], capsys), "cannot cross the model's 2 time windows")
    code, _, err = run_main([*args, "--steps", "2"], capsys)
    assert code == 0, err


def test_pseudo_huber_velocity_loss_is_mse_over_2c_near_zero_and_icts_distance(tiny_velocity):
    """sqrt(m + c^2) - c = m / (2c) - m^2 / (8 c^3) + ...: the MSE over 2c for errors well below c; the root mean
    square error minus c far above it; 2-rectified flow++'s (iCT's) sqrt(||d||^2 + C^2) - C with C = c sqrt(n),
    divided by sqrt(n)."""
    c = 0.01
    module = ReflowModule(str(tiny_velocity), loss="huber", huber_c=c, ema_decay=0.0, val_steps=[1])
    torch.manual_seed(0)
    target = torch.randn(3, 4, 8, 8)
    small = target + 1e-4 * torch.randn(3, 4, 8, 8)  # m ~ 1e-8 << c^2 = 1e-4
    m = (small - target).pow(2).flatten(1).mean(1)
    huber = module.velocity_loss(small, target)
    assert torch.allclose(huber, m / (2 * c), rtol=1e-3), (huber, m / (2 * c))
    large = target + 10 * torch.randn(3, 4, 8, 8)  # sqrt(m) ~ 10 >> c
    m = (large - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(module.velocity_loss(large, target), m.sqrt() - c, rtol=1e-5)
    n = target[0].numel()
    norm2 = (large - target).pow(2).flatten(1).sum(1).double()
    ict = (norm2 + (c * n**0.5) ** 2).sqrt() - c * n**0.5
    assert torch.allclose(module.velocity_loss(large, target).double(), ict / n**0.5, rtol=1e-5)


@pytest.mark.parametrize("windowed_mode", [False, True], ids=["stored-pairs", "windows"])
def test_huber_loss_replaces_mse_in_the_stored_pair_and_the_window_loss(tiny_velocity, windowed_mode):
    """Same weights, same seed, same draws: each sample's pseudo-Huber loss is sqrt(mse + c^2) - c of its MSE."""
    from instaflow_pl.modules.base import seeded_rng

    c = 0.05
    batch = TripleBatch(torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), PROMPTS, torch.arange(4))
    per_sample = {}
    for loss in ("mse", "huber"):
        options = {"loss": loss, "huber_c": c, "ema_decay": 0.0, "val_steps": [2]}
        if windowed_mode:
            module = windowed(tiny_velocity, windows=2, **options)
        else:
            module = ReflowModule(str(tiny_velocity), **options)
        with seeded_rng(7):
            out = module.compute_loss(batch, module.condition(PROMPTS))
        assert torch.equal(out.loss, out.per_sample.mean())
        per_sample[loss] = out.per_sample.double()
    expected = (per_sample["mse"] + c * c).sqrt() - c
    assert torch.allclose(per_sample["huber"], expected, rtol=1e-5), (per_sample, expected)
    assert not torch.allclose(per_sample["huber"], per_sample["mse"], rtol=1e-2)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"loss": "l1"}, "unknown loss 'l1': choose one of mse, huber"), ({"huber_c": 0.0}, "huber_c must be > 0")],
)
def test_bad_loss_options_are_one_line(tiny_velocity, options, message):
    with pytest.raises(UserError, match=message):
        ReflowModule(str(tiny_velocity), ema_decay=0.0, **{"loss": "huber", **options})


def test_windowed_reflow_on_images_encodes_them_before_the_window_loss(tiny_sd, tmp_path):
    """ImagePromptDataModule batches (images in [-1, 1], no X0): the VAE encodes them before the teacher solves
    their windows, so the window targets see latents, and the fit trains, validates and samples."""
    from instaflow_pl.data import ImagePromptDataModule
    from instaflow_pl.tiny import build_tiny_images

    images = build_tiny_images(tmp_path / "images", count=8, size=16)
    data = ImagePromptDataModule(str(images), resolution=16, batch_size=3, val_fraction=0.25)  # 2 batches of 3
    module = windowed(tiny_sd, teacher_solver="ddim", windows=2, val_steps=[2], encode_images=True)
    seen = []
    solve = module.window_targets

    def spy(batch, cond, noise, t):
        seen.append((batch.x0, tuple(batch.x1.shape), tuple(noise.shape)))
        return solve(batch, cond, noise, t)

    module.window_targets = spy
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))
    assert raw.x0 is None and tuple(raw.x1.shape) == (3, 3, 16, 16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path / "run", num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert [s[0] for s in seen] == [None, None]
    assert {s[1] for s in seen} == {s[2] for s in seen} == {(3, 4, 8, 8)}
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/mse@2"])


@pytest.mark.parametrize(("teacher", "windows"), [(False, 1), (True, 1), (True, 2)], ids=["pairs", "K1", "K2"])
def test_export_records_perflow_and_its_card_says_how_to_sample_it(tiny_sd, tmp_path, teacher, windows):
    """A ReflowModule with a teacher exports as stage perflow with its teacher and window solves; with K > 1 windows
    the card says it is piecewise and its snippets sample with K steps; a stored-pair reflow stays stage reflow."""
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.model_folder import read_info

    data = write_dataset(tmp_path / "d", count=8)
    options = {"ema_decay": 0.0, "val_steps": [windows]}
    if teacher:
        module = windowed(tiny_sd, teacher_solver="ddim", windows=windows, **options)
    else:
        module = ReflowModule(str(tiny_sd), **options)
    fit_quietly(module, data, tmp_path / "run", steps=1)
    out = tmp_path / "export"
    export_checkpoint(sorted((tmp_path / "run").rglob("*.ckpt"))[-1], out)
    info, card = read_info(out), (out / "README.md").read_text()
    assert info["windows"] == windows and info["loss"] == "mse"
    if not teacher:
        assert info["stage"] == "reflow" and info["stages"] == ["reflow"] and "teacher" not in info
        assert "piecewise" not in card and "num_inference_steps=1" in card
        return
    assert info["stage"] == "perflow" and info["stages"] == ["perflow"]
    assert (info["teacher"], info["teacher_solver"], info["window_solver_steps"]) == (str(tiny_sd), "ddim", 2)
    assert info["cfg_sync"] is False and info["teacher_guidance"] == 1.0
    assert f"- teacher: `{tiny_sd}`, solved online in each of {windows} window(s) with 2 `ddim` steps" in card
    if windows == 1:
        assert "piecewise" not in card and "num_inference_steps=1" in card
        return
    text = " ".join(card.split())
    assert "piecewise rectified flow with K = 2 time windows" in text and "sampled with n >= 2 Euler steps" in text
    assert "n a multiple of K is best" in text
    assert "num_inference_steps=2" in card and "--steps 2" in card and "num_inference_steps=1" not in card
