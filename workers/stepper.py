"""`ReplicaStepper`: one replica (G, D and G_ema in one process) running the round table, and
`build_replica`, the one way to build it. Plain torch, no Ray.

`local` runs it in the driver process (world size 1), `replicated` inside each `ReplicaWorker`
actor with a gradient all-reduce per phase, and the benchmark's in-process contender calls
`build_replica` too. All randomness comes from per-round streams drawn for the global batch and
sliced by rank (`noise.py`), so results do not depend on how many replicas drew them; a
conditional GAN's fake classes too, while the real rows' classes come with the rows.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from ganray.workers.conditional import class_labels
from ganray.workers.data import load_dataset
from ganray.workers.augment import DRAWS
from ganray.workers.noise import (ALPHA_SLOT, AUGMENT_FAKE_SLOT, AUGMENT_G_SLOT, AUGMENT_REAL_SLOT, FAKE_NOISE_SLOT,
                                  G_LABEL_SLOT, G_NOISE_SLOT, G_SLOT, LABEL_SLOT, REAL_NOISE_SLOT, NoiseStreams)
from ganray.workers.phase_loss import RealHalf
from ganray.workers.phases import Phase, Progress, table_of
from ganray.workers.settings import StepSettings
from ganray.workers.sharding import RealBatches, ShardSampler, sampler_state_for
from ganray.workers.stats import LOSS_G, SKIPPED, RoundStats, per_round_lists
from ganray.workers.steps import DiscriminatorRole, GeneratorRole, cpu_tree


class PendingSync(Protocol):
    """Gradients being averaged over the replicas; `wait` leaves the means in place."""

    def wait(self) -> None: ...


# Starts averaging the gradients over the replicas and returns at once (Collective.start_all_reduce_mean).
StartSync = Callable[[list[Optional[torch.Tensor]]], PendingSync]


class _NoSync:
    """What a replica without peers (`local`, one worker) "starts": nothing to wait for."""

    def wait(self) -> None:
        return None


class _PendingGStep:
    """A round whose G gradients are still being averaged: its G step, G_ema phase and G
    statistics are finished at the start of the next round (or at the end of the chunk)."""

    def __init__(self, sync: PendingSync, stats: RoundStats) -> None:
        self.sync, self.stats = sync, stats


def build_replica(config: dict[str, Any], rank: int = 0, world: int = 1,
                  start_sync: Optional[StartSync] = None) -> Any:
    """Replica `rank` of `world`: its training data, its `ShardSampler`, its stepper: a
    `ReplicaStepper` for `model.learner: gan`, the learner's `LearnerStepper` otherwise.

    World 1 with no `start_sync` is exactly the `local` engine's replica."""
    seed = int(config["seed"])
    source = load_dataset(config["data"], seed, "train")
    sampler = ShardSampler(len(source), int(config["schedule"]["batch_size"]), seed, rank, world)
    learner = str(config["model"].get("learner", "gan"))
    if learner != "gan":
        from ganray.workers.learners import learner_class

        return learner_class(learner)(config, source, sampler, rank, world, start_sync)
    return ReplicaStepper(config, source, sampler, rank, world, start_sync)


