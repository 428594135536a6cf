"""The two networks' sides of a round: `GeneratorRole` (G, G_ema, opt_G) and `DiscriminatorRole`
(D, opt_D). Plain torch, no Ray: a replica holds both (`stepper.py`), a split job one per actor
(`split.py`). They run the phases of the round table (`phases.py`) with the loss terms of
`phase_loss.py`; each optimizer step is skipped when its gradients are non-finite. A conditional
GAN's classes (`num_classes` > 0) go with every call of G and D: `y` for G's fakes, `labels` for
the real rows and `fake_labels` for the fakes D scores.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

from ganray.models.ema import EmaPair, ema_beta
from ganray.models.errors import CheckpointError
from ganray.models.latent import latent_of
from ganray.models.registry import build_discriminator, build_generator, num_classes_of
from ganray.workers import phase_loss
from ganray.workers.augment import Augmenter, p_metric, refuse_unless_images
from ganray.workers.phase_loss import RealHalf
from ganray.workers.phases import Phase
from ganray.workers.settings import StepSettings
from ganray.workers.stats import GRAD_NORM_D, GRAD_NORM_G, SKIPPED, RoundStats


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def adam_optimizer(params: Any, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    # fused: one kernel for the whole update, and it honours `found_inf` on the device, so a
    # non-finite step is skipped without a host sync (see `guarded_step`).
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def guarded_step(opt: torch.optim.Adam, params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step unless the (already all-reduced) gradient norm is non-finite, as AMP's GradScaler
    does; return the norm and the skip (1.0 or 0.0) as tensors. Every replica sees the same
    reduced norm, so every replica skips together."""
    norm = grad_norm(params)
    step = _step_on_host if norm.device.type == "cpu" else _step_on_device
    skipped = step(opt, norm)
    opt.zero_grad(set_to_none=True)
    return norm, skipped


def _step_on_device(opt: torch.optim.Adam, norm: torch.Tensor) -> torch.Tensor:
    """The fused kernel reads `found_inf` and skips the update (and the step count) on the
    device: no host sync."""
    # norm * 0 is 0 exactly when the norm is finite (inf * 0 and NaN * 0 are NaN): two small ops
    # where isfinite's composite takes four.
    found_inf = (norm * 0.0 != 0.0).to(torch.float32)
    opt.found_inf = found_inf
    opt.step()
    return found_inf


def _step_on_host(opt: torch.optim.Adam, norm: torch.Tensor) -> torch.Tensor:
    """On the CPU reading the norm is no sync at all, and a Python branch spares fused Adam's
    `found_inf` bookkeeping (a step-count subtraction per parameter every step), which shows on
    a small network's round."""
    if not math.isfinite(norm.item()):
        return _SKIPPED_ONE
    opt.step()
    return _NOT_SKIPPED


# The skip statistic of a CPU step (read-only: statistics are only stacked and summed).
_NOT_SKIPPED = torch.zeros(())
_SKIPPED_ONE = torch.ones(())


def set_lr(opt: torch.optim.Optimizer, lr: float, betas: tuple[float, float]) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
        group["betas"] = betas


