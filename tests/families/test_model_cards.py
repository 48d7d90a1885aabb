"""Every family's model card tells the truth: its first python snippet samples a tiny export of that family (with
stock diffusers alone, as the card says, and the same image as InstaFlowPipeline), it names the shipped
``instaflow_pipeline.py`` only when the export has it, and the LoRA card names the family's pipeline class. Flow
families' stock pipelines (SD3, Flux) sample an export exactly with the card's uniform ``sigmas`` (Flux's stock
default grid is that one); the shipped pipeline file of SD and SDXL exports equals InstaFlowPipeline exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import write_dataset
from helpers import two_step_checkpoint

from instaflow_pl.conventions import noise_for_indices
from instaflow_pl.export import export_checkpoint
from instaflow_pl.export.folder import PIPELINE_FILE
from instaflow_pl.families import FAMILIES
from instaflow_pl.modules import ReflowModule
from instaflow_pl.pipeline import InstaFlowPipeline

PROMPTS = ["a photo of a cat", "a red car in the city"]
STOCK_FAMILIES = [name for name, family in FAMILIES.items() if family.pipeline_classes]
"""Families with a stock diffusers pipeline (not the digits MLP, which only instaflow-pl loads)."""
FLOW_FAMILIES = [name for name in STOCK_FAMILIES if not FAMILIES[name].standalone_pipeline]
"""Families whose stock diffusers pipeline samples an export (no shipped pipeline file)."""
FILE_FAMILIES = [name for name in STOCK_FAMILIES if FAMILIES[name].standalone_pipeline]
"""Families whose exports ship the self-contained pipeline file."""


def needs_stock_diffusers(name: str) -> None:
    """Skip for a family whose card says stock diffusers cannot load its exports."""
    if name not in STOCK_FAMILIES:
        pytest.skip(f"{name}: stock diffusers cannot load its network (the card says so)")


def _fit(base: Path, family: str, root: Path, **module_args) -> Path:
    """Two CPU steps of a ReflowModule on random triples; returns the checkpoint."""
    from instaflow_pl.model_folder import ModelFolder

    shape = ModelFolder.open(base).geometry.shape
    data = write_dataset(root / "pairs", count=8, shard_size=8, shape=shape, family=family)
    module = ReflowModule(base_model=str(base), ema_decay=0.5, val_steps=[1], **module_args)
    return two_step_checkpoint(module, data, root)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_base(request, tmp_path_factory) -> tuple[str, Path]:
    """(family name, its tiny base folder)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"cards-{name}")
    return name, FAMILIES[name].build_tiny(root / "base")


@pytest.fixture(scope="module")
def export(family_base, tmp_path_factory) -> tuple[str, Path]:
    """(family name, a tiny export of that family)."""
    name, base = family_base
    root = tmp_path_factory.mktemp(f"export-{name}")
    export_checkpoint(_fit(base, name, root / "fit"), root / "2rf")
    return name, root / "2rf"


def first_python_block(card: str) -> str:
    """The first fenced python block of a markdown text."""
    found = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert found, "the card has no python snippet"
    return found.group(1)


_HIDE_INSTAFLOW_PL = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "instaflow_pl":
            raise ImportError("instaflow_pl is hidden")

sys.meta_path.insert(0, Hide())
"""


def run_without_instaflow_pl(script: str, tmp_path: Path, *args: str) -> None:
    """Run ``script`` in a fresh process that cannot import instaflow_pl (a user with diffusers alone)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", _HIDE_INSTAFLOW_PL + script, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _pipe(folder: Path) -> InstaFlowPipeline:
    pipe = InstaFlowPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the model card -----------------------------------------------------------------------------------------------


