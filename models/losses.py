"""Adversarial losses and discriminator regularisers, all reduced by a mean over the batch.

A mean (never a sum) makes the loss of a batch equal the average of the losses of its equal
halves, so replicated workers that all-reduce-average their gradients reproduce one process
that sees the whole global batch.

Conventions (logits `l`, softplus(t) = log(1 + e^t), sigmoid D = sigmoid(l)):
- minimax (Goodfellow et al. 2014): D minimises -log D(x) - log(1 - D(G(z)))
  = softplus(-l_real) + softplus(l_fake); G minimises log(1 - D(G(z))) = -softplus(l_fake).
- nonsaturating: same D loss; G minimises -log D(G(z)) = softplus(-l_fake).
- wgan-gp (Gulrajani et al. 2017): D minimises E[l_fake] - E[l_real]; G minimises -E[l_fake].
  The gradient penalty is added by the caller with `gradient_penalty`.
- hinge (Lim & Ye 2017, SAGAN): D minimises E[relu(1 - l_real)] + E[relu(1 + l_fake)];
  G minimises -E[l_fake].
- relativistic (RpGAN, Jolicoeur-Martineau 2018, as R3GAN uses it, Huang et al. 2024): the
  logits come in pairs (real i, fake i); D minimises E[softplus(-(l_real - l_fake))], G minimises
  E[softplus(-(l_fake - l_real))]. Each pair's term depends on its own two rows only, so halves
  of a batch still average to the whole.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ganray.models.errors import ConfigError

LOSS_KINDS = ("minimax", "nonsaturating", "wgan-gp", "hinge", "relativistic")
# Kinds whose G loss pairs each fake with a real sample's logit.
PAIRED_KINDS = ("relativistic",)


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ConfigError(f"unknown loss.kind '{kind}': use one of {', '.join(LOSS_KINDS)}")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss (a scalar to minimise) for logits of real and fake batches
    (row i of each a pair for the relativistic kind)."""
    _check_kind(kind)
    if kind == "relativistic":
        _check_pairs(real_logits, fake_logits)
        return F.softplus(fake_logits - real_logits).mean()
    if kind in ("minimax", "nonsaturating"):
        # softplus is the numerically stable -log(sigmoid(-t)); it never overflows for large |t|.
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_loss(kind: str, fake_logits: torch.Tensor, real_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The generator's loss (a scalar to minimise) for D's logits on the generated batch;
    `real_logits` (row i paired with fake row i) is required by, and only read for, the
    relativistic kind."""
    _check_kind(kind)
    if kind == "relativistic":
        if real_logits is None:
            raise ValueError("the relativistic G loss needs the paired real logits")
        _check_pairs(real_logits, fake_logits)
        return F.softplus(real_logits - fake_logits).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def _check_pairs(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"paired logits must have the same shape, got {tuple(real_logits.shape)} (real) "
                         f"and {tuple(fake_logits.shape)} (fake)")


def _input_gradient(D: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """d D(x_i) / d x_i for every sample, keeping the graph so the penalty backpropagates into D.

    Differentiating the sum of logits gives per-sample gradients only because D has no
    cross-sample coupling (no BatchNorm); see ganray.models.nets.
    """
    x = x.detach().requires_grad_(True)
    logits = D(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.flatten(1)


def r1_penalty(D: nn.Module | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of ||grad_x D(x)||^2 on real samples.

    Unweighted: the caller multiplies by gamma/2 * interval (StyleGAN2's lazy regularisation).
    """
    return _input_gradient(D, real).pow(2).sum(dim=1).mean()


def r2_penalty(D: nn.Module | Callable[[torch.Tensor], torch.Tensor], fake: torch.Tensor) -> torch.Tensor:
    """R2 (Mescheder et al. 2018; R3GAN pairs it with R1): R1's penalty on generated samples.

    The batch is detached: the penalty regularises D only. Unweighted, like `r1_penalty`.
    """
    return _input_gradient(D, fake).pow(2).sum(dim=1).mean()


def gradient_penalty(D: nn.Module | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean of (||grad D(x_hat)||_2 - 1)^2 at x_hat = alpha*real + (1-alpha)*fake.

    `alpha` (N,) is drawn by the caller, so every topology can take it from the same noise
    stream; it is broadcast over the sample dimensions. Both batches are detached: the penalty
    regularises D only.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if alpha.shape != real.shape[:1]:
        raise ValueError(f"alpha must have shape ({real.shape[0]},), got {tuple(alpha.shape)}")
    alpha = alpha.to(real.dtype).view(-1, *([1] * (real.dim() - 1)))
    x_hat = torch.lerp(fake.detach(), real.detach(), alpha)
    norms = torch.linalg.vector_norm(_input_gradient(D, x_hat), ord=2, dim=1)
    return (norms - 1.0).pow(2).mean()