def compiled(module: nn.Module, settings: StepSettings) -> nn.Module:
    """`module` through torch.compile when `resources.compile` is on (the wrapper shares its
    parameters and state), else `module` itself. The phases' double-backward terms (R1, R2, the
    WGAN gradient penalty) reach past the wrapper to the eager module (`phase_loss.eager`): a
    compiled graph's backward cannot itself be differentiated."""
    if settings.compile_backend is None:
        return module
    return torch.compile(module, backend=settings.compile_backend)


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
        self.G_step = compiled(self.G, settings)  # what the G and D phases run; G_ema stays eager
        self.ema = EmaPair(self.G_ema, self.G)
        h = settings.hyper
        self.opt = adam_optimizer(self.G.parameters(), h.g_lr, h.betas)
        self.params = list(self.G.parameters())
        self.z_dim = int(self.G.z_dim)
        self.latent = latent_of(self.G)
        self.num_classes = num_classes_of(config["model"])  # 0: unconditional

    def apply_hyper(self, kimg: float) -> None:
        h = self.settings.hyper
        set_lr(self.opt, h.g_lr * self.settings.lr_factor(kimg), h.betas)

    def _run(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return self.G_step(z) if y is None else self.G_step(z, y)

    def generate(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.no_grad(), phase_loss.autocast(self.settings.autocast_bf16):
            return self._run(z, y).float()

    def forward_with_graph(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        with phase_loss.autocast(self.settings.autocast_bf16):
            return self._run(z, y).float()

    def apply(self, stats: RoundStats) -> None:
        """Step on G's (already synchronised) gradients unless they are non-finite, and report
        the gradient norm and the skip as tensors (no host sync on a GPU)."""
        norm, skipped = guarded_step(self.opt, self.params)
        stats.report(GRAD_NORM_G, norm, "last")
        stats.report(SKIPPED, skipped, "sum")

    def update_ema(self) -> None:
        """The G_ema phase."""
        self.ema.update(ema_beta(self.settings.global_batch, self.settings.ema_half_life_kimg))


class DiscriminatorRole:
    """D and its optimizer: the D phases, and G's loss (or feedback dL_G/dx) through D."""

    def __init__(self, config: dict[str, Any], sample_shape: tuple[int, ...], settings: StepSettings,
                 seed_offset: int = 0, d_index: Optional[int] = None) -> None:
        self.settings = settings
        refuse_unless_images(settings.augment, sample_shape, str(config["data"].get("name")))
        # seed_offset gives each split discriminator its own init; 0 keeps replicas identical.
        torch.manual_seed(settings.seed + 1 + seed_offset)
        self.D = _memory_format(build_discriminator(config["model"], sample_shape).to(settings.device), settings,
                                sample_shape)
        self.D_step = compiled(self.D, settings)  # what the phases call; D owns the parameters
        h = settings.hyper
        self.opt = adam_optimizer(self.D.parameters(), h.d_lr, h.betas)
        self.params = list(self.D.parameters())
        # What D's inputs pass through when `augment.kind` is set, with its p (this D's state);
        # a split discriminator (`d_index`) reports its own p.
        self.augmenter = Augmenter(settings.augment, settings.device) if settings.augment.enabled else None
        self.num_classes = num_classes_of(config["model"])  # 0: unconditional
        self.p_metric = p_metric(d_index)

    def apply_hyper(self, kimg: float) -> None:
        h = self.settings.hyper
        set_lr(self.opt, h.d_lr * self.settings.lr_factor(kimg), h.betas)

    def _augmented(self, x: torch.Tensor, draws: Optional[torch.Tensor]) -> torch.Tensor:
        """`x` through the augmentation when the phase is augmented (its caller drew `draws`)."""
        if draws is None:
            return x
        assert self.augmenter is not None, "augmentation draws for a D without augment.kind"
        return self.augmenter(x, draws)

    def real_half(self, phase: Phase, real: torch.Tensor, d_step: int,
                  draws: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> RealHalf:
        """D on the real rows (augmented with `draws`; classes `labels`), and R1 when due. Only D
        and the data enter here, so a replica runs it while G's gradients are still being
        all-reduced (see `ReplicaStepper`). ADA's r_t reads the logits here."""
        half = phase_loss.real_half(self.D_step, phase, self._augmented(real, draws), d_step, self.settings.autocast_bf16,
                                    labels)
        if self.augmenter is not None:
            self.augmenter.observe_reals(half.logits)
        return half

    def backward(self, phase: Phase, half: RealHalf, fake: torch.Tensor, alpha: Optional[torch.Tensor],
                 d_step: int, stats: RoundStats, draws: Optional[torch.Tensor] = None,
                 fake_labels: Optional[torch.Tensor] = None) -> None:
        """D's loss on `half` and the fake rows (augmented with `draws`; classes `fake_labels`),
        backpropagated into D's gradients (not applied)."""
        s = self.settings
        fake = self._augmented(fake, draws)
        phase_loss.d_loss(self.D_step, phase, s.loss_kind, half, fake, alpha, d_step, s.autocast_bf16, stats,
                          fake_labels).backward()

    def reduced_with_grads(self) -> list[torch.Tensor]:
        """Tensors that ride along with this D step's gradient all-reduce (ADA's sign of the
        reals: averaged with the gradients, so every replica steers the same p)."""
        return self.augmenter.pending_signs() if self.augmenter is not None else []

    def end_d_step(self, phase: Phase, d_steps_done: int, stats: RoundStats) -> None:
        """After the step of D phase `phase` (`d_steps_done` global D steps now done): ADA's r_t
        and, when the phase's `adapt` step is due, p's move; p is reported."""
        if self.augmenter is None:
            return
        adapt = phase.adapt
        self.augmenter.end_d_step(adapt is not None and adapt.due(d_steps_done), adapt.weight if adapt else 0.0)
        stats.report(self.p_metric, self.augmenter.p, "last")

    def apply(self, stats: RoundStats) -> None:
        """Step on D's (already synchronised) gradients unless they are non-finite."""
        norm, skipped = guarded_step(self.opt, self.params)
        stats.report(GRAD_NORM_D, norm.detach(), "last")
        stats.report(SKIPPED, skipped, "sum")

    def d_step(self, phase: Phase, real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor],
               d_step: int, stats: RoundStats, real_draws: Optional[torch.Tensor] = None,
               fake_draws: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
               fake_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One whole D phase without peers: both halves, backward, step, ADA's p. Returns the
        real rows as D saw them (augmented), which a relativistic G phase pairs with."""
        half = self.real_half(phase, real, d_step, real_draws, labels)
        self.backward(phase, half, fake, alpha, d_step, stats, fake_draws, fake_labels)
        self.apply(stats)
        self.end_d_step(phase, d_step + 1, stats)
        return half.real

    def g_loss(self, fake: torch.Tensor, paired_real: Optional[torch.Tensor],
               draws: Optional[torch.Tensor] = None, fake_labels: Optional[torch.Tensor] = None,
               real_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """G's loss on `fake` (augmented with `draws`, inside the graph; classes `fake_labels`)
        through this D, with D's parameters frozen (no D gradients). `paired_real` (classes
        `real_labels`) is already as D saw it."""
        s = self.settings
        fake = self._augmented(fake, draws)
        return phase_loss.g_loss(self.D_step, self.params, s.loss_kind, fake, paired_real, s.autocast_bf16,
                                 fake_labels, real_labels)

    def feedback(self, fake: torch.Tensor, paired_real: Optional[torch.Tensor],
                 draws: Optional[torch.Tensor] = None, fake_labels: Optional[torch.Tensor] = None,
                 real_labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G loss, dL_G/dx) for a detached fake batch: what a split D worker sends back to G.
        The gradient reaches x through the augmentation."""
        x = fake.detach().requires_grad_(True)
        loss = self.g_loss(x, paired_real, draws, fake_labels, real_labels)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def augment_state(self) -> Optional[dict[str, Any]]:
        """p and r_t's running sum (a checkpoint part); None without augmentation."""
        return None if self.augmenter is None else self.augmenter.state()

    def load_augment_state(self, state: Optional[dict[str, Any]]) -> None:
        if self.augmenter is None:
            return
        if state is None:
            raise CheckpointError("the state holds no augmentation state (p): it was saved by a job without "
                                  f"augment.kind '{self.settings.augment.kind}'; resume with the run's config")
        self.augmenter.load_state(state)


def cpu_tree(obj: Any) -> Any:
    """A deep copy of a state tree with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tree(v) for v in obj)
    return obj
