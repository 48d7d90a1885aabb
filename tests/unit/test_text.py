"""Prompt encoding: padding, truncation with one warning, the null prompt."""

from __future__ import annotations

import warnings

import torch

from instaflow_pl.teachers import load_teacher


def test_long_prompt_is_truncated_with_one_warning(tiny_sd):
    encoder = load_teacher(tiny_sd).encoder
    long_prompt = "a photo of " + "zzz " * 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = encoder.encode([long_prompt, "a cat"]).embeds
        encoder.encode([long_prompt])
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1, messages
    assert first.shape == (2, encoder.max_length, 32)
    # Prompts that differ only past the limit encode identically: the tail was cut.
    other_tail = encoder.encode(["a photo of " + "zzz " * 90 + "a red horse"]).embeds
    assert torch.equal(other_tail[0], first[0])


def test_null_prompt_is_the_empty_string(tiny_sd):
    encoder = load_teacher(tiny_sd).encoder
    cond = encoder.condition(["a cat"])
    assert torch.equal(cond.null.embeds, encoder.encode([""]).embeds)
    assert encoder.condition(["a cat"], with_null=False).null is None
