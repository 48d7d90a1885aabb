"""Model families: SDXL and SD3 teachers against diffusers' own pipelines, and how folders find their family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.teachers import load_teacher

PROMPTS = ["a photo of a cat", "a red car in the city"]
LATENT_HW = (4, 12)  # unlike the tiny folders' native 8 x 8, and not square
PIXELS = 2  # the tiny VAEs' pixels per latent pixel


def check_parity(label: str, ours: torch.Tensor, pipe, x0: torch.Tensor, steps: int, guidance: float) -> None:
    """``ours`` equals the stock pipeline's latents from ``x0`` to a relative error <= 1e-5 (printed: pytest -s)."""
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPTS,
        latents=x0.clone(),
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        height=LATENT_HW[0] * PIXELS,
        width=LATENT_HW[1] * PIXELS,
    ).images
    error = ((ours - reference).norm() / reference.norm()).item()
    print(f"{label} guidance {guidance}: relative error {error:.2e}")
    assert error <= 1e-5
    assert not torch.allclose(ours[0], ours[1]), "the two prompts must give different latents"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return FAMILIES["sdxl"].build_tiny(tmp_path_factory.mktemp("families") / "sdxl")


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def tiny_sd3(request, tmp_path_factory):
    from instaflow_pl.families.sd3_tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("families") / "sd3", with_t5=request.param)


@pytest.mark.parametrize(
    "solver, scheduler_class", [("euler-discrete", EulerDiscreteScheduler), ("dpm++", DPMSolverMultistepScheduler)]
)
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sdxl_teacher_matches_stable_diffusion_xl_pipeline(tiny_sdxl, solver, scheduler_class, guidance):
    steps = 5
    teacher = load_teacher(tiny_sdxl, solver=solver, steps=steps)
    assert teacher.family.name == "sdxl"
    x0 = noise_for_indices(0, [0, 1], (4, *LATENT_HW))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    check_parity(f"sdxl {solver}", ours, pipe, x0, steps, guidance)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sdxl_auto_solver_is_the_folders_own_scheduler(tiny_sdxl, guidance):
    """``solver: auto`` samples a released folder as its stock pipeline does: the tiny SDXL folder's scheduler is
    Euler (as SDXL base 1.0's), so auto is ``euler-discrete`` and X1 equals StableDiffusionXLPipeline's, untouched."""
    steps = 5
    config = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"
    teacher = load_teacher(tiny_sdxl, steps=steps)
    assert teacher.solver_name == "euler-discrete"
    assert teacher.with_steps(3).solver_name == "euler-discrete"
    x0 = noise_for_indices(0, [0, 1], (4, *LATENT_HW))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # the folder's own scheduler
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    check_parity("sdxl auto", ours, pipe, x0, steps, guidance)


def test_auto_solver_falls_back_to_the_family_default_for_a_scheduler_it_does_not_solve(tiny_sdxl, tmp_path):
    """A folder whose scheduler is not one of the project's solvers (here LMS) gets the family's default under auto;
    a named solver is always taken as named."""
    folder = tmp_path / "sdxl-lms"
    shutil.copytree(tiny_sdxl, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "LMSDiscreteScheduler"}))
    family = FAMILIES["sdxl"]
    assert load_teacher(folder, steps=2).solver_name == family.default_teacher_solver == "dpm++"
    assert load_teacher(folder, solver="ddim", steps=2).solver_name == "ddim"
    velocity_config = {"_class_name": "EulerDiscreteScheduler"}
    assert family.solver_name("velocity", "auto", velocity_config) == "euler"


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd3_teacher_matches_stable_diffusion_3_pipeline(tiny_sd3, guidance):
    """The SD3 teacher is our Euler LatentODE on 1 - the scheduler's shifted sigmas, with v = -output."""
    steps = 5
    teacher = load_teacher(tiny_sd3, steps=steps)
    assert teacher.family.name == "sd3" and teacher.solver_name == "euler"
    x0 = noise_for_indices(0, [0, 1], (16, *LATENT_HW))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x
    without_t5 = {} if (tiny_sd3 / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **without_t5)  # how users drop T5
    assert pipe.scheduler.config.shift == 3.0
    check_parity(f"sd3 {'without' if without_t5 else 'with'} T5", ours, pipe, x0, steps, guidance)


