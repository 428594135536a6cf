"""The two networks' sides of a round: `GeneratorRole` (G, G_ema, opt_G) and `DiscriminatorRole`
(D, opt_D). Plain torch, no Ray: a replica holds both (`stepper.py`), a split job one per actor
(`split.py`). They run the phases of the round table (`phases.py`) with the loss terms of
`phase_loss.py`; each optimizer step is skipped when its gradients are non-finite.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from ganray.models.ema import ema_beta, update_ema
from ganray.models.latent import latent_of
from ganray.models.registry import build_discriminator, build_generator
from ganray.workers import phase_loss
from ganray.workers.phase_loss import RealHalf
from ganray.workers.phases import Phase
from ganray.workers.settings import StepSettings
from ganray.workers.stats import GRAD_NORM_D, GRAD_NORM_G, SKIPPED, RoundStats


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _adam(params: Any, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    # fused: one kernel for the whole update, and it honours `found_inf` on the device, so a
    # non-finite step is skipped without a host sync (see `_guarded_step`).
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def _guarded_step(opt: torch.optim.Adam, params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step unless the (already all-reduced) gradient norm is non-finite, as AMP's GradScaler
    does: the fused kernel reads `found_inf` and skips the update (and the step count) on the
    device. Every replica sees the same reduced norm, so every replica skips together."""
    norm = grad_norm(params)
    found_inf = (~torch.isfinite(norm)).to(torch.float32)
    opt.found_inf = found_inf
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, found_inf


def _set_lr(opt: torch.optim.Optimizer, lr: float, betas: tuple[float, float]) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
        group["betas"] = betas


def _memory_format(module: nn.Module, settings: StepSettings, sample_shape: tuple[int, ...]) -> nn.Module:
    if settings.channels_last and len(sample_shape) == 3:
        return module.to(memory_format=torch.channels_last)
    return module


class GeneratorRole:
    """G, G_ema and G's optimizer: the G phase's forward and step, and the G_ema phase."""

    def __init__(self, config: dict[str, Any], sample_shape: tuple[int, ...], settings: StepSettings) -> None:
        self.settings = settings
        torch.manual_seed(settings.seed)  # same initial weights in every process
        self.G = _memory_format(build_generator(config["model"], sample_shape).to(settings.device), settings,
                                sample_shape)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        h = settings.hyper
        self.opt = _adam(self.G.parameters(), h.g_lr, h.betas)
        self.params = list(self.G.parameters())
        self.z_dim = int(self.G.z_dim)
        self.latent = latent_of(self.G)

    def apply_hyper(self, kimg: float) -> None:
        h = self.settings.hyper
        _set_lr(self.opt, h.g_lr * self.settings.lr_factor(kimg), h.betas)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), phase_loss.autocast(self.settings.autocast_bf16):
            return self.G(z).float()

    def forward_with_graph(self, z: torch.Tensor) -> torch.Tensor:
        with phase_loss.autocast(self.settings.autocast_bf16):
            return self.G(z).float()

    def apply(self, stats: RoundStats) -> None:
        """Step on G's (already synchronised) gradients unless they are non-finite, and report
        the gradient norm and the skip as tensors (no host sync on a GPU)."""
        norm, skipped = _guarded_step(self.opt, self.params)
        stats.report(GRAD_NORM_G, norm, "last")
        stats.report(SKIPPED, skipped, "sum")

    def update_ema(self) -> None:
        """The G_ema phase."""
        update_ema(self.G_ema, self.G, ema_beta(self.settings.global_batch, self.settings.ema_half_life_kimg))


class DiscriminatorRole:
    """D and its optimizer: the D phases, and G's loss (or feedback dL_G/dx) through D."""

    def __init__(self, config: dict[str, Any], sample_shape: tuple[int, ...], settings: StepSettings,
                 seed_offset: int = 0) -> None:
        self.settings = settings
        # seed_offset gives each split discriminator its own init; 0 keeps replicas identical.
        torch.manual_seed(settings.seed + 1 + seed_offset)
        self.D = _memory_format(build_discriminator(config["model"], sample_shape).to(settings.device), settings,
                                sample_shape)
        h = settings.hyper
        self.opt = _adam(self.D.parameters(), h.d_lr, h.betas)
        self.params = list(self.D.parameters())

    def apply_hyper(self, kimg: float) -> None:
        h = self.settings.hyper
        _set_lr(self.opt, h.d_lr * self.settings.lr_factor(kimg), h.betas)

    def real_half(self, phase: Phase, real: torch.Tensor, d_step: int) -> RealHalf:
        """D on the real rows (and R1 when due). Only D and the data enter here, so a replica
        runs it while G's gradients are still being all-reduced (see `ReplicaStepper`)."""
        return phase_loss.real_half(self.D, phase, real, d_step, self.settings.autocast_bf16)

    def backward(self, phase: Phase, half: RealHalf, fake: torch.Tensor, alpha: Optional[torch.Tensor],
                 d_step: int, stats: RoundStats) -> None:
        """D's loss on `half` and the fake rows, backpropagated into D's gradients (not applied)."""
        s = self.settings
        phase_loss.d_loss(self.D, phase, s.loss_kind, half, fake, alpha, d_step, s.autocast_bf16, stats).backward()

    def apply(self, stats: RoundStats) -> None:
        """Step on D's (already synchronised) gradients unless they are non-finite."""
        norm, skipped = _guarded_step(self.opt, self.params)
        stats.report(GRAD_NORM_D, norm.detach(), "last")
        stats.report(SKIPPED, skipped, "sum")

    def d_step(self, phase: Phase, real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor],
               d_step: int, stats: RoundStats) -> None:
        """One whole D phase without peers: both halves, backward, step."""
        self.backward(phase, self.real_half(phase, real, d_step), fake, alpha, d_step, stats)
        self.apply(stats)

    def g_loss(self, fake: torch.Tensor, paired_real: Optional[torch.Tensor]) -> torch.Tensor:
        """G's loss on `fake` through this D, with D's parameters frozen (no D gradients)."""
        s = self.settings
        return phase_loss.g_loss(self.D, self.params, s.loss_kind, fake, paired_real, s.autocast_bf16)

    def feedback(self, fake: torch.Tensor, paired_real: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(G loss, dL_G/dx) for a detached fake batch: what a split D worker sends back to G."""
        x = fake.detach().requires_grad_(True)
        loss = self.g_loss(x, paired_real)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad


def cpu_tree(obj: Any) -> Any:
    """A deep copy of a state tree with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tree(v) for v in obj)
    return obj
