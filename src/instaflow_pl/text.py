"""Prompt encoding: tokenizer + frozen text encoder, truncation to the model's length, the null prompt."""

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
    """Encodes prompts the way diffusers' Stable Diffusion pipeline does (padded to the tokenizer's max length).

    The text encoder is frozen. A prompt longer than the tokenizer allows is truncated, with one warning.
    With ``cache_mb > 0``, embeddings of recent prompts are kept (least recently used first out), so datasets whose
    prompts repeat (a fixed caption set over many epochs, the digits demo's ten prompts) encode each prompt once.
    Cached prompts are encoded one at a time, so an embedding never depends on which batch it first came in
    (batched matrix products may differ in the last bits), and a resumed run sees the same numbers.

    Args:
        tokenizer: A CLIP tokenizer (``model_max_length`` sets the length).
        text_encoder: A CLIP text model; its last hidden state is the embedding.
        cache_mb: Memory for cached embeddings, on the encoder's device (0: no cache).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, cache_mb: float = 0.0):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.cache_mb = cache_mb
        self._warned_truncation = False
        self._null: torch.Tensor | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_folder(cls, folder: str, dtype: torch.dtype = torch.float32, cache_mb: float = 0.0) -> PromptEncoder:
        """Load ``tokenizer/`` and ``text_encoder/`` from a diffusers-format folder."""
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        from instaflow_pl.teachers.folder import resolve_model_folder

        hf_logging.disable_progress_bar()
        root = resolve_model_folder(folder)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype)
        return cls(tokenizer, text_encoder, cache_mb)

    @property
    def max_length(self) -> int:
        """Number of tokens every prompt is padded or truncated to."""
        return int(self.tokenizer.model_max_length)

    def _warn_if_truncated(self, prompts: Sequence[str], attention_mask: torch.Tensor) -> None:
        if self._warned_truncation:
            return
        # Only a row that fills every position can have been cut; re-tokenize just those, untruncated.
        full = [p for p, mask in zip(prompts, attention_mask[:, -1].tolist(), strict=True) if mask]
        if not full:
            return
        lengths = [len(ids) for ids in self.tokenizer(full, truncation=False)["input_ids"]]
        too_long = [p for p, n in zip(full, lengths, strict=True) if n > self.max_length]
        if too_long:
            self._warned_truncation = True
            rank_zero_warn(
                f"{len(too_long)} prompt(s) exceed the tokenizer's {self.max_length} tokens and were truncated, "
                f"e.g. {too_long[0][:60]!r}... (this warning is shown once)"
            )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings of shape (B, max_length, D) on the text encoder's device and dtype."""
        prompts = list(prompts)
        if self.cache_mb <= 0:
            return self._encode(prompts)
        reference = next(self.text_encoder.parameters())
        stale = next(iter(self._cache.values()), reference)
        if stale.device != reference.device or stale.dtype != reference.dtype:
            self._cache.clear()
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self._encode([prompt])[0]
        for prompt in dict.fromkeys(prompts):
            self._cache.move_to_end(prompt)
        embeds = torch.stack([self._cache[p] for p in prompts])
        limit = int(self.cache_mb * 2**20 / max(embeds[0].numel() * embeds.element_size(), 1))
        while len(self._cache) > max(limit, len(set(prompts))):
            self._cache.popitem(last=False)
        return embeds

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        self._warn_if_truncated(prompts, tokens.attention_mask)
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def condition(self, prompts: Sequence[str], with_null: bool = True) -> TextCondition:
        """Conditioning for a batch; ``with_null`` adds the null-prompt embedding needed for guidance."""
        embeds = self.encode(prompts)
        if not with_null:
            return TextCondition(embeds)
        if self._null is None or self._null.device != embeds.device or self._null.dtype != embeds.dtype:
            self._null = self.encode([NULL_PROMPT])
        return TextCondition(embeds, self._null)