@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 12)])
def test_sd35_dynamic_shifting_follows_the_image_size(tiny_sd3, tmp_path, latent_hw):
    """An SD3.5-style scheduler (``use_dynamic_shifting``): the teacher's time grid is shifted by the latents' size,
    as StableDiffusion3Pipeline shifts it, through the same code path (relative error <= 1e-5 at two sizes)."""
    folder = tmp_path / "sd35"
    shutil.copytree(tiny_sd3, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5)
    config_file.write_text(json.dumps(config))
    steps = 4
    teacher = load_teacher(folder, steps=steps)
    x0 = noise_for_indices(0, [0, 1], (16, *latent_hw))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=3.0).x
    grids = {shape: teacher.solver_for(shape).time_grid for shape in [(16, 8, 8), (16, 16, 12)]}
    assert grids[(16, 8, 8)][1] != pytest.approx(grids[(16, 16, 12)][1]), "the shift depends on the size"
    without_t5 = {} if (folder / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **without_t5)
    pipe.set_progress_bar_config(disable=True)
    height, width = (s * PIXELS for s in latent_hw)
    reference = pipe(
        PROMPTS, latents=x0.clone(), num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
        height=height, width=width,
    ).images  # fmt: skip
    error = ((ours - reference).norm() / reference.norm()).item()
    print(f"sd3.5 dynamic shifting {latent_hw}: relative error {error:.2e}")
    assert error <= 1e-5


def test_sd3_time_grid_is_the_shifted_schedule(tiny_sd3):
    """sigma = 1 - t on SD3's shifted schedule: sigmas evenly spaced from 1 to the smallest training sigma, then
    shifted by s -> 3 s / (1 + 2 s) (noise-heavy steps), then 0."""
    shift = 3.0

    def shifted(s: float) -> float:
        return shift * s / (1 + (shift - 1) * s)

    teacher = load_teacher(tiny_sd3, steps=4)
    grid = teacher.solver.time_grid
    low = shifted(1 / 1000)
    expected = [shifted(1 + (low - 1) * k / 3) for k in range(4)] + [0.0]
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert max(abs((1 - t) - s) for t, s in zip(grid, expected, strict=True)) < 1e-6
    assert grid[1] < 0.25 * 0.6, "the first step is much shorter than a uniform one"
    assert teacher.with_steps(3).solver.time_grid[1] == pytest.approx(1 - shifted((1 + low) / 2), abs=1e-6)


def test_sdxl_null_prompt_is_zeros_as_the_folder_asks(tiny_sdxl, tmp_path):
    encoder = load_teacher(tiny_sdxl).encoder
    cond = encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, 77, 16 + 32) and cond.pooled.shape == (2, 32)
    assert not cond.null.embeds.any() and not cond.null.pooled.any()
    folder = tmp_path / "sdxl-no-zeros"
    shutil.copytree(tiny_sdxl, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    null = load_teacher(folder).encoder.condition(PROMPTS).null
    assert null.embeds.abs().sum() > 0, "without force_zeros the null prompt is the encoded empty prompt"


def test_sd3_condition_joins_clip_and_t5(tiny_sd3):
    cond = load_teacher(tiny_sd3).encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, 77 + 256, 64) and cond.pooled.shape == (2, 16 + 32)
    assert not cond.embeds[:, :77, 48:].any(), "CLIP states are zero-padded to the joint width"
    has_t5 = (tiny_sd3 / "text_encoder_3").is_dir()
    assert bool(cond.embeds[:, 77:].any()) == has_t5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_folder_finds_its_family_and_exactly_one_family_owns_its_network(name, tmp_path):
    folder = ModelFolder.open(FAMILIES[name].build_tiny(tmp_path / name))
    assert folder.family is FAMILIES[name]
    owners = [f.name for f in FAMILIES.values() if f.owns_network_config(folder.network_config)]
    assert owners == [name]
    assert folder.family.latent_geometry(folder.network_config) == folder.geometry


def test_unknown_family_names_its_class_and_the_known_ones(tiny_sd, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match=r"KandinskyPipeline .*not a known family.*StableDiffusionXLPipeline \(sdxl\)"):
        load_teacher(folder)


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_folder_missing_a_part_its_family_needs(tiny_sdxl, tmp_path, part):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, folder)
    shutil.rmtree(folder / part)
    with pytest.raises(UserError, match=f"has no {part}/ subfolder; a Stable Diffusion XL folder needs"):
        load_teacher(folder)


def test_sd3_with_t5_encoder_but_no_tokenizer(tiny_sd3, tmp_path):
    if not (tiny_sd3 / "text_encoder_3").is_dir():
        pytest.skip("the folder without T5 has neither part")
    folder = tmp_path / "half-t5"
    shutil.copytree(tiny_sd3, folder)
    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(UserError, match="has text_encoder_3/ but no tokenizer_3/"):
        load_teacher(folder)


@pytest.mark.parametrize("solver", ["ddim", "dpm++"])
def test_sd3_refuses_a_diffusion_scheduler(tiny_sd3, solver):
    with pytest.raises(UserError, match=f"solver '{re_escape(solver)}' does not fit a Stable Diffusion 3 teacher"):
        load_teacher(tiny_sd3, solver=solver)


def test_sd3_latent_channels(tiny_sd3):
    teacher = load_teacher(tiny_sd3)
    assert teacher.latent_shape == (16, 8, 8)
    with pytest.raises(UserError, match=r"latent shape \[4, 8, 8\] does not fit"):
        teacher.check_latent_shape([4, 8, 8])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
