"""Adversarial losses and the R1 / R2 / WGAN-GP penalties (ganray.models.losses) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ganray.models.errors import ConfigError
from ganray.models.losses import LOSS_KINDS, d_loss, g_loss, gradient_penalty, r1_penalty, r2_penalty

LOG2 = math.log(2.0)


def test_kinds() -> None:
    assert LOSS_KINDS == ("minimax", "nonsaturating", "wgan-gp", "hinge", "relativistic")


@pytest.mark.parametrize("kind", ["minimax", "nonsaturating"])
def test_logistic_d_loss_at_zero_logits(kind: str) -> None:
    # D = sigmoid(0) = 1/2 everywhere: -log(1/2) for the real term and again for the fake term.
    zeros = torch.zeros(4)
    assert d_loss(kind, zeros, zeros).item() == pytest.approx(2 * LOG2)


def test_g_losses_at_zero_logits() -> None:
    zeros = torch.zeros(3)
    assert g_loss("minimax", zeros).item() == pytest.approx(-LOG2)  # log(1 - 1/2)
    assert g_loss("nonsaturating", zeros).item() == pytest.approx(LOG2)  # -log(1/2)
    assert g_loss("wgan-gp", zeros).item() == 0.0
    assert g_loss("hinge", zeros).item() == 0.0


def test_logistic_losses_on_known_logits() -> None:
    real = torch.tensor([1.0, -2.0])
    fake = torch.tensor([0.5, 3.0])
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731  softplus by hand
    expected_d = (sp(-1.0) + sp(2.0)) / 2 + (sp(0.5) + sp(3.0)) / 2
    assert d_loss("minimax", real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert d_loss("nonsaturating", real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss("minimax", fake).item() == pytest.approx(-(sp(0.5) + sp(3.0)) / 2, rel=1e-6)
    assert g_loss("nonsaturating", fake).item() == pytest.approx((sp(-0.5) + sp(-3.0)) / 2, rel=1e-6)


def test_logistic_losses_are_stable_for_huge_logits() -> None:
    big = torch.tensor([1000.0])
    assert d_loss("nonsaturating", big, -big).item() == pytest.approx(0.0, abs=1e-6)
    assert d_loss("nonsaturating", -big, big).item() == pytest.approx(2000.0)  # 1000 + 1000
    assert math.isfinite(g_loss("nonsaturating", -big).item())


def test_wgan_and_hinge_on_known_logits() -> None:
    real = torch.tensor([2.0, 0.0, -1.0])  # mean 1/3
    fake = torch.tensor([-3.0, 0.5, 1.0])  # mean -1/2
    assert d_loss("wgan-gp", real, fake).item() == pytest.approx(-0.5 - 1.0 / 3.0)
    assert g_loss("wgan-gp", fake).item() == pytest.approx(0.5)
    # relu(1 - real) = [0, 1, 2] -> 1; relu(1 + fake) = [0, 1.5, 2] -> 7/6.
    assert d_loss("hinge", real, fake).item() == pytest.approx(1.0 + 7.0 / 6.0)
    assert g_loss("hinge", fake).item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_halves_average_to_the_whole(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(8, generator=gen) * 3, torch.randn(8, generator=gen) * 3
    whole_d, whole_g = d_loss(kind, real, fake), g_loss(kind, fake, real)
    halves_d = (d_loss(kind, real[:4], fake[:4]) + d_loss(kind, real[4:], fake[4:])) / 2
    halves_g = (g_loss(kind, fake[:4], real[:4]) + g_loss(kind, fake[4:], real[4:])) / 2
    assert torch.allclose(whole_d, halves_d, atol=1e-6)
    assert torch.allclose(whole_g, halves_g, atol=1e-6)
    assert whole_d.dim() == 0 and whole_g.dim() == 0


def test_relativistic_losses_on_known_pairs() -> None:
    real = torch.tensor([1.0, -2.0])
    fake = torch.tensor([0.5, 3.0])
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731  softplus by hand
    # D: softplus(-(real_i - fake_i)); G: softplus(-(fake_i - real_i)), each pair on its own.
    assert d_loss("relativistic", real, fake).item() == pytest.approx((sp(-0.5) + sp(5.0)) / 2, rel=1e-6)
    assert g_loss("relativistic", fake, real).item() == pytest.approx((sp(0.5) + sp(-5.0)) / 2, rel=1e-6)
    # Equal logits in a pair: D cannot tell them apart, log 2 for both players.
    assert d_loss("relativistic", real, real).item() == pytest.approx(LOG2)
    # Only the gap matters: shifting both logits of every pair changes nothing.
    shifted = d_loss("relativistic", real + 7.0, fake + 7.0)
    assert shifted.item() == pytest.approx(d_loss("relativistic", real, fake).item())
    big = torch.tensor([1000.0])
    assert d_loss("relativistic", big, -big).item() == pytest.approx(0.0, abs=1e-6)
    assert g_loss("relativistic", -big, big).item() == pytest.approx(2000.0)


def test_relativistic_needs_paired_logits() -> None:
    with pytest.raises(ValueError, match="paired real logits"):
        g_loss("relativistic", torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        d_loss("relativistic", torch.zeros(3), torch.zeros(4))


def test_unknown_kind_names_the_accepted_ones() -> None:
    accepted = "minimax, nonsaturating, wgan-gp, hinge, relativistic"
    with pytest.raises(ConfigError, match=f"unknown loss.kind 'wgan'.*{accepted}"):
        d_loss("wgan", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ConfigError, match="unknown loss.kind 'lsgan'"):
        g_loss("lsgan", torch.zeros(1))


class _Linear(nn.Module):
    """D(x) = w . x over the flattened sample: grad_x D = w for every x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def test_r1_of_linear_d_is_squared_weight_norm() -> None:
    D = _Linear(torch.tensor([3.0, 4.0]))
    r1 = r1_penalty(D, torch.randn(5, 2))
    assert r1.item() == pytest.approx(25.0)
    r1.backward()  # create_graph: d||w||^2/dw = 2w reaches D's parameters
    assert torch.allclose(D.w.grad, torch.tensor([6.0, 8.0]))


