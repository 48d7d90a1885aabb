"""DMD's training iterations at Stable Diffusion 1.5 shapes, with the live tensors counted on fake tensors.

A DMD fit holds three copies of the network (the generator, the frozen real score and the trainable fake score) and,
with the fake score trained in full, its gradients and two AdamW moments: about 24 GiB in fp32 at SD 1.5 size, more
than the machines this project measures on can give one process. ``make bench-scale`` runs such a case here instead:
:class:`~instaflow_pl.modules.DMDModule` is built from the same fit config the real ``instaflow-pl fit`` would read
(``bench/scale.py`` writes it), its weights are turned into *fake* tensors (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and strides, no data), and two DMD iterations (a generator step with its EMA update, then a
fake-score-only step) run through the module's own pieces (``generate``, ``generator_loss``, ``fake_score_loss``,
``configure_optimizers``, the EMA, ``clip_gradients``) in the order ``DMDModule._train_on_batch`` takes them, while
:class:`bench.flux_memory.PeakMemory` adds every storage an operation creates and subtracts it when it is freed.

The prompts are encoded before the count (the tokenizer's ids must be real tensors; the frozen text encoder's
activations at one prompt batch are a few MB). What the count leaves out: the process's runtime (libraries, allocator
slack; ``bench/scale.py`` adds the difference a real run of the LoRA case shows between its peak RSS and its count),
the validation batch (no gradients) and the checkpoint (it refers to the tensors counted). ``--real`` counts the same
iterations on real tensors: on the tiny folder, the tests check that the two counts agree (the fake run is the real
run's bookkeeping).

Building the module loads the real weights first (the three networks in fp32 and the text encoder: about 10 GiB at
SD 1.5 size, for a minute), then drops them.

Usage (``bench/scale.py`` runs it in a fresh child process)::

    python -m bench.dmd_count FIT_CONFIG.yaml RESULT.json [--real] [--precision 32-true|bf16-mixed]
                              [--foreach | --fused]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

GiB = 2**30
PROMPT = "a photograph of an astronaut riding a horse"


def _instantiate(spec: Any) -> Any:
    """A ``{class_path, init_args}`` mapping as the factory LightningCLI would pass (a partial); other values as
    they are."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return functools.partial(cls, **spec.get("init_args", {}))


def build_module(model: dict[str, Any], optimizer_path: str = "") -> nn.Module:
    """The config's ``model`` section built as LightningCLI builds it (optimizers as factories).

    ``optimizer_path``: ``foreach`` makes the optimizers take AdamW's multi-tensor path, as they do by default on a
    GPU (a CPU takes one tensor at a time); ``fused`` its fused kernel; empty: the config's options.
    """
    args = dict(model.get("init_args", {}))
    for key in ("optimizer", "fake_optimizer"):
        if isinstance(args.get(key), dict):
            spec = args[key]
            if optimizer_path:
                spec = {**spec, "init_args": {**spec.get("init_args", {}), optimizer_path: True}}
            args[key] = _instantiate(spec)
    return _instantiate(model)(**args) if "class_path" in model else None


def to_fake(module: nn.Module, mode: Any) -> None:
    """Replace every parameter and buffer of ``module`` (and its EMA's averages) by a fake tensor of the same shape,
    dtype and strides, in place; the real storages are freed. The EMA's update counter stays real (the EMA reads
    it as a Python int)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(mode.from_tensor(param.data), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and name != "n_averaged":
                sub._buffers[name] = mode.from_tensor(buffer)
    ema = getattr(module, "ema", None)
    if ema is not None:
        ema.shadow = [mode.from_tensor(t) for t in ema.shadow]


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float | None) -> None:
    """DMDModule._step without Lightning: zero the grads, backward, clip, step."""
    from instaflow_pl.modules.base import clip_gradients

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(optimizer, max_grad_norm)
    optimizer.step()


def iteration(
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    cond: Any,
    shape: list[int],
    generator_step: bool,
    autocast: contextlib.AbstractContextManager,
) -> None:
    """One DMD iteration as ``DMDModule._train_on_batch`` takes it, from the encoded prompts ``cond``: the
    generator's sample (with its graph on a generator step), the generator's distribution-matching step and EMA
    update, then the fake score's step."""
    h = module.hparams
    generator_opt, fake_opt = optimizers
    with autocast:
        noise = torch.randn(len(cond), *shape)
        x = module.generate(noise, cond, grad=generator_step)
        out = None
        if generator_step:
            out = module.generator_loss(x, cond)
            _step(generator_opt, out.loss, h.max_grad_norm)
            if module.ema is not None:
                module.ema.update(module.velocity)
        fake = module.fake_score_loss(x.detach(), cond)
        _step(fake_opt, fake.loss, h.max_grad_norm)
        del out, fake, x, cond


