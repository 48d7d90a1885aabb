"""Teachers: parity with diffusers' own pipeline, velocity folders, dtypes, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.teachers import Teacher, load_teacher
from instaflow_pl.velocity import NetworkVelocity, TextCondition

PARITY_PROMPTS = ["a photo of a cat", "a red car in the city"]


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("solver, scheduler_class", [("dpm++", DPMSolverMultistepScheduler), ("ddim", DDIMScheduler)])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_sd_teacher_matches_stable_diffusion_pipeline(tiny_sd, pipe, solver, scheduler_class, guidance):
    steps = 6
    teacher = load_teacher(tiny_sd, solver=solver, steps=steps)
    x0 = noise_for_indices(0, [0, 1], teacher.latent_shape)
    ours = teacher.sample(x0.clone(), PARITY_PROMPTS, guidance=guidance).x
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    relative = _relative_to_pipeline(ours, pipe, x0, steps, guidance)
    assert relative < 1e-5, relative
    assert not torch.allclose(ours[0], ours[1]), "the two prompts must give different latents"


def _relative_to_pipeline(ours: torch.Tensor, pipeline, x0: torch.Tensor, steps: int, guidance: float) -> float:
    """Relative error of ``ours`` against the stock pipeline's latents from the same X0 and prompts."""
    reference = pipeline(
        PARITY_PROMPTS, latents=x0.clone(), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        height=16, width=16,
    ).images  # fmt: skip
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_sd_auto_solver_is_the_folders_own_scheduler(tiny_sd, guidance):
    """Under ``auto`` the tiny SD folder (PNDM, as SD 1.5's) is solved by its own scheduler, as the stock pipeline."""
    steps = 6
    teacher = load_teacher(tiny_sd, steps=steps)
    assert teacher.solver_name == "pndm" and teacher.solver.nfe == steps + 1  # PNDM's first step is evaluated twice
    x0 = noise_for_indices(0, [0, 1], teacher.latent_shape)
    ours = teacher.sample(x0.clone(), PARITY_PROMPTS, guidance=guidance).x
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler) is PNDMScheduler
    assert _relative_to_pipeline(ours, pipeline, x0, steps, guidance) < 1e-5


def test_pndm_trajectory_keeps_one_state_per_time(tiny_sd):
    """PNDM's second call corrects the state of its first: the trajectory keeps the corrected one, so its times
    increase strictly (straightness divides by the steps) and it ends at the solve's end point."""
    teacher = load_teacher(tiny_sd, solver="pndm", steps=4)
    x0 = noise_for_indices(0, [0], teacher.latent_shape)
    cond = teacher.encoder.condition(["a cat"], with_null=False)
    solution = teacher.solver.solve(teacher.model, x0, cond, return_trajectory=True)
    assert solution.nfe == 5 and solution.states.shape[0] == 5 == len(solution.times)
    assert solution.times[0] == 0.0 and solution.times[-1] == 1.0
    assert torch.all(solution.times[1:] > solution.times[:-1])
    assert torch.equal(solution.states[-1], solution.x)
    assert torch.equal(teacher.solver.solve(teacher.model, x0, cond).x, solution.x)


def test_sd_teacher_counts_one_evaluation_per_step_and_returns_trajectory(tiny_sd):
    teacher = load_teacher(tiny_sd, solver="ddim", steps=5)
    solution = teacher.solver.solve(
        teacher.model,
        noise_for_indices(0, [0], teacher.latent_shape),
        teacher.encoder.condition(["a cat"], with_null=False),
        return_trajectory=True,
    )
    assert solution.nfe == 5 == teacher.solver.nfe
    assert solution.states.shape[0] == 6
    assert solution.times[0] == 0.0 and solution.times[-1] == 1.0
    assert torch.all(solution.times[1:] > solution.times[:-1])


def test_velocity_teacher_calls_unet_at_one_minus_t_times_1000(tiny_velocity):
    teacher = load_teacher(tiny_velocity, steps=3)
    assert teacher.kind == "velocity" and teacher.solver_name == "euler"
    assert isinstance(teacher.model, NetworkVelocity)
    x = torch.randn(2, 4, 8, 8)
    cond = teacher.encoder.condition(["a cat", "a dog"], with_null=False)
    t = torch.tensor([0.0, 0.3])
    expected = teacher.model.network(x, torch.tensor([1000.0, 700.0]), encoder_hidden_states=cond.embeds).sample
    assert torch.allclose(teacher.model(x, t, cond), expected, atol=1e-5)
    solution = teacher.sample(x, ["a cat", "a dog"], guidance=2.0)
    assert solution.nfe == 3