def test_r1_of_sum_of_squares() -> None:
    # D(x) = sum(x^2) -> grad = 2x, ||grad||^2 = 4 ||x||^2, averaged over the batch.
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]).view(2, 1, 3)  # works for any sample shape
    scale = nn.Parameter(torch.tensor(1.0))
    r1 = r1_penalty(lambda t: scale * t.pow(2).flatten(1).sum(1), x)
    assert r1.item() == pytest.approx((4 * 5 + 4 * 2) / 2)
    r1.backward()  # R1 = scale^2 * 14 -> d/dscale = 28 at scale 1
    assert scale.grad.item() == pytest.approx(28.0)
    assert not x.requires_grad  # the caller's batch is left alone


def test_r2_is_r1_on_the_fakes_and_leaves_them_alone() -> None:
    # D(x) = scale * sum(x^2): ||grad||^2 = 4 scale^2 ||x||^2, averaged over the batch.
    fake = torch.tensor([[1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    scale = nn.Parameter(torch.tensor(2.0))
    r2 = r2_penalty(lambda t: scale * t.pow(2).sum(1), fake)
    assert r2.item() == pytest.approx(4 * 4 * (5 + 9) / 2)
    r2.backward()  # R2 = scale^2 * 28 -> d/dscale = 56 scale = 112
    assert scale.grad.item() == pytest.approx(112.0)
    assert fake.grad is None  # the penalty regularises D only: no gradient reaches G's output
    D = _Linear(torch.tensor([3.0, 4.0]))
    x = torch.randn(5, 2)
    assert r2_penalty(D, x).item() == pytest.approx(r1_penalty(D, x).item())


def test_gradient_penalty_on_linear_d() -> None:
    D = _Linear(torch.tensor([3.0, 4.0]))  # ||grad|| = 5 wherever it is evaluated
    real, fake = torch.randn(6, 2), torch.randn(6, 2)
    gp = gradient_penalty(D, real, fake, torch.rand(6))
    assert gp.item() == pytest.approx(16.0)  # (5 - 1)^2
    gp.backward()  # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 1.6 w
    assert torch.allclose(D.w.grad, 1.6 * torch.tensor([3.0, 4.0]))


def test_gradient_penalty_interpolates_per_sample() -> None:
    # D(x) = sum(x^2): grad at x_hat is 2 x_hat, so the penalty reveals where x_hat was taken.
    real = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    fake = torch.zeros(2, 1, 1, 2)
    alpha = torch.tensor([0.5, 1.0])  # x_hat = [0.5, 0.5] and [2, 0]
    gp = gradient_penalty(lambda t: t.pow(2).flatten(1).sum(1), real, fake, alpha)
    norms = torch.tensor([2 * math.sqrt(0.5), 4.0])
    assert gp.item() == pytest.approx(((norms - 1) ** 2).mean().item())
    with pytest.raises(ValueError, match="alpha must have shape"):
        gradient_penalty(lambda t: t.sum((1, 2, 3)), real, fake, torch.rand(2, 1))
