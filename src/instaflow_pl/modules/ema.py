"""Exponential moving average of the weights a model trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class EMA(nn.Module):
    """Averages ``ema = decay * ema + (1 - decay) * weights`` of a model's trainable parameters and its buffers.

    Frozen parameters never change, so their average is the parameter itself: they are not copied (with most of a
    network frozen, or with LoRA, the EMA costs only what trains). The first update copies the weights. Floating-point
    tensors are averaged in one fused call; integer buffers are copied. State-dict keys are ``module.<name>`` (the
    model's own parameter names) and ``n_averaged``.

    Built over a sharded model (FSDP2: DTensor parameters), the averages are DTensors sharded like the parameters:
    each rank averages and checkpoints its own shards, and nothing is gathered.

    Args:
        model: The model to follow; the parameters that require grad now are the ones averaged.
        decay: The decay, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        tracked = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
        self.names = [name for name, _ in tracked]
        self.shadow = [tensor.detach().clone() for _, tensor in tracked]

    def _targets(self, model: nn.Module) -> list[torch.Tensor]:
        _reshard(model)  # a sharded model's parameters are its shards only while resharded
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        return [tensors[name] for name in self.names]

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .half() move the shadow tensors too
        self.shadow = [fn(t) for t in self.shadow]
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (of a sharded model: each rank its own shards, with
        no communication)."""
        targets = [_local(t) for t in self._targets(model)]
        shadow = [_local(t) for t in self.shadow]
        floats = [(a, b) for a, b in zip(shadow, targets, strict=True) if a.is_floating_point()]
        if floats:
            ours, theirs = [a for a, _ in floats], [b.detach() for _, b in floats]
            if int(self.n_averaged) == 0:
                torch._foreach_copy_(ours, theirs)
            else:
                torch._foreach_lerp_(ours, theirs, 1.0 - self.decay)
        for a, b in zip(shadow, targets, strict=True):
            if not a.is_floating_point():
                a.copy_(b)
        self.n_averaged += 1

    def numel(self) -> int:
        """Number of averaged elements (what the EMA costs in memory, times the element size)."""
        return sum(t.numel() for t in self.shadow)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the averaged weights in ``model`` (no copy: the tensors' storage is swapped, and
        swapped back afterwards, also on error). Before the first update the model's own weights are used."""
        if int(self.n_averaged) == 0:
            yield model
            return
        targets = self._targets(model)
        self._swap(targets)
        try:
            yield model
        finally:
            _reshard(model)  # gathered copies of the averages must not outlive the swap
            self._swap(targets)

    @torch.no_grad()
    def _swap(self, targets: list[torch.Tensor]) -> None:
        for i, target in enumerate(targets):
            if _is_dtensor(target):
                # A sharded parameter's storage belongs to FSDP (its all-gather reads it), so the values move instead.
                ours, theirs = _local(self.shadow[i]), _local(target)
                held = theirs.clone()
                theirs.copy_(ours)
                ours.copy_(held)
            else:
                target.data, self.shadow[i] = self.shadow[i], target.data

    # The shadow tensors are saved under the model's own names, ``module.<name>``, so a checkpoint reads like the
    # model's state dict (export overlays them on the raw weights).

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in zip(self.names, self.shadow, strict=True):
            destination[f"{prefix}module.{name}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        for i, name in enumerate(self.names):
            key = f"{prefix}module.{name}"
            if key in state_dict:
                with torch.no_grad():
                    self.shadow[i].copy_(state_dict[key])
            else:
                missing_keys.append(key)
        # torch's own check calls every ``module.*`` key unexpected (the EMA has no child called module). Averages of
        # parameters that are frozen here (checkpoints of format 1 kept them all) are ignored: a frozen parameter's
        # average is the parameter itself.
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(f"{prefix}module.")]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter, as a view of its storage; any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _reshard(model: nn.Module) -> None:
    """Free the gathered weights of a sharded (FSDP2) model, so its parameters are the DTensor shards again (FSDP
    keeps the outermost unit's weights gathered after a forward without gradients)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