def test_velocity_teacher_euler_step_is_x0_plus_velocity(tiny_velocity):
    """One Euler step of the velocity teacher is X0 + v(X0, 0): the one-step generator of InstaFlow."""
    teacher = load_teacher(tiny_velocity, steps=1)
    x0 = torch.randn(2, 4, 8, 8)
    cond = teacher.encoder.condition(["a cat", "a dog"], with_null=False)
    v0 = teacher.model(x0, torch.zeros(2), cond)
    assert torch.allclose(teacher.sample(x0, ["a cat", "a dog"]).x, x0 + v0, atol=1e-6)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_teacher_dtypes(tiny_sd, dtype, torch_dtype):
    teacher = load_teacher(tiny_sd, solver="ddim", steps=2, dtype=dtype)
    assert teacher.model.network.dtype == torch_dtype
    assert teacher.encoder.text_encoder.dtype == torch_dtype
    if dtype == "bf16":  # fp16 convolutions are not implemented on every CPU build
        out = teacher.sample(noise_for_indices(0, [0], teacher.latent_shape), ["a cat"], guidance=3.0).x
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fingerprint_changes_with_weights(tiny_sd, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd, copy)
    assert load_teacher(copy).fingerprint == load_teacher(tiny_sd).fingerprint
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config["beta_end"] = 0.02
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert load_teacher(copy).fingerprint != load_teacher(tiny_sd).fingerprint


def test_missing_teacher_folder(tmp_path):
    with pytest.raises(UserError, match="model folder not found: .*nowhere"):
        load_teacher(tmp_path / "nowhere")


def test_folder_that_is_not_diffusers_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a diffusers-format model folder"):
        load_teacher(tmp_path)


@pytest.mark.parametrize(
    "solver, message", [("rk5", "does not fit a Stable Diffusion teacher"), ("euler", "choose auto or one of dpm")]
)
def test_unknown_or_wrong_solver(tiny_sd, solver, message):
    with pytest.raises(UserError, match=message):
        load_teacher(tiny_sd, solver=solver)


def test_latent_shape_that_does_not_match_the_unet(tiny_sd):
    teacher: Teacher = load_teacher(tiny_sd)
    assert teacher.check_latent_shape([4, 16, 16]) == (4, 16, 16)
    with pytest.raises(UserError, match=r"latent shape \[3, 8, 8\] does not fit"):
        teacher.check_latent_shape([3, 8, 8])
    with pytest.raises(UserError, match="multiples of 2"):
        teacher.check_latent_shape([4, 7, 8])


def test_text_condition_shapes(tiny_sd):
    teacher = load_teacher(tiny_sd)
    cond: TextCondition = teacher.encoder.condition(["a", "b", "c"])
    assert cond.embeds.shape == (3, 77, 32)
    assert cond.null.embeds.shape == (1, 77, 32)
    assert cond.pooled is None, "Stable Diffusion 1.x takes no pooled embedding"
    assert torch.equal(cond.unconditional().embeds[2], cond.null.embeds[0])


def test_v_prediction_teacher_matches_pipeline(tiny_sd, tmp_path):
    """A v-prediction teacher (like SD 2.x) is solved through its scheduler's own prediction type."""
    import shutil

    folder = tmp_path / "sd-v"
    shutil.copytree(tiny_sd, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    teacher = load_teacher(folder, solver="ddim", steps=4)
    x0 = noise_for_indices(3, [0, 1], teacher.latent_shape)
    ours = teacher.sample(x0.clone(), PARITY_PROMPTS, guidance=3.0).x
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    reference = pipeline(
        PARITY_PROMPTS,
        latents=x0.clone(),
        num_inference_steps=4,
        guidance_scale=3.0,
        output_type="latent",
        height=16,
        width=16,
    ).images
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-5
    eps_teacher = load_teacher(tiny_sd, solver="ddim", steps=4)
    assert not torch.allclose(eps_teacher.sample(x0.clone(), PARITY_PROMPTS, guidance=3.0).x, ours)