def count(config: dict[str, Any], real: bool, precision: str, optimizer_path: str = "") -> dict[str, Any]:
    """Build the fit config's module, run a generator iteration and a fake-score iteration, count live storages."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.flux_memory import PeakMemory

    torch.manual_seed(0)
    start = time.perf_counter()
    module = build_module(config["model"], optimizer_path)
    module.train()
    built = time.perf_counter() - start
    mode = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    batch = int(config["data"]["init_args"]["batch_size"])
    shape = list(config["data"]["init_args"]["expected_latent_shape"])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    peaks, lives = [], []
    h = module.hparams
    with torch.no_grad():  # the tokenizer's ids must be real; the frozen encoder's activations are a few MB
        cond = module.condition([PROMPT] * batch, dropout=h.prompt_dropout, with_null=h.real_guidance > 1.0)
    if mode is not None:
        to_fake(module, mode)
        cond = cond.map(mode.from_tensor)
    with mode if mode is not None else contextlib.nullcontext():
        optimizers = module.configure_optimizers()
        tensors = [*module.parameters(), *module.buffers(), *cond.parts().values()]
        tensors += [*cond.null.parts().values()] if cond.null is not None else []
        if module.ema is not None:
            tensors += module.ema.shadow
        counter = PeakMemory(tensors)
        with counter:
            for index in range(2):  # iteration 0 updates the generator (generator_every), iteration 1 does not
                iteration(module, optimizers, cond, shape, index == 0, autocast)
                peaks.append(counter.peak)
                lives.append(counter.live)
                counter.peak = counter.live  # the next iteration's own peak
    trained = {
        name: sum(p.numel() for p in part.parameters() if p.requires_grad)
        for name, part in (("generator", module.velocity), ("fake_score", module.fake_score))
    }
    return {
        "status": 0,
        "real_tensors": real,
        "precision": precision,
        "optimizer_path": optimizer_path or "config",
        "fixed_gib": counter.start / GiB,
        "peak_gib": max(peaks) / GiB,
        "iteration_peaks_gib": [p / GiB for p in peaks],
        "after_iterations_gib": [b / GiB for b in lives],
        "count_bytes": [counter.start, *peaks],
        "params": sum(p.numel() for p in module.parameters()),
        "trained": trained,
        "build_s": built,
        "wall_s": time.perf_counter() - start,
        "step_s": [],
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, count, write the result JSON."""
    import yaml

    from bench.memory import _peak_rss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the fit config bench/scale.py wrote")
    parser.add_argument("result", type=Path, help="where the result JSON goes")
    parser.add_argument("--real", action="store_true", help="count on real tensors (small folders only)")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--foreach", action="store_true", help="AdamW's multi-tensor path (a GPU's default)")
    parser.add_argument("--fused", action="store_true", help="AdamW's fused kernel")
    opts = parser.parse_args(argv)
    config = yaml.safe_load(opts.config.read_text())
    path = "fused" if opts.fused else "foreach" if opts.foreach else ""
    result = count(config, opts.real, opts.precision, path)
    result["process_peak_rss_gib"] = _peak_rss() / GiB
    opts.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