def test_card_first_snippet_samples_the_export_with_diffusers_alone(export, tmp_path):
    """The card's first python snippet, run as written (``DIR`` set to a copy of the export) in a process without
    instaflow-pl, gives an image, and the same image InstaFlowPipeline gives for the same noise and steps."""
    name, out = export
    needs_stock_diffusers(name)
    folder = tmp_path / "received"
    shutil.copytree(out, folder)  # as a user who was sent the folder
    card = (folder / "README.md").read_text()
    snippet = first_python_block(card.split("## Use", 1)[1])
    assert "instaflow_pl" not in snippet, "the first snippet needs diffusers only"
    steps = json.loads((folder / "instaflow.json").read_text()).get("student_steps") or 1  # the card's steps
    seeded = re.sub(r"^image = ", "import torch; torch.manual_seed(0)\nimage = ", snippet, flags=re.MULTILINE)
    assert seeded != snippet, "the snippet ends by sampling `image = pipe(...)`"
    script = f"import sys\nimport numpy as np\nDIR = sys.argv[1]\n{seeded}\nnp.save(sys.argv[2], np.asarray(image))\n"
    run_without_instaflow_pl(script, tmp_path, str(folder), str(tmp_path / "image.npy"))
    image = np.load(tmp_path / "image.npy")
    pipe = _pipe(out)
    size = pipe.default_size
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    torch.manual_seed(0)
    expected = np.asarray(pipe("a photo of a cat", num_inference_steps=steps).images[0])
    assert np.array_equal(image, expected), f"{name}: the card's stock snippet samples what InstaFlowPipeline samples"


def test_card_names_the_pipeline_file_only_when_the_export_ships_it(export):
    name, out = export
    card = (out / "README.md").read_text()
    ships = (out / PIPELINE_FILE).is_file()
    assert ships == FAMILIES[name].standalone_pipeline
    assert (PIPELINE_FILE in card) == ships, name
    assert ("trust_remote_code" in card) == ships, name
    use = card.split("## Use", 1)[1]
    assert "InstaFlowPipeline.from_pretrained(DIR)" in use and "instaflow-pl sample --model DIR" in use
    if name not in STOCK_FAMILIES:
        assert "Stock diffusers cannot" in use, f"{name}: the card says stock diffusers cannot load it"
    elif not ships:
        assert "must not step" not in use, f"{name}: a stock scheduler does step a flow family's export"


def test_lora_card_loads_the_adapters_with_the_family_pipeline(family_base, tmp_path):
    """The LoRA card names the family's pipeline class (no other family's), and its snippet loads the adapters."""
    name, base = family_base
    needs_stock_diffusers(name)
    ckpt = _fit(base, name, tmp_path / "fit", lora={"rank": 2})
    export_checkpoint(ckpt, tmp_path / "lora", lora_format="file")
    card = (tmp_path / "lora" / "README.md").read_text()
    family = FAMILIES[name]
    assert family.lora_pipeline in card
    others = {f.lora_pipeline for f in FAMILIES.values()} - {family.lora_pipeline}
    assert not [other for other in others if other in card], card
    snippet = first_python_block(card)
    scope: dict = {"DIR": str(tmp_path / "lora")}
    exec(snippet, scope)  # noqa: S102 - the card's own snippet, on a tiny local base model
    network = getattr(scope["pipe"], family.network_folder)
    assert any("lora" in key for key in network.state_dict()), "the adapters were loaded"


