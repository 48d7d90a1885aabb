"""FLUX.1 teachers against diffusers' ``FluxPipeline`` (packed latents in, unpacked out), and Flux's bad inputs.

Run with ``pytest -s`` to see the parity figures.
"""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from diffusers import FluxPipeline

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES
from instaflow_pl.families.flux import DEFAULT_GUIDANCE, INFO_GUIDANCE, FluxPromptEncoder, pack, unpack
from instaflow_pl.families.flux_tiny import build_tiny
from instaflow_pl.kinds import VELOCITY_KIND
from instaflow_pl.model_folder import ModelFolder, mark_velocity_folder
from instaflow_pl.teachers import load_teacher
from instaflow_pl.velocity import ClassifierFreeGuidance

PROMPTS = ["a photo of a cat", "a red car in the city"]
CHANNELS = 16
PIXELS = 2  # the tiny VAE's pixels per latent pixel
STEPS = 4


@pytest.fixture(scope="module")
def tiny_dev(tmp_path_factory):
    return FAMILIES["flux"].build_tiny(tmp_path_factory.mktemp("flux") / "dev")


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("flux") / "schnell", guidance_embeds=False)


def flux_pipeline(folder, x0: torch.Tensor, **kwargs) -> torch.Tensor:
    """``FluxPipeline``'s latents from the (B, C, H, W) noise ``x0``, packed in and unpacked out."""
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    height, width = x0.shape[-2:]
    packed = pipe(
        PROMPTS,
        latents=pack(x0.clone()),
        num_inference_steps=STEPS,
        output_type="latent",
        height=height * PIXELS,
        width=width * PIXELS,
        **kwargs,
    ).images
    return unpack(packed, height, width)