class ReplicaStepper:
    """One replica running the round table; `local` is the world-size-1 case.

    With peers (`start_sync`), each phase's gradient all-reduce runs while the replica does work
    that does not need its result, the way DDP overlaps buckets with the backward pass but at
    phase granularity: D's reduce overlaps G's forward pass (the next fakes), and G's reduce
    overlaps the next round's real half of the first D phase (batch, D on the real rows, R1). Every
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
        self.batches = RealBatches(source, self.settings.device, class_labels(config, source))
        self.progress = Progress()
        self.nonfinite_run = 0   # consecutive rounds with a skipped step
        self.time_comm = 0.0

    @property
    def images_seen(self) -> int:
        return self.progress.images_seen

    @property
    def rounds(self) -> int:
        return self.progress.rounds

    # -- the round -------------------------------------------------------------------------
    def run_rounds(self, n_rounds: int, stop_at_images: Optional[int] = None) -> dict[str, Any]:
        """Run up to `n_rounds` rounds; return per-round statistics lists (local to this replica).

        Every round is complete on return (the last G step is not left pending), so state,
        checkpoints and samples taken between chunks see finished rounds."""
        records: list[RoundStats] = []
        t0 = time.perf_counter()
        comm_before = self.time_comm
        pending: Optional[_PendingGStep] = None
        for _ in range(n_rounds):
            if stop_at_images is not None and self.progress.images_seen >= stop_at_images:
                break
            pending = self._round(pending)
            records.append(pending.stats)
        self._finish_g_step(pending)
        elapsed = time.perf_counter() - t0
        comm = self.time_comm - comm_before
        metrics = per_round_lists(records)  # one device-to-host transfer per chunk, not per round
        for skipped in metrics.get(SKIPPED, []):
            self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        return {"rounds": len(records), "images_seen": self.progress.images_seen,
                "round_index": self.progress.rounds, "time_compute_s": elapsed - comm,
                "time_comm_s": comm, "nonfinite_run": self.nonfinite_run, "metrics": metrics}

    def _start_sync(self, params: list[nn.Parameter], extra: Optional[list[torch.Tensor]] = None) -> PendingSync:
        """Start averaging `params`' gradients, and `extra` tensors (ADA's signs) in the same call."""
        if self.start_sync is None:
            return _NoSync()
        t = time.perf_counter()
        pending = self.start_sync([p.grad for p in params] + (extra or []))
        self.time_comm += time.perf_counter() - t
        return pending

    def _wait(self, pending: PendingSync) -> None:
        # Only the wait is counted as communication: the overlapped part is hidden behind compute.
        t = time.perf_counter()
        pending.wait()
        self.time_comm += time.perf_counter() - t

    def _finish_g_step(self, pending: Optional[_PendingGStep]) -> None:
        """Complete a round's G phase once its gradients are averaged (step), then its G_ema phase."""
        if pending is None:
            return
        self._wait(pending.sync)
        self.gen.apply(pending.stats)
        self.gen.update_ema()

    def _real_half(self, phase: Phase, std: float) -> RealHalf:
        s = self.settings
        real, labels = self.batches.next_labelled(self.sampler)
        real = self.noise.add_noise(real, std, self.progress.rounds, REAL_NOISE_SLOT + phase.step, s.global_batch,
                                    self.rank, self.world)
        draws = self._draws(phase, AUGMENT_REAL_SLOT + phase.step)
        return self.disc.real_half(phase, real, self.progress.d_steps, draws, labels)

    def _draws(self, phase: Phase, slot: int) -> Optional[torch.Tensor]:
        """This rank's rows of the augmentation parameters of `phase` from stream `slot`; None
        when the phase does not augment D's inputs."""
        if not phase.augment:
            return None
        return self.noise.uniform_rows(self.progress.rounds, slot, self.settings.global_batch, DRAWS,
                                       self.rank, self.world)

    def _fake_labels(self, slot: int) -> Optional[torch.Tensor]:
        """This rank's fake classes from stream `slot` (None for an unconditional GAN)."""
        return self.noise.labels(self.progress.rounds, slot, self.settings.global_batch, self.gen.num_classes,
                                 self.rank, self.world)

    def _fake_for_d(self, phase: Phase, std: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        s, r = self.settings, self.progress.rounds
        z = self.noise.latent(self.gen.latent, r, phase.step, (s.global_batch, self.gen.z_dim), self.rank, self.world)
        y = self._fake_labels(LABEL_SLOT + phase.step)
        return self.noise.add_noise(self.gen.generate(z, y), std, r, FAKE_NOISE_SLOT + phase.step, s.global_batch,
                                    self.rank, self.world), y

    def _fake_for_g(self, std: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        s, r = self.settings, self.progress.rounds
        z = self.noise.latent(self.gen.latent, r, G_SLOT, (s.global_batch, self.gen.z_dim), self.rank, self.world)
        y = self._fake_labels(G_LABEL_SLOT)
        return self.noise.add_noise(self.gen.forward_with_graph(z, y), std, r, G_NOISE_SLOT, s.global_batch,
                                    self.rank, self.world), y

    def _round(self, previous: Optional[_PendingGStep]) -> _PendingGStep:
        """One pass of the round table; the previous round's G step completes inside it, and this
        round's G step is returned pending (its gradients in flight)."""
        s = self.settings
        table = table_of(s)
        d_phases = table.d_steps
        B, r, w = s.global_batch, self.rank, self.world
        kimg = self.progress.kimg
        std = s.noise_std(kimg)
        stats = RoundStats()
        self.disc.apply_hyper(kimg)
        half = self._real_half(d_phases[0], std)    # overlaps the previous round's G reduce
        self._finish_g_step(previous)                # G steps at the previous round's learning rate...
        self.gen.apply_hyper(kimg)                   # ...and only then takes this round's
        fake, fake_y = self._fake_for_d(d_phases[0], std)
        for k, phase in enumerate(d_phases):
            alpha = self.noise.uniform(self.progress.rounds, ALPHA_SLOT + phase.step, B, r, w) \
                if s.loss_kind == "wgan-gp" else None
            self.disc.backward(phase, half, fake, alpha, self.progress.d_steps, stats,
                               self._draws(phase, AUGMENT_FAKE_SLOT + phase.step), fake_y)
            d_sync = self._start_sync(self.disc.params, self.disc.reduced_with_grads())
            # G's forward pass does not read D, so it runs while D's gradients travel.
            last = k + 1 == len(d_phases)
            if last:
                fake_g, g_y = self._fake_for_g(std)
            else:
                fake, fake_y = self._fake_for_d(d_phases[k + 1], std)
            self._wait(d_sync)
            self.disc.apply(stats)
            self.progress.d_steps += 1
            self.disc.end_d_step(phase, self.progress.d_steps, stats)
            if not last:
                half = self._real_half(d_phases[k + 1], std)
        # The G phase: the fakes pair with the last D phase's reals, re-scored by the updated D.
        loss_g = self.disc.g_loss(fake_g, half.real, self._draws(table.g_step, AUGMENT_G_SLOT), g_y, half.labels)
        loss_g.backward()
        stats.report(LOSS_G, loss_g)
        g_sync = self._start_sync(self.gen.params)
        self.progress.end_round(table, B)
        return _PendingGStep(g_sync, stats)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The full training state of this replica as plain tensors/ints (checkpoint parts); the
        sampler under this replica's own key, `rank{r}`; the augmentation's p when it is on (the
        same on every replica: its r_t is reduced with D's gradients)."""
        state = {
            "G": cpu_tree(self.gen.G.state_dict()),
            "D": cpu_tree(self.disc.D.state_dict()),
            "G_ema": cpu_tree(self.gen.G_ema.state_dict()),
            "opt_G": cpu_tree(self.gen.opt.state_dict()),
            "opt_D": cpu_tree(self.disc.opt.state_dict()),
            "progress": self.progress.state(),
            "sampler": {self.sampler_key: self.sampler.state_dict()},
        }
        augment = self.disc.augment_state()
        if augment is not None:
            state["augment"] = augment
        return state

    def rebind(self, rank: int, world: int, start_sync: Optional[StartSync]) -> None:
        """Become rank `rank` of `world` replicas (an elastic job that shrank or grew): the same
        global batch, data order and noise, this rank's part of them. The caller loads a job
        state next, which sets the sampler's position."""
        self.rank, self.world, self.start_sync = int(rank), int(world), start_sync
        self.sampler = ShardSampler(self.sampler.n, self.sampler.global_batch, self.sampler.seed, rank, world)

    @property
    def sampler_key(self) -> str:
        return f"rank{self.rank}"

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        """Restore from a job state holding this replica's sampler key; with keep_hyper the current
        (possibly mutated) learning rates and betas are re-applied over the restored optimizers
        (PBT exploit)."""
        sampler = sampler_state_for(state.get("sampler", {}), self.sampler_key)
        self.gen.G.load_state_dict(state["G"])
        self.disc.D.load_state_dict(state["D"])
        self.gen.G_ema.load_state_dict(state["G_ema"])
        self.gen.opt.load_state_dict(state["opt_G"])
        self.disc.opt.load_state_dict(state["opt_D"])
        self.progress.load(state["progress"])
        self.sampler.load_state_dict(sampler)
        # A round cut short (a peer lost mid-chunk) leaves its gradients behind, and the next
        # backward would add to them: the restored replica starts as a fresh one would.
        self.gen.opt.zero_grad(set_to_none=True)
        self.disc.opt.zero_grad(set_to_none=True)
        self.nonfinite_run = 0
        self.disc.load_augment_state(state.get("augment"))
        if keep_hyper:
            self.apply_hyper()

    def apply_hyper(self) -> None:
        """Both optimizers take the current hyperparameters at the current kimg."""
        self.gen.apply_hyper(self.progress.kimg)
        self.disc.apply_hyper(self.progress.kimg)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        """Validated update of the hyperparameters (an unknown name is a ConfigError)."""
        self.settings.hyper.update(hyper)
        self.apply_hyper()

    def scale_lr(self, factor: float) -> None:
        self.set_hyper({"g_lr": self.settings.hyper.g_lr * factor, "d_lr": self.settings.hyper.d_lr * factor})

    def modules(self) -> tuple[nn.Module, ...]:
        """The networks whose parameters the checksum covers and a group broadcast shares."""
        return (self.gen.G, self.disc.D, self.gen.G_ema)

    def sampling_module(self) -> nn.Module:
        """The z -> x module evaluation, samples and releases use: G_ema."""
        return self.gen.G_ema

    def reduced_numel(self) -> int:
        """Elements of the largest gradient all-reduce (G's or D's)."""
        # +1 with ada: r_t's sign mean rides along with D's gradients.
        extra = 1 if self.settings.augment.adaptive else 0
        return max(sum(p.numel() for p in self.gen.params), sum(p.numel() for p in self.disc.params) + extra)
