"""The loss terms of each phase of the round table (StyleGAN2-ADA's `loss.py`: one place maps a
phase to what it computes).

A D phase is computed in two halves, so that a replica can run the real half while G's gradients
are still being all-reduced: the real half is D on the real rows plus the terms that read only
them (R1 when due); the fake half is D on the fake rows, the adversarial loss of the pairs, and
the terms that read the fakes (the WGAN-GP interpolation, R2 when due). Each term reports its
statistic under its metric name as it is computed.

Pairing (the relativistic loss): in a D step, fake row j pairs with real row j of the same step;
in the G step, the fakes pair with the reals of the round's last D step, re-scored by the updated
D. When there are fewer reals than fakes (a split job's discriminator i holds B/K of the reals
but scores all B fakes), fake j pairs with real j mod (B/K).

A conditional GAN's D reads each row's class (`labels` for real rows, `fake_labels` for fakes):
every call of D here passes them, R1 and R2 included; the WGAN-GP interpolates take the real
row's class. Without classes (None) every call is the unconditional D(x).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ganray.models import losses
from ganray.workers.conditional import conditioned
from ganray.workers.phases import ADVERSARIAL, GP, R1, R2, Phase
from ganray.workers.stats import FAKE_SCORE, LOSS_D, REAL_SCORE, RoundStats, term_name


def eager(D: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (`resources.compile`), or D itself: R1, R2 and the
    WGAN gradient penalty differentiate D's input gradient again (create_graph=True), which a
    compiled graph's backward does not support, so those terms call the eager module."""
    return getattr(D, "_orig_mod", D)


def autocast(bf16: bool) -> Any:
    """bf16 autocast on CUDA when `resources.precision` asks for it, else nothing."""
    if bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class RealHalf:
    """The real half of a D phase: the (noisy) real rows, D's logits on them, and the weighted
    terms on the reals that are due (name, value); `labels`: the rows' classes (conditional)."""

    real: torch.Tensor
    logits: torch.Tensor
    terms: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    labels: Optional[torch.Tensor] = None


def real_half(D: nn.Module, phase: Phase, real: torch.Tensor, d_step: int, bf16: bool,
              labels: Optional[torch.Tensor] = None) -> RealHalf:
    """D's forward on the real rows, plus R1 when global D step `d_step` is due one."""
    Dy = conditioned(D, labels)
    with autocast(bf16):
        logits = Dy(real).float()
    half = RealHalf(real, logits, labels=labels)
    r1 = phase.term(R1)
    if r1 is not None and r1.due(d_step):
        half.terms.append((R1, r1.weight * losses.r1_penalty(conditioned(eager(D), labels), real)))
    return half


def d_loss(D: nn.Module, phase: Phase, kind: str, half: RealHalf, fake: torch.Tensor,
           alpha: Optional[torch.Tensor], d_step: int, bf16: bool, stats: RoundStats,
           fake_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fake half of D phase `phase`: D's total loss on `half` and the fake rows, to be
    backpropagated by the caller; reports the phase's statistics into `stats`."""
    D_fake = conditioned(D, fake_labels)
    with autocast(bf16):
        fake_logits = D_fake(fake).float()
        loss = losses.d_loss(kind, half.logits, fake_logits)
    total = loss
    weighted: dict[str, torch.Tensor] = {}
    gp = phase.term(GP)
    if gp is not None and alpha is not None:
        weighted[GP] = gp.weight * losses.gradient_penalty(conditioned(eager(D), half.labels), half.real, fake,
                                                           alpha)
        total = total + weighted[GP]
    for name, value in half.terms:
        weighted[name] = value
        total = total + value
    r2 = phase.term(R2)
    if r2 is not None and r2.due(d_step):
        weighted[R2] = r2.weight * losses.r2_penalty(conditioned(eager(D), fake_labels), fake)
        total = total + weighted[R2]
    stats.report(LOSS_D, loss)
    stats.report(REAL_SCORE, half.logits.detach().mean(), "last")
    stats.report(FAKE_SCORE, fake_logits.detach().mean(), "last")
    for term in phase.terms:
        if term.name != ADVERSARIAL:
            stats.report(term_name(term.name), weighted.get(term.name, torch.zeros((), device=loss.device)))
    return total


def g_loss(D: nn.Module, params: list[nn.Parameter], kind: str, fake: torch.Tensor,
           paired_real: Optional[torch.Tensor], bf16: bool, fake_labels: Optional[torch.Tensor] = None,
           real_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G's loss on `fake` (classes `fake_labels`) through D with D's parameters frozen (no D
    gradients). For a paired kind, `paired_real` (classes `real_labels`) holds the reals of the
    round's last D step, re-scored here."""
    # Toggle the parameter list directly: Module.requires_grad_ walks every submodule.
    for p in params:
        p.requires_grad_(False)
    try:
        with autocast(bf16):
            fake_logits = conditioned(D, fake_labels)(fake).float()
            real_logits = None
            if kind in losses.PAIRED_KINDS:
                if paired_real is None:
                    raise RuntimeError("the relativistic G step needs the reals of a D step of this round")
                with torch.no_grad():
                    real_logits = _pair(conditioned(D, real_labels)(paired_real).float(), fake_logits.shape[0])
            return losses.g_loss(kind, fake_logits, real_logits)
    finally:
        for p in params:
            p.requires_grad_(True)


def _pair(real_logits: torch.Tensor, n_fake: int) -> torch.Tensor:
    """Real logit j mod len(real_logits) for each of `n_fake` fakes."""
    n_real = real_logits.shape[0]
    if n_real == n_fake:
        return real_logits
    if n_fake % n_real:
        raise ValueError(f"{n_fake} fakes cannot pair with {n_real} reals (not a multiple)")
    return real_logits.repeat(n_fake // n_real, *([1] * (real_logits.dim() - 1)))
