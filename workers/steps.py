"""The adversarial phase steps: plain torch, no Ray, shared by every topology.

`local` runs `ReplicaStepper` in the driver process, `replicated` runs the same class inside each
`ReplicaWorker` actor with a gradient all-reduce hook, and `split` runs its two halves
(`GeneratorRole`, `DiscriminatorRole`) in separate actors. So the topologies agree by
construction: there is one implementation of a round.

A round is one pass of the phase table: `n_critic` D steps, one G step, lazy R1 every
`r1_interval` D steps, and an EMA update of G_ema. All randomness comes from per-round streams
drawn for the *global* batch and sliced by rank (`NoiseStreams`), so results do not depend on how
many workers drew them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from ganray.models import losses
from ganray.models.ema import ema_beta, update_ema
from ganray.models.latent import draw_latent, latent_of
from ganray.models.registry import build_discriminator, build_generator
from ganray.workers.sharding import RealBatches

GradSync = Callable[[list[torch.Tensor]], None]


class PendingSync(Protocol):
    """Gradients being averaged over the replicas; `wait` leaves the means in place."""

    def wait(self) -> None: ...


# Starts averaging the gradients over the replicas and returns at once (Collective.start_all_reduce_mean).
StartSync = Callable[[list[Optional[torch.Tensor]]], PendingSync]


@dataclass
class RealSide:
    """The real-data half of a D step: D's logits on the real rows and the R1 term, if due."""

    real: torch.Tensor
    logits: torch.Tensor
    r1: Optional[torch.Tensor]

# Stream slots inside one round: D step k draws z from slot k and the WGAN-GP interpolation
# factors from slot ALPHA_SLOT + k; the G step draws z from G_SLOT. Instance noise for D step k
# comes from REAL_NOISE_SLOT + k (real batch) and FAKE_NOISE_SLOT + k (fake batch), and for the
# G step's fakes from G_NOISE_SLOT.
ALPHA_SLOT = 1_000
G_SLOT = 2_000
REAL_NOISE_SLOT = 3_000
FAKE_NOISE_SLOT = 4_000
G_NOISE_SLOT = 5_000


@dataclass
class Hyper:
    """Hyperparameters that may change during a run (PBT mutates them after a restore)."""

    g_lr: float
    d_lr: float
    betas: tuple[float, float]
    n_critic: int
    r1_gamma: float

    @classmethod
    def from_config(cfg: Any, config: dict[str, Any]) -> "Hyper":
        sched, loss = config["schedule"], config["loss"]
        return cfg(g_lr=float(sched["g_lr"]), d_lr=float(sched["d_lr"]),
                   betas=(float(sched["betas"][0]), float(sched["betas"][1])),
                   n_critic=int(sched["n_critic"]), r1_gamma=float(loss["r1_gamma"]))