# ---- what the cards claim -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_flow_family_stock_pipeline_with_uniform_sigmas_equals_instaflow_pipeline(export, guidance):
    """SD3 and Flux: the stock pipeline with ``sigmas=[1 - i / k ...]`` samples InstaFlowPipeline's latents (exactly
    without guidance; the null prompt's separate or batched call differs in the last bits with it). Its default grid
    is the family pipeline's: SD3's differs for k > 1; Flux's, ``linspace(1, 1/k, k)``, is the uniform one, so stock
    FluxPipeline without ``sigmas`` samples the export too. The family says how its stock pipeline takes the noise
    and the guidance (Flux: packed latents, the recorded guidance input, classifier-free guidance as true CFG)."""
    name, out = export
    if name not in FLOW_FAMILIES:
        pytest.skip(f"{name} exports are sampled with the shipped pipeline file")
    family = FAMILIES[name]
    info = json.loads((out / "instaflow.json").read_text())
    pipe = _pipe(out)
    stock = getattr(diffusers, family.lora_pipeline).from_pretrained(out)
    stock.set_progress_bar_config(disable=True)
    shape = pipe.latent_shape()
    x0 = noise_for_indices(0, range(len(PROMPTS)), shape)

    def sample_stock(k: int, **extra) -> torch.Tensor:
        args = family.stock_sampling_args(x0.clone(), guidance, info, pipe.vae_scale_factor)
        images = stock(PROMPTS, num_inference_steps=k, output_type="latent", **args, **extra).images
        return family.stock_latents(images, shape)

    for k in (1, 4):
        ours = pipe(PROMPTS, latents=x0.clone(), num_inference_steps=k, guidance_scale=guidance, output_type="latent")
        ours = ours.images
        sigmas = [1 - i / k for i in range(k)]
        error = ((sample_stock(k, sigmas=sigmas) - ours).abs().max() / ours.abs().max()).item()
        gap = ((sample_stock(k) - ours).abs().max() / ours.abs().max()).item()
        print(f"{name} stock pipeline k={k} guidance {guidance}: uniform sigmas {error:.1e}, default grid {gap:.1e}")
        assert error == 0.0 if guidance <= 1 else error <= 1e-5, (k, error)
        default_sigmas = family.flow_sigmas(k)
        uniform_default = default_sigmas is not None and np.allclose(default_sigmas, sigmas, rtol=0, atol=1e-12)
        if uniform_default:  # Flux: the stock default is the uniform grid, the same sample at every k
            assert gap == 0.0 if guidance <= 1 else gap <= 1e-5, (k, gap)
        else:
            assert (gap <= 1e-5) if k == 1 else (gap > 1e-3), (k, gap)


_SAMPLE_WITH_THE_FILE = """
import json, sys
import torch
from diffusers import DiffusionPipeline

folder, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="instaflow_pipeline", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x0 = torch.load(folder + "/../x0.pt")
images = [pipe(PROMPTS, latents=x0, num_inference_steps=s, guidance_scale=g, output_type="latent").images
          for s, g in cases]
torch.save({"class": type(pipe).__module__ + "." + type(pipe).__name__, "images": images}, out)
"""


@pytest.mark.parametrize("zeros_for_null", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_shipped_pipeline_file_equals_instaflow_pipeline(export, tmp_path, zeros_for_null):
    """SD and SDXL: the shipped file, loaded by stock diffusers without instaflow-pl, samples InstaFlowPipeline's
    latents exactly, with and without guidance (SDXL: with a zero or an encoded null prompt)."""
    name, out = export
    if name not in FILE_FAMILIES:
        pytest.skip(f"{name} exports ship no pipeline file")
    if not zeros_for_null and "force_zeros_for_empty_prompt" not in FAMILIES[name].pipeline_config:
        pytest.skip(f"{name} has no force_zeros_for_empty_prompt")
    folder = tmp_path / "received"
    shutil.copytree(out, folder)
    if not zeros_for_null:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    pipe = _pipe(folder)
    x0 = noise_for_indices(3, range(len(PROMPTS)), pipe.latent_shape())
    torch.save(x0, tmp_path / "x0.pt")
    cases = [(1, 0.0), (1, 3.0), (4, 0.0), (4, 3.0)]
    script = _SAMPLE_WITH_THE_FILE.replace("PROMPTS", repr(PROMPTS))
    run_without_instaflow_pl(script, tmp_path, str(folder), str(tmp_path / "out.pt"), json.dumps(cases))
    got = torch.load(tmp_path / "out.pt")
    assert got["class"].endswith("instaflow_pipeline.InstaFlowPipeline"), got["class"]
    for (steps, guidance), image in zip(cases, got["images"], strict=True):
        ours = pipe(PROMPTS, latents=x0, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
        assert (image - ours.images).abs().max().item() == 0.0, (name, steps, guidance, zeros_for_null)
