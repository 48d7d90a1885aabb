"""The one guidance wrapper: batched cond + uncond, w <= 1 evaluates the conditional branch only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.velocity import ClassifierFreeGuidance, TextCondition


class Recorder(nn.Module):
    """Output = x + mean embedding; records the batch sizes and conditions it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append((x.shape[0], cond.embeds.clone()))
        return x + cond.embeds.mean(dim=(1, 2)).view(-1, 1)


def make_cond(batch=3):
    return TextCondition(
        torch.arange(batch, dtype=torch.float32).view(batch, 1, 1).expand(batch, 2, 2) + 1.0,
        null=TextCondition(torch.zeros(1, 2, 2)),
    )


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_no_guidance_evaluates_conditional_branch_only(scale):
    model = Recorder()
    x = torch.zeros(3, 1)
    out = ClassifierFreeGuidance(model, scale)(x, torch.zeros(3), make_cond())
    assert [c[0] for c in model.calls] == [3]
    assert torch.equal(out, torch.tensor([[1.0], [2.0], [3.0]]))


def test_guidance_is_one_batched_call_with_the_formula():
    model = Recorder()
    x = torch.zeros(3, 1)
    out = ClassifierFreeGuidance(model, 4.0)(x, torch.zeros(3), make_cond())
    assert [c[0] for c in model.calls] == [6]
    assert torch.equal(model.calls[0][1][:3], torch.zeros(3, 2, 2)), "unconditional half comes first"
    # uncond = 0, cond = k + 1  ->  0 + 4 (k + 1 - 0)
    assert torch.equal(out, torch.tensor([[4.0], [8.0], [12.0]]))


def test_negative_guidance_is_refused():
    with pytest.raises(UserError, match="guidance must be >= 0"):
        ClassifierFreeGuidance(Recorder(), -1.0)