@dataclass
class StepSettings:
    """Everything a round needs to know, taken from the job config dict (`TrainConfig.model_dump()`)."""

    seed: int
    global_batch: int
    loss_kind: str
    r1_interval: int
    gp_weight: float
    ema_half_life_kimg: float
    lr_decay: str
    lr_decay_kimg: Optional[float]
    lr_min_factor: float
    hyper: Hyper
    instance_noise: float = 0.0
    instance_noise_kimg: Optional[float] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_bf16: bool = False
    channels_last: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StepSettings":
        sched, loss, res = config["schedule"], config["loss"], config["resources"]
        device = pick_device(res.get("device", "auto"))
        return cls(
            seed=int(config["seed"]), global_batch=int(sched["batch_size"]),
            loss_kind=loss["kind"], r1_interval=int(loss["r1_interval"]),
            gp_weight=float(loss["gp_weight"]), ema_half_life_kimg=float(sched["ema_half_life_kimg"]),
            lr_decay=sched["lr_decay"], lr_decay_kimg=sched.get("lr_decay_kimg"),
            lr_min_factor=float(sched["lr_min_factor"]), hyper=Hyper.from_config(config),
            instance_noise=float(loss.get("instance_noise", 0.0)),
            instance_noise_kimg=loss.get("instance_noise_kimg"),
            device=device,
            autocast_bf16=(res.get("precision") == "bf16" and device.type == "cuda"),
            channels_last=channels_last_for(res.get("channels_last"), device),
        )

    def lr_factor(self, kimg: float) -> float:
        """LR multiplier at absolute `kimg`; defined over absolute kimg so extending a run
        (a larger total_kimg) never rewrites its past."""
        if self.lr_decay == "none" or not self.lr_decay_kimg:
            return 1.0
        t = min(max(kimg / self.lr_decay_kimg, 0.0), 1.0)
        lo = self.lr_min_factor
        if self.lr_decay == "linear":
            return 1.0 - (1.0 - lo) * t
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))

    def noise_std(self, kimg: float) -> float:
        """Instance-noise std at absolute `kimg`: linear decay to 0 at instance_noise_kimg, or
        constant when that is unset. Noise on both of D's inputs keeps D smooth early on, so its
        gradient still reaches modes G has no samples near (mass can move between modes)."""
        if self.instance_noise <= 0.0:
            return 0.0
        if not self.instance_noise_kimg:
            return self.instance_noise
        return self.instance_noise * max(0.0, 1.0 - kimg / self.instance_noise_kimg)


