"""Prompt encoding: the machinery every family's encoder shares (tokenizing with truncation, a per-prompt cache,
the null prompt), and the CLIP tower reading that SD, SDXL and SD3 use. What a family makes of its towers' outputs
is in its file under :mod:`instaflow_pl.families`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from instaflow_pl.velocity.condition import TextCondition

NULL_PROMPT = ""
"""The null prompt of classifier-free guidance."""


class PromptEncoder(nn.Module):
    """Turns prompts into a :class:`TextCondition` the way the family's diffusers pipeline does (frozen encoders).

    Subclasses (one per family) define :meth:`encode_batch`. A prompt longer than a tokenizer allows is truncated,
    with one warning. With ``cache_mb > 0``, conditions of recent prompts are kept (least recently used first out),
    so datasets whose prompts repeat (a fixed caption set over many epochs, the digits demo's ten prompts) encode
    each prompt once. Cached prompts are encoded one at a time, so a condition never depends on which batch it first
    came in (batched matrix products may differ in the last bits), and a resumed run sees the same numbers.

    Args:
        cache_mb: Memory for cached conditions, on the encoders' device (0: no cache).
        zero_null: The null condition is all zeros rather than the encoded empty prompt (SDXL folders with
            ``force_zeros_for_empty_prompt``, as diffusers does).
    """

    def __init__(self, cache_mb: float = 0.0, zero_null: bool = False):
        super().__init__()
        self.cache_mb = cache_mb
        self.zero_null = zero_null
        self._warned_truncation = False
        self._null: TextCondition | None = None
        self._cache: OrderedDict[str, TextCondition] = OrderedDict()

    def freeze(self) -> None:
        """Freeze every encoder (called by subclasses once their towers are registered)."""
        self.requires_grad_(False).eval()

    def encode_batch(self, prompts: list[str]) -> TextCondition:
        """The condition of ``prompts`` (no null condition); each family defines it."""
        raise NotImplementedError

    def _reference(self) -> torch.Tensor:
        return next(self.parameters())

    def tokenize(self, tokenizer, prompts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids padded or truncated to ``max_length`` (default: the tokenizer's), on the encoders' device."""
        length = int(tokenizer.model_max_length if max_length is None else max_length)
        tokens = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        self._warn_if_truncated(tokenizer, prompts, tokens.attention_mask, length)
        return tokens.input_ids.to(self._reference().device)

    def _warn_if_truncated(self, tokenizer, prompts: Sequence[str], attention_mask: torch.Tensor, length: int) -> None:
        if self._warned_truncation:
            return
        # Only a row that fills every position can have been cut; re-tokenize just those, untruncated.
        full = [p for p, mask in zip(prompts, attention_mask[:, -1].tolist(), strict=True) if mask]
        if not full:
            return
        lengths = [len(ids) for ids in tokenizer(full, truncation=False)["input_ids"]]
        too_long = [p for p, n in zip(full, lengths, strict=True) if n > length]
        if too_long:
            self._warned_truncation = True
            rank_zero_warn(
                f"{len(too_long)} prompt(s) exceed a tokenizer's {length} tokens and were truncated, "
                f"e.g. {too_long[0][:60]!r}... (this warning is shown once)"
            )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """The condition of ``prompts`` on the encoders' device and dtype (through the cache when there is one)."""
        prompts = list(prompts)
        if self.cache_mb <= 0:
            return self.encode_batch(prompts)
        reference = self._reference()
        stale = next(iter(self._cache.values()), None)
        if stale is not None and (stale.embeds.device != reference.device or stale.embeds.dtype != reference.dtype):
            self._cache.clear()
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self.encode_batch([prompt])
        for prompt in dict.fromkeys(prompts):
            self._cache.move_to_end(prompt)
        cond = self._gather(prompts)
        row_bytes = sum(v[0].numel() * v.element_size() for v in cond.parts().values())
        limit = int(self.cache_mb * 2**20 / max(row_bytes, 1))
        while len(self._cache) > max(limit, len(set(prompts))):
            self._cache.popitem(last=False)
        return cond

    def _gather(self, prompts: list[str]) -> TextCondition:
        """The cached conditions of ``prompts``, in order: each distinct prompt's rows joined once, then indexed (a
        batch of 256 draws from ten prompts costs one small join and one gather, not 256 joins)."""
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) == len(prompts):
            return TextCondition.stack([self._cache[p] for p in prompts])
        position = {prompt: i for i, prompt in enumerate(distinct)}
        index = torch.tensor([position[p] for p in prompts], device=self._reference().device)
        return TextCondition.stack([self._cache[p] for p in distinct]).rows(index)

    def null_condition(self) -> TextCondition:
        """The null prompt's condition (batch 1): the encoded "" or, with ``zero_null``, zeros of its shapes."""
        reference = self._reference()
        null = self._null
        if null is None or null.embeds.device != reference.device or null.embeds.dtype != reference.dtype:
            null = self.encode([NULL_PROMPT])
            self._null = null = null.map(torch.zeros_like) if self.zero_null else null
        return null

    def condition(self, prompts: Sequence[str], with_null: bool = True) -> TextCondition:
        """Conditioning for a batch; ``with_null`` adds the null condition needed for guidance."""
        cond = self.encode(prompts)
        return cond.with_null(self.null_condition()) if with_null else cond


def clip_states(
    encoder: PromptEncoder, tokenizer, text_encoder: nn.Module, prompts: Sequence[str], layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP text tower's hidden states at ``layer`` (-1: last, -2: penultimate) and its first output: the pooled
    or projected embedding for ``CLIPTextModelWithProjection``, the last hidden state for ``CLIPTextModel``."""
    ids = encoder.tokenize(tokenizer, prompts)
    if layer == -1:
        out = text_encoder(ids)
        return out[0], out[0]
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[layer], out[0]
