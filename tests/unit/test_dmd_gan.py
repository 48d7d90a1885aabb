"""DMD2's GAN head (modules/dmd_gan.py): its losses are the logistic losses, and on every registered family's tiny
network it reads the bottleneck (stopping the forward there), gives one logit per sample and passes gradients back
to the input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.modules.dmd_gan import (
    BOTTLENECKS,
    bottleneck_features,
    bottleneck_of,
    critic_gan_loss,
    gan_head_for,
    generator_gan_loss,
)
from instaflow_pl.velocity import NetworkPredictor

AFTER_BOTTLENECK = {"mid_block": "conv_out", "norm_out": "proj_out"}
"""A layer each network runs after its bottleneck (it must not run)."""


def test_gan_losses_are_the_logistic_losses_and_their_gradients():
    """softplus(-l) = -log sigmoid(l), softplus(l) = -log(1 - sigmoid(l)); d/dl softplus(l) = sigmoid(l)."""
    torch.manual_seed(0)
    fake, real = torch.randn(5, requires_grad=True), torch.randn(7, requires_grad=True)
    assert torch.allclose(generator_gan_loss(fake), -torch.log(torch.sigmoid(fake)), atol=1e-6)
    critic = critic_gan_loss(fake, real)
    expected = -torch.log(1 - torch.sigmoid(fake)).mean() - torch.log(torch.sigmoid(real)).mean()
    assert torch.allclose(critic, expected, atol=1e-6)
    critic.backward()
    assert torch.allclose(fake.grad, torch.sigmoid(fake.detach()) / 5, atol=1e-6)  # the critic pushes D(fake) down
    assert torch.allclose(real.grad, -(1 - torch.sigmoid(real.detach())) / 7, atol=1e-6)  # and D(real) up
    zero = torch.zeros(3)
    assert generator_gan_loss(zero).tolist() == pytest.approx([math.log(2)] * 3)
    assert critic_gan_loss(zero, zero).item() == pytest.approx(2 * math.log(2))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_head_reads_each_familys_bottleneck_and_its_gradient_reaches_the_input(name, tmp_path):
    family = FAMILIES[name]
    folder = ModelFolder.open(family.build_tiny(tmp_path / name))
    network = folder.load_network()
    assert type(network).__name__ in BOTTLENECKS
    spec = bottleneck_of(network)
    predictor = NetworkPredictor(network, family, folder.pixels_per_latent)
    cond = folder.load_encoder().condition(["a photo of a cat", "a red car"])
    x = torch.randn(2, *folder.geometry.shape, requires_grad=True)
    after = network.get_submodule(AFTER_BOTTLENECK[spec.module])
    calls = []
    handle = after.register_forward_hook(lambda *args: calls.append(1))
    try:
        features = bottleneck_features(network, lambda: predictor(x, torch.tensor([500.0, 900.0]), cond))
    finally:
        handle.remove()
    assert not calls, "the forward stops at the bottleneck"
    width = features.shape[1] if spec.side == "output" else features.shape[-1]
    assert features.shape[0] == 2 and width == spec.channels(network.config)
    logits = gan_head_for(network)(features)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_a_network_without_a_registered_bottleneck_is_one_line():
    with pytest.raises(UserError, match="does not know where a Linear's bottleneck is") as error:
        gan_head_for(nn.Linear(2, 2))
    assert "\n" not in str(error.value)


def test_the_two_gan_losses_move_a_generator_to_the_real_data():
    """The losses' signs composed: a 1-D generator x = a + z against real data N(2, 1), a logistic critic
    D(x) = w x + b trained on the critic's loss and the generator on its own, alternating. The generator's mean moves
    from 0 to the data's and oscillates around it (GAN dynamics), so its average over the last 400 of 800 steps is
    compared (measured over seeds 0-5: 1.90 to 2.01; seed 0: 1.991)."""
    torch.manual_seed(0)
    a = torch.zeros((), requires_grad=True)
    critic = nn.Linear(1, 1)
    generator_opt = torch.optim.Adam([a], lr=0.02)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=0.02)
    trace = []
    for _ in range(800):
        real, fake = 2.0 + torch.randn(256, 1), a + torch.randn(256, 1)
        critic_opt.zero_grad()
        critic_gan_loss(critic(fake.detach()).squeeze(1), critic(real).squeeze(1)).backward()
        critic_opt.step()
        generator_opt.zero_grad()
        generator_gan_loss(critic(a + torch.randn(256, 1)).squeeze(1)).mean().backward()
        generator_opt.step()
        trace.append(a.item())
    mean = sum(trace[400:]) / 400
    print(f"\nGAN losses alone: generator mean 0 -> {mean:.3f} (average of steps 400-800; data 2)")
    assert abs(mean - 2.0) < 0.1