def channels_last_for(requested: Optional[bool], device: torch.device) -> bool:
    """`resources.channels_last`, or its default when unset: on for CPU, where oneDNN's NHWC
    convolutions ran a DCGAN-32 round about 7% faster on one thread; off on CUDA, where the H100
    rows were faster with it in fp32 and slower in bf16 at batch 256, so it is the user's call.
    Only conv nets (image samples) are converted; the MLPs ignore it."""
    if requested is None:
        return device.type == "cpu"
    return bool(requested)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("resources.device is 'cuda' but this worker sees no GPU; "
                               "set resources.gpus_per_worker or resources.device: cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class NoiseStreams:
    """Per-(round, slot) random streams drawn for the global batch and sliced by rank.

    Seeding a fresh generator per draw makes every draw a pure function of (seed, round, slot),
    so any worker count, restart or resume reproduces the same noise.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        # Draw on the worker's own device: a CPU draw plus a copy per step would stall a GPU.
        # (CUDA and CPU streams differ, but every replica of a job shares one device type.)
        self._gen = torch.Generator(device=device)

    def _seed_for(self, round_idx: int, slot: int) -> int:
        # A large odd multiplier keeps (seed, round, slot) triples from colliding in practice.
        return (self.seed * 0x9E3779B97F4A7C15 + round_idx * 1_000_003 + slot) % (2**63 - 1)

    def latent(self, kind: str, round_idx: int, slot: int, shape: tuple[int, ...], part: int,
               parts: int) -> torch.Tensor:
        """z for the global batch from G's latent distribution (models/latent.py), sliced by rank."""
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(draw_latent(kind, shape, generator=self._gen, device=self.device), part, parts)

    def uniform(self, round_idx: int, slot: int, n: int, part: int, parts: int) -> torch.Tensor:
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(torch.rand((n,), generator=self._gen, device=self.device), part, parts)

    def add_noise(self, x: torch.Tensor, std: float, round_idx: int, slot: int, global_batch: int, part: int,
                  parts: int) -> torch.Tensor:
        """`x` (this rank's rows) plus `std` times standard normal noise drawn for the global batch
        and sliced like the rows, so the sum does not depend on how many workers drew it."""
        if std <= 0.0:
            return x
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        full = torch.randn((global_batch, *x.shape[1:]), generator=self._gen, device=self.device)
        return x + std * _slice(full, part, parts).to(x.dtype)

    def noisy_d_inputs(self, real: torch.Tensor, fake: torch.Tensor, std: float, round_idx: int, step: int,
                       global_batch: int, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """D step `step`'s real and fake rows with instance noise, as every topology draws it."""
        return (self.add_noise(real, std, round_idx, REAL_NOISE_SLOT + step, global_batch, part, parts),
                self.add_noise(fake, std, round_idx, FAKE_NOISE_SLOT + step, global_batch, part, parts))


def _slice(full: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    if parts == 1:
        return full
    size = full.shape[0] // parts
    return full[part * size:(part + 1) * size]


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


class GeneratorRole:
    """G, G_ema and G's optimizer, with the G-side steps (used whole, or alone in `split`)."""

    def __init__(self, config: dict[str, Any], sample_shape: tuple[int, ...], settings: StepSettings) -> None:
        self.settings = settings
        torch.manual_seed(settings.seed)  # same initial weights in every process
        self.G = build_generator(config["model"], sample_shape).to(settings.device)
        if settings.channels_last and len(sample_shape) == 3:
            self.G = self.G.to(memory_format=torch.channels_last)
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
        with torch.no_grad(), _autocast(self.settings):
            return self.G(z).float()

    def forward_with_graph(self, z: torch.Tensor) -> torch.Tensor:
        with _autocast(self.settings):
            return self.G(z).float()

    def step(self, sync: Optional[GradSync]) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce G's gradients (when replicated), then step unless they are non-finite.
        Returns (gradient norm, skipped) as tensors: no host sync on a GPU."""
        if sync is not None:
            sync([p.grad for p in self.params])
        return self.apply()

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step on G's (already synchronised) gradients; returns (gradient norm, skipped)."""
        return _guarded_step(self.opt, self.params)

    def update_ema(self) -> None:
        update_ema(self.G_ema, self.G, ema_beta(self.settings.global_batch, self.settings.ema_half_life_kimg))


class DiscriminatorRole:
    """D and its optimizer with the D-side steps: a D step, and feedback dL_G/dx for G."""

    def __init__(self, config: dict[str, Any], sample_shape: tuple[int, ...], settings: StepSettings,
                 seed_offset: int = 0) -> None:
        self.settings = settings
        # seed_offset gives each split discriminator its own init; 0 keeps replicas identical.
        torch.manual_seed(settings.seed + 1 + seed_offset)
        self.D = build_discriminator(config["model"], sample_shape).to(settings.device)
        if settings.channels_last and len(sample_shape) == 3:
            self.D = self.D.to(memory_format=torch.channels_last)
        h = settings.hyper
        self.opt = _adam(self.D.parameters(), h.d_lr, h.betas)
        self.params = list(self.D.parameters())
        self.d_steps = 0  # global D step count, drives the lazy R1 interval

    def apply_hyper(self, kimg: float) -> None:
        h = self.settings.hyper
        _set_lr(self.opt, h.d_lr * self.settings.lr_factor(kimg), h.betas)

    def real_side(self, real: torch.Tensor) -> RealSide:
        """D's forward on the real rows, plus the lazy R1 term when this D step is due one.

        Only D and the data enter here, so a replica runs it while G's gradients are still being
        all-reduced (see `ReplicaStepper._round`)."""
        s = self.settings
        with _autocast(s):
            logits = self.D(real).float()
        r1 = None
        gamma = s.hyper.r1_gamma
        if gamma > 0 and self.d_steps % s.r1_interval == 0:
            # Lazy R1 (StyleGAN2): applied every r1_interval steps, scaled by the interval so the
            # expected regularisation strength matches applying it every step.
            r1 = (gamma / 2.0) * s.r1_interval * losses.r1_penalty(self.D, real)
        return RealSide(real, logits, r1)

    def backward(self, side: RealSide, fake: torch.Tensor, alpha: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """D's loss on `side` and the fake rows, backpropagated into D's gradients (not applied)."""
        s = self.settings
        with _autocast(s):
            fake_logits = self.D(fake).float()
            loss = losses.d_loss(s.loss_kind, side.logits, fake_logits)
        total = loss
        if s.loss_kind == "wgan-gp" and s.gp_weight > 0 and alpha is not None:
            total = total + s.gp_weight * losses.gradient_penalty(self.D, side.real, fake, alpha)
        if side.r1 is not None:
            total = total + side.r1
        total.backward()
        return {"loss_D": loss.detach(), "real_score": side.logits.detach().mean(),
                "fake_score": fake_logits.detach().mean()}

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step on D's (already synchronised) gradients; returns (gradient norm, skipped)."""
        norm, skipped = _guarded_step(self.opt, self.params)
        self.d_steps += 1
        return norm.detach(), skipped

    def d_step(self, real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor],
               sync: Optional[GradSync]) -> dict[str, torch.Tensor]:
        """One whole D step: forward on both batches, backward, optional gradient sync, step."""
        metrics = self.backward(self.real_side(real), fake, alpha)
        if sync is not None:
            sync([p.grad for p in self.params])
        metrics["grad_norm_D"], metrics["skipped_D"] = self.apply()
        return metrics

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """G's loss on `fake` through this D, with D's parameters frozen (no D gradients)."""
        # Toggle the parameter list directly: Module.requires_grad_ walks every submodule.
        for p in self.params:
            p.requires_grad_(False)
        try:
            with _autocast(self.settings):
                return losses.g_loss(self.settings.loss_kind, self.D(fake).float())
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def feedback(self, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G loss, dL_G/dx) for a detached fake batch: what a split D worker sends back to G."""
        x = fake.detach().requires_grad_(True)
        loss = self.g_loss(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad


def _autocast(settings: StepSettings):
    if settings.autocast_bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _PendingGStep:
    """A round whose G gradients are still being averaged: its G step, EMA update and G metrics
    are finished at the start of the next round (or at the end of the chunk)."""

    def __init__(self, sync: PendingSync, record: dict[str, torch.Tensor]) -> None:
        self.sync, self.record = sync, record


class _NoSync:
    """What a replica without peers (`local`, one worker) "starts": nothing to wait for."""

    def wait(self) -> None:
        return None


class ReplicaStepper:
    """One replica: G, D and G_ema in one process; `local` is the world-size-1 case.

    With peers (`start_sync`), each phase's gradient all-reduce runs while the replica does work
    that does not need its result, the way DDP overlaps buckets with the backward pass but at
    phase granularity: D's reduce overlaps G's forward pass (the next fakes), and G's reduce
    overlaps the next round's real-data half of D's step (batch, D on the real rows, R1). Every
    value is computed from the same inputs as in the sequential order, so the results are
    bit-identical to it and to `local`.
    """

    def __init__(self, config: dict[str, Any], source: Any, sampler: Any, rank: int = 0, world: int = 1,
                 start_sync: Optional[StartSync] = None) -> None:
        self.config = config
        self.settings = StepSettings.from_config(config)
        self.source = source
        self.sampler = sampler
        self.rank, self.world = rank, world
        self.start_sync = start_sync
        shape = tuple(source.sample_shape)
        self.gen = GeneratorRole(config, shape, self.settings)
        self.disc = DiscriminatorRole(config, shape, self.settings)
        self.noise = NoiseStreams(self.settings.seed, self.settings.device)
        self.batches = RealBatches(source, self.settings.device)
        self.rounds = 0          # rounds completed (global, same on every replica)
        self.images_seen = 0     # real images consumed by D, all replicas together
        self.nonfinite_run = 0   # consecutive rounds with a skipped step
        self.time_compute = 0.0
        self.time_comm = 0.0

    # -- the round -------------------------------------------------------------------------
    def run_rounds(self, n_rounds: int, stop_at_images: Optional[int] = None) -> dict[str, Any]:
        """Run up to `n_rounds` rounds; return per-round metric lists (local to this replica).

        Every round is complete on return (the last G step is not left pending), so state,
        checkpoints and samples taken between chunks see finished rounds."""
        records: list[dict[str, torch.Tensor]] = []
        t0 = time.perf_counter()
        comm_before = self.time_comm
        pending: Optional[_PendingGStep] = None
        for _ in range(n_rounds):
            if stop_at_images is not None and self.images_seen >= stop_at_images:
                break
            pending = self._round(pending)
            records.append(pending.record)
        self._finish_g_step(pending)
        elapsed = time.perf_counter() - t0
        comm = self.time_comm - comm_before
        out: dict[str, Any] = {"rounds": len(records), "images_seen": self.images_seen,
                               "round_index": self.rounds, "time_compute_s": elapsed - comm,
                               "time_comm_s": comm, "nonfinite_run": self.nonfinite_run}
        if records:
            # One device-to-host transfer per chunk, not per round.
            keys = list(records[0].keys())
            table = torch.stack([torch.stack([r[k].float() for k in keys]) for r in records]).cpu()
            stacked = {k: table[:, i].tolist() for i, k in enumerate(keys)}
            for skipped in stacked["skipped"]:
                self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
            out["metrics"] = stacked
            out["nonfinite_run"] = self.nonfinite_run
        else:
            out["metrics"] = {}
        return out

    def _start_sync(self, params: list[nn.Parameter]) -> PendingSync:
        if self.start_sync is None:
            return _NoSync()
        t = time.perf_counter()
        pending = self.start_sync([p.grad for p in params])
        self.time_comm += time.perf_counter() - t
        return pending

    def _wait(self, pending: PendingSync) -> None:
        # Only the wait is counted as communication: the overlapped part is hidden behind compute.
        t = time.perf_counter()
        pending.wait()
        self.time_comm += time.perf_counter() - t

    def _finish_g_step(self, pending: Optional[_PendingGStep]) -> None:
        """Complete a round's G step once its gradients are averaged: step, EMA, G metrics."""
        if pending is None:
            return
        self._wait(pending.sync)
        norm, skipped = self.gen.apply()
        self.gen.update_ema()
        pending.record["grad_norm_G"] = norm.detach()
        pending.record["skipped"] = pending.record["skipped"] + skipped

    def _real_side(self, step: int, std: float) -> RealSide:
        s = self.settings
        real = self.batches.next(self.sampler)
        real = self.noise.add_noise(real, std, self.rounds, REAL_NOISE_SLOT + step, s.global_batch,
                                    self.rank, self.world)
        return self.disc.real_side(real)

    def _fake_for_d(self, step: int, std: float) -> torch.Tensor:
        s = self.settings
        z = self.noise.latent(self.gen.latent, self.rounds, step, (s.global_batch, self.gen.z_dim),
                              self.rank, self.world)
        return self.noise.add_noise(self.gen.generate(z), std, self.rounds, FAKE_NOISE_SLOT + step,
                                    s.global_batch, self.rank, self.world)

    def _round(self, previous: Optional[_PendingGStep]) -> _PendingGStep:
        """One round; the previous round's G step completes inside it, and this round's G step is
        returned pending (its gradients in flight)."""
        s, h = self.settings, self.settings.hyper
        B, r, w = s.global_batch, self.rank, self.world
        kimg = self.images_seen / 1000.0
        std = s.noise_std(kimg)
        self.disc.apply_hyper(kimg)
        side = self._real_side(0, std)        # overlaps the previous round's G reduce
        self._finish_g_step(previous)          # G steps at the previous round's learning rate...
        self.gen.apply_hyper(kimg)             # ...and only then takes this round's
        fake = self._fake_for_d(0, std)
        d_metrics: list[dict[str, torch.Tensor]] = []
        for k in range(h.n_critic):
            alpha = self.noise.uniform(self.rounds, ALPHA_SLOT + k, B, r, w) if s.loss_kind == "wgan-gp" else None
            metrics = self.disc.backward(side, fake, alpha)
            d_sync = self._start_sync(self.disc.params)
            # G's forward pass does not read D, so it runs while D's gradients travel.
            if k + 1 < h.n_critic:
                fake = self._fake_for_d(k + 1, std)
            else:
                z = self.noise.latent(self.gen.latent, self.rounds, G_SLOT, (B, self.gen.z_dim), r, w)
                fake_g = self.noise.add_noise(self.gen.forward_with_graph(z), std, self.rounds, G_NOISE_SLOT, B, r, w)
            self._wait(d_sync)
            metrics["grad_norm_D"], metrics["skipped_D"] = self.disc.apply()
            d_metrics.append(metrics)
            if k + 1 < h.n_critic:
                side = self._real_side(k + 1, std)
        loss_g = self.disc.g_loss(fake_g)
        loss_g.backward()
        g_sync = self._start_sync(self.gen.params)
        self.rounds += 1
        self.images_seen += h.n_critic * B
        last = d_metrics[-1]
        record = {"loss_D": torch.stack([m["loss_D"] for m in d_metrics]).mean(),
                  "loss_G": loss_g.detach(), "real_score": last["real_score"],
                  "fake_score": last["fake_score"], "grad_norm_D": last["grad_norm_D"],
                  "grad_norm_G": torch.zeros(()),  # set when the G step completes
                  "skipped": torch.stack([m["skipped_D"] for m in d_metrics]).sum()}
        return _PendingGStep(g_sync, record)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The full training state of this replica as plain tensors/ints (checkpoint parts)."""
        return {
            "G": {k: v.detach().cpu().clone() for k, v in self.gen.G.state_dict().items()},
            "D": {k: v.detach().cpu().clone() for k, v in self.disc.D.state_dict().items()},
            "G_ema": {k: v.detach().cpu().clone() for k, v in self.gen.G_ema.state_dict().items()},
            "opt_G": cpu_tree(self.gen.opt.state_dict()),
            "opt_D": cpu_tree(self.disc.opt.state_dict()),
            "progress": {"rounds": self.rounds, "images_seen": self.images_seen,
                         "d_steps": self.disc.d_steps},
            "sampler": {"rank0": self.sampler.state_dict()},
        }

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        """Restore from `state()`; with keep_hyper the current (possibly mutated) learning rates and
        betas are re-applied over the restored optimizers (PBT exploit)."""
        self.gen.G.load_state_dict(state["G"])
        self.disc.D.load_state_dict(state["D"])
        self.gen.G_ema.load_state_dict(state["G_ema"])
        self.gen.opt.load_state_dict(state["opt_G"])
        self.disc.opt.load_state_dict(state["opt_D"])
        prog = state["progress"]
        self.rounds, self.images_seen = int(prog["rounds"]), int(prog["images_seen"])
        self.disc.d_steps = int(prog["d_steps"])
        sampler_state = state.get("sampler", {})
        mine = sampler_state.get(f"rank{self.rank}") or sampler_state.get("rank0")
        if mine is not None:
            self.sampler.load_state_dict(mine)
        if keep_hyper:
            self.gen.apply_hyper(self.images_seen / 1000.0)
            self.disc.apply_hyper(self.images_seen / 1000.0)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        h = self.settings.hyper
        for key, value in hyper.items():
            if key == "betas":
                value = (float(value[0]), float(value[1]))
            setattr(h, key, value)
        self.gen.apply_hyper(self.images_seen / 1000.0)
        self.disc.apply_hyper(self.images_seen / 1000.0)

    def scale_lr(self, factor: float) -> None:
        self.set_hyper({"g_lr": self.settings.hyper.g_lr * factor, "d_lr": self.settings.hyper.d_lr * factor})

    def param_checksum(self) -> float:
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for m in (self.gen.G, self.disc.D, self.gen.G_ema):
                for p in m.parameters():
                    total += p.detach().double().sum().cpu()
            return float(total)


# In-memory data up to this size is kept on the GPU, so a step indexes it there instead of
# copying a batch from host memory.
def cpu_tree(obj: Any) -> Any:
    """A deep copy of a state tree with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tree(v) for v in obj)
    return obj
