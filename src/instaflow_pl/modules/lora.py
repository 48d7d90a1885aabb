"""LoRA adapters on the velocity network (with peft, the library diffusers uses), and their diffusers file layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError

ADAPTER = "default"


@dataclass
class LoraOptions:
    """Low-rank adapters: only they train; the network's own weights stay frozen.

    Attributes:
        rank: Rank r of each adapter (B A with A: r x in, B: out x r).
        alpha: Scale numerator: the update is ``(alpha / rank) B A``; null means alpha = rank.
        target_modules: Names (or name endings) of the linear/conv layers that get adapters; the default is the
            attention projections of a diffusers UNet or transformer, as diffusers' LoRA training scripts use.
        dropout: Dropout on the adapters' input.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0 (or null for alpha = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty; name the layers that get adapters (e.g. to_q)")
        self.target_modules = list(self.target_modules)

    @classmethod
    def parse(cls, value: LoraOptions | dict[str, Any] | None) -> LoraOptions | None:
        """Options from a config value (a dict from a checkpoint's hyperparameters, or already options)."""
        if value is None or isinstance(value, LoraOptions):
            return value
        if not isinstance(value, dict):
            raise UserError(f"lora must be a mapping like {{rank: 4}}, got {value!r}")
        unknown = sorted(set(value) - {"rank", "alpha", "target_modules", "dropout"})
        if unknown:
            raise UserError(f"lora: unknown option(s) {', '.join(unknown)}; use rank, alpha, target_modules, dropout")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for hyperparameters and checkpoint records, loadable without pickle)."""
        return asdict(self)

    def peft_config(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=self.target_modules,
            lora_dropout=self.dropout,
            init_lora_weights=True,  # B = 0: the adapted network starts as the base network
        )


def add_lora(network: nn.Module, options: LoraOptions) -> int:
    """Freeze ``network`` and add adapters to it in place; return the number of adapter parameters.

    Raises:
        UserError: no layer matches ``target_modules``.
    """
    from peft import inject_adapter_in_model

    network.requires_grad_(False)
    try:
        inject_adapter_in_model(options.peft_config(), network, adapter_name=ADAPTER)
    except ValueError as err:
        raise UserError(f"lora.target_modules {options.target_modules} match no layer of the network ({err})") from None
    count = 0
    for name, param in network.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            count += param.numel()
    return count


def diffusers_lora_layers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights among a network's state dict, in the layout diffusers' ``save_lora_weights`` takes as
    ``unet_lora_layers`` or ``transformer_lora_layers`` (``<layer>.lora.down.weight`` ...), which
    ``load_lora_weights`` reads back."""
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_names = {k.replace(f".{ADAPTER}.", "."): v for k, v in weights.items() if ".lora_" in k}
    return convert_state_dict_to_diffusers(peft_names)


def merge_lora(network: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and remove the adapters: a plain network with merged weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(network.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge(safe_merge=True)
                setattr(parent, child_name, child.get_base_layer())
    return network