def check_parity(label: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error <= 1e-5 (printed: pytest -s), and the two prompts give different latents."""
    error = ((ours - reference).norm() / reference.norm()).item()
    print(f"flux parity {label}: relative error {error:.2e}")
    assert error <= 1e-5, label
    assert not torch.allclose(ours[0], ours[1]), "the two prompts must give different latents"
    return error


@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 12)])
@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_dev_teacher_matches_flux_pipeline(tiny_dev, guidance, latent_hw):
    """[dev]: the guidance scale is the transformer's input (one branch); the time grid is linspace(1, 1/N, N)
    shifted by the packed token count, so two sizes get two grids."""
    teacher = load_teacher(tiny_dev, steps=STEPS)
    assert teacher.family.name == "flux" and teacher.solver_name == "euler"
    x0 = noise_for_indices(0, [0, 1], (CHANNELS, *latent_hw))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=guidance).x
    reference = flux_pipeline(tiny_dev, x0, guidance_scale=guidance)
    check_parity(f"[dev] {latent_hw[0]}x{latent_hw[1]} guidance {guidance}", ours, reference)


def test_dev_shift_and_guidance_input_matter(tiny_dev):
    """The two sizes are shifted differently, and the guidance input changes the sample (no silent constant)."""
    teacher = load_teacher(tiny_dev, steps=STEPS)
    small, large = (teacher.solver_for((CHANNELS, *hw)).time_grid for hw in [(8, 8), (16, 12)])
    assert small[1] != pytest.approx(large[1])
    x0 = noise_for_indices(0, [0, 1], (CHANNELS, 8, 8))
    low, high = (teacher.sample(x0.clone(), PROMPTS, guidance=g).x for g in (1.0, 3.5))
    assert (low - high).abs().max() > 1e-4


def test_schnell_teacher_matches_flux_pipeline(tiny_schnell):
    """[schnell]: no guidance input, shift 1, no dynamic shifting."""
    teacher = load_teacher(tiny_schnell, steps=STEPS)
    x0 = noise_for_indices(0, [0, 1], (CHANNELS, 16, 12))
    ours = teacher.sample(x0.clone(), PROMPTS).x
    reference = flux_pipeline(tiny_schnell, x0, guidance_scale=0.0)
    check_parity("[schnell] 16x12", ours, reference)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_true_cfg_matches_flux_pipeline(tiny_dev, tiny_schnell, variant):
    """True CFG (``true_cfg_scale`` 4, negative prompt ""): two branches through the one guidance wrapper, the
    [dev] guidance input (3.5) in both."""
    folder = tiny_dev if variant == "dev" else tiny_schnell
    teacher = load_teacher(folder, steps=STEPS)
    x0 = noise_for_indices(0, [0, 1], (CHANNELS, 8, 8))
    embedded = DEFAULT_GUIDANCE if variant == "dev" else None
    field = ClassifierFreeGuidance(teacher.model, 4.0, embedded=embedded)
    assert field.active
    cond = teacher.encoder.condition(PROMPTS, with_null=True)
    ours = teacher.solver_for(x0.shape[1:]).solve(field, x0.clone(), cond).x
    reference = flux_pipeline(folder, x0, guidance_scale=DEFAULT_GUIDANCE, true_cfg_scale=4.0, negative_prompt="")
    check_parity(f"[{variant}] true CFG 4", ours, reference)


def test_prompt_length_is_a_setting(tiny_dev):
    """``max_sequence_length`` (T5 tokens) as FluxPipeline's: 64 tokens equal its output at 64."""
    teacher = load_teacher(tiny_dev, steps=STEPS)
    teacher.encoder.max_sequence_length = 64
    assert teacher.encoder.condition(PROMPTS, with_null=False).embeds.shape[1] == 64
    x0 = noise_for_indices(0, [0, 1], (CHANNELS, 8, 8))
    ours = teacher.sample(x0.clone(), PROMPTS, guidance=3.5).x
    reference = flux_pipeline(tiny_dev, x0, guidance_scale=3.5, max_sequence_length=64)
    check_parity("[dev] 64 T5 tokens", ours, reference)


def test_a_student_keeps_its_recorded_guidance_input(tiny_dev, tmp_path):
    """A velocity folder of a [dev]-like network takes the guidance input its instaflow.json records, and its
    guidance scale is classifier-free guidance on top (not the input)."""
    folder = tmp_path / "student"
    shutil.copytree(tiny_dev, folder)
    mark_velocity_folder(folder, family="flux", **{INFO_GUIDANCE: 2.0, "max_sequence_length": 32})
    assert ModelFolder.open(folder).info[INFO_GUIDANCE] == 2.0
    student = load_teacher(folder, steps=2)
    assert student.kind == VELOCITY_KIND and not student.model.guidance_as_input
    cond = student.encoder.condition(PROMPTS, with_null=True)
    assert cond.guidance.tolist() == [2.0, 2.0] and cond.null.guidance.tolist() == [2.0]
    assert cond.embeds.shape[1] == 32
    field = ClassifierFreeGuidance(student.model, 3.0)
    assert field.active and field.embedded is None
    teacher = load_teacher(tiny_dev, steps=2)
    assert teacher.model.guidance_as_input and teacher.encoder.guidance == DEFAULT_GUIDANCE


def test_the_student_keeps_the_guidance_its_pairs_were_made_with(tiny_dev, tiny_schnell, tmp_path):
    """What the training modules and export ask the family: pairs of a released [dev] teacher at guidance g make
    the student's input g, which instaflow.json records and the exported folder reads back; pairs of a velocity
    teacher (classifier-free guidance) leave the student's input alone; [schnell] has none."""
    family = FAMILIES["flux"]
    encoder = ModelFolder.open(tiny_dev).load_encoder()
    family.configure_encoder_for_pairs(encoder, "released", 2.0)
    assert encoder.guidance == 2.0
    family.configure_encoder_for_pairs(encoder, "velocity", 5.0)
    assert encoder.guidance == 2.0
    info = family.encoder_info(encoder)
    assert info == {INFO_GUIDANCE: 2.0, "max_sequence_length": 512}
    folder = tmp_path / "export"
    shutil.copytree(tiny_dev, folder)
    mark_velocity_folder(folder, family="flux", **info)
    assert ModelFolder.open(folder).load_encoder().guidance == 2.0
    schnell = ModelFolder.open(tiny_schnell).load_encoder()
    family.configure_encoder_for_pairs(schnell, "released", 2.0)
    assert schnell.guidance is None and family.encoder_info(schnell)[INFO_GUIDANCE] is None


def test_flux_folder_without_t5(tiny_dev, tmp_path):
    folder = tmp_path / "no-t5"
    shutil.copytree(tiny_dev, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UserError, match=r"has no text_encoder_2/ subfolder; a FLUX.1 folder needs"):
        ModelFolder.open(folder)


def test_odd_latent_height_or_width(tiny_dev):
    teacher = load_teacher(tiny_dev, steps=1)
    for shape in [(CHANNELS, 7, 8), (CHANNELS, 8, 9)]:
        with pytest.raises(UserError, match="H and W multiples of 2"):
            teacher.check_latent_shape(shape)


def test_max_sequence_length_above_512(tiny_dev, tmp_path):
    encoder = load_teacher(tiny_dev, steps=1).encoder
    with pytest.raises(UserError, match="max_sequence_length must be between 1 and 512 for Flux, got 513"):
        FluxPromptEncoder((encoder.tokenizer, encoder.tokenizer_2), (encoder.text_encoder, encoder.text_encoder_2), 513)
    folder = tmp_path / "long"
    shutil.copytree(tiny_dev, folder)
    (folder / "instaflow.json").write_text(json.dumps({"kind": "velocity", "max_sequence_length": 600}))
    with pytest.raises(UserError, match="got 600"):
        load_teacher(folder, steps=1)


def test_guidance_value_for_a_network_without_guidance_input(tiny_dev, tiny_schnell):
    """A guidance value given to [schnell] or none given to [dev]: one clear line each."""
    x0 = noise_for_indices(0, [0], (CHANNELS, 8, 8))
    schnell = load_teacher(tiny_schnell, steps=1)
    field = ClassifierFreeGuidance(schnell.model, 1.0, embedded=3.5)
    cond = schnell.encoder.condition(PROMPTS[:1], with_null=False)
    with pytest.raises(UserError, match=r"has no guidance input \(\[schnell\]-like\)"):
        schnell.solver.solve(field, x0, cond)
    dev = load_teacher(tiny_dev, steps=1)
    cond = dev.encoder.condition(PROMPTS[:1], with_null=False).with_guidance(None)
    with pytest.raises(UserError, match=r"needs a guidance value"):
        dev.solver.solve(dev.model, x0, cond)


def test_student_of_dev_pairs_keeps_their_guidance_through_checkpoint_resume_and_export(tiny_dev, tmp_path):
    """Pairs of the released [dev] teacher at guidance 2 (not the default 3.5) make a student whose guidance input is
    2: in the module after setup, in its checkpoint record, after a resumed fit and a data-less load, in the export's
    instaflow.json, and in InstaFlowPipeline and load_teacher of the export, which sample exactly what the module's
    sampler samples (and not what the default input gives)."""
    from helpers import fit_quietly, story_pairs

    from instaflow_pl.checkpoints import read_checkpoint, read_record
    from instaflow_pl.data import TriplesDataModule
    from instaflow_pl.export import export_checkpoint
    from instaflow_pl.modules import ReflowModule
    from instaflow_pl.pipeline import InstaFlowPipeline

    guidance = 2.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    story_pairs("flux/pairs", tiny_dev, tmp_path / "pairs", prompts, f"--model.init_args.guidance={guidance}",
                "--data.init_args.repeats=4", "--model.init_args.steps=2")  # fmt: skip

    def module() -> ReflowModule:
        return ReflowModule(base_model=str(tiny_dev), ema_decay=0.5, val_steps=[1])

    first = module()
    assert first.encoder.guidance == DEFAULT_GUIDANCE  # before it sees the pairs
    fit_quietly(first, tmp_path / "pairs", tmp_path / "fit", steps=2)
    assert first.encoder.guidance == guidance
    first.trainer.save_checkpoint(tmp_path / "two.ckpt")
    record = read_record(read_checkpoint(tmp_path / "two.ckpt"), "ReflowModule")
    assert record.conditioning == {INFO_GUIDANCE: guidance, "max_sequence_length": 512}

    loaded = ReflowModule.load_from_checkpoint(tmp_path / "two.ckpt", weights_only=False)  # no data: the record
    assert loaded.encoder.guidance == guidance
    resumed = module()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path / "resume")  # fmt: skip
    data = TriplesDataModule(str(tmp_path / "pairs"), batch_size=4, val_fraction=0.0)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "two.ckpt")
    assert resumed.encoder.guidance == guidance and trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "three.ckpt")

    export_checkpoint(tmp_path / "three.ckpt", tmp_path / "export")
    info = json.loads((tmp_path / "export" / "instaflow.json").read_text())
    assert info[INFO_GUIDANCE] == guidance
    x0 = noise_for_indices(5, [0, 1], (CHANNELS, 8, 8))
    resumed.eval()
    with torch.no_grad():
        expected = resumed.sample(x0.clone(), PROMPTS, steps=2).x
    pipe = InstaFlowPipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.prompt_encoder().guidance == guidance
    ours = pipe(PROMPTS, latents=x0.clone(), num_inference_steps=2, output_type="latent").images
    assert torch.equal(ours, expected)
    teacher = load_teacher(tmp_path / "export", steps=2)
    assert teacher.encoder.guidance == guidance
    assert torch.equal(teacher.sample(x0.clone(), PROMPTS).x, expected)
    pipe.instaflow_info = {**pipe.instaflow_info, INFO_GUIDANCE: DEFAULT_GUIDANCE}
    other = pipe(PROMPTS, latents=x0.clone(), num_inference_steps=2, output_type="latent").images
    assert (other - expected).abs().max() > 1e-4, "the guidance input must change the sample"
