"""`LearnerStepper`: the plumbing every non-GAN learner shares, so a learner writes only its round.

How a learner plugs in (`ae`, `vae` in `autoencoder.py`; `energy` in `energy.py`):

1. Subclass `LearnerStepper` in `workers/learners/<file>.py` and list it in `LEARNERS`
   (`workers/learners/__init__.py`, "learner name" -> "module:Class"); `build_replica`
   (`workers/stepper.py`) then builds it for `model.learner: <name>`.
2. Implement its own part:
   - `build()`: create the networks (the global torch seed is already set, so every replica
     initialises the same weights) and one optimizer per network group with
     `self.add_optimizer(name, params, lr_key)` (`lr_key` is the `Hyper` field that holds its
     learning rate: "g_lr" for a generator-side network, "d_lr" for a critic; its state part is
     "opt_<name>", its statistic "grad_norm/<name>").
   - `networks()`: name -> module of everything that is state (checkpointed under its name,
     broadcast when a group forms). Keep any extra state (code statistics, a replay buffer) in
     buffers of such a module, so checkpoints, resume and broadcasts cover it with no extra code.
   - `table()`: the round as a `RoundTable` of `Phase`s (phases.py style): what `round` runs,
     phase by phase, stated as data. `images_per_round()` says how many real images a round
     reads (all replicas together; one global batch unless overridden).
   - `round(stats)`: one round. Draw data with `self.real_batch()`, randomness with
     `self.normal(slot, shape)` / `self.noise` at `self.progress.rounds` (per-(round, slot)
     streams drawn for the global batch and sliced by rank: never the global RNG), average
     anything across replicas with `self.average(tensors)` (say its size in `averaged_numel`)
     and take optimizer steps with `self.step(name, stats)` (gradients averaged through the replicas' `start_sync` hook, the
     step skipped when they are non-finite, SKIPPED and `grad_norm/<name>` reported). Report
     statistics by their MLflow names with `stats.report(...)`.
   - `sampling_module()`: the z -> x `nn.Module` (with `z_dim`, `sample_shape`, `latent`
     attributes) that evaluation, sample grids and releases use; `build_sampling_module` in
     models/registry.py must rebuild the same module from the config, so its `state_dict`
     (stored as the state part "G_ema", the name every checkpoint reader knows) loads there.
3. Say which config keys it does not read (`LEARNER_IGNORES` in orchestrator/job/learner_keys.py).

The base class gives the interface `ReplicaStepper` has (`run_rounds`, `state`, `load_state`,
`apply_hyper`, `set_hyper`, `scale_lr`, `modules`, `reduced_numel`, `rebind`, `rounds`, `images_seen`,
`source`, `settings`, `sampler_key`), so the local engine, the replica actors, checkpoints,
fault handling and resume run a learner exactly as they run the GAN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ganray.models.errors import CheckpointError
from ganray.workers.noise import NoiseStreams
from ganray.workers.phases import Progress, RoundTable
from ganray.workers.settings import StepSettings
from ganray.workers.sharding import RealBatches, ShardSampler, sampler_state_for
from ganray.workers.stats import SKIPPED, RoundStats, per_round_lists
from ganray.workers.steps import adam_optimizer, cpu_tree, guarded_step, set_lr

# The state part under which every stepper stores its sampling module's state dict (the GAN's
# G_ema): checkpoint readers (`ganray sample`, Tune, evaluation) look for it by this name.
SAMPLING_PART = "G_ema"


@dataclass
class Optimized:
    """One optimizer of a learner, the parameters it steps and the `Hyper` field of its rate."""

    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    lr_key: str


class LearnerStepper:
    """One replica of a non-GAN learner: `local` is world 1 with no `start_sync`."""

    name = "learner"

    def __init__(self, config: dict[str, Any], source: Any, sampler: Any, rank: int = 0, world: int = 1,
                 start_sync: Any = None) -> None:
        self.config = config
        self.model_cfg = dict(config["model"])
        self.settings = StepSettings.from_config(config)
        self.source = source
        self.sampler = sampler
        self.rank, self.world = rank, world
        self.start_sync = start_sync
        self.sample_shape = tuple(int(s) for s in source.sample_shape)
        self.device = self.settings.device
        self.noise = NoiseStreams(self.settings.seed, self.device)
        self.batches = RealBatches(source, self.device)
        self.progress = Progress()
        self.nonfinite_run = 0  # consecutive rounds with a skipped step
        self.time_comm = 0.0
        self.optimizers: dict[str, Optimized] = {}
        torch.manual_seed(self.settings.seed)  # same initial weights in every process
        self.build()
        self.apply_hyper()

    # -- the learner's own part -------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def table(self) -> RoundTable:
        raise NotImplementedError

    def round(self, stats: RoundStats) -> None:
        raise NotImplementedError

    def sampling_module(self) -> nn.Module:
        raise NotImplementedError

    def images_per_round(self) -> int:
        """Real images one round reads, all replicas together: one global batch by default."""
        return self.settings.global_batch

    # -- helpers for a round ------------------------------------------------------------------
    def add_optimizer(self, name: str, params: Any, lr_key: str) -> torch.optim.Optimizer:
        params = list(params)
        h = self.settings.hyper
        opt = adam_optimizer(params, float(getattr(h, lr_key)), h.betas)
        self.optimizers[name] = Optimized(opt, params, lr_key)
        return opt

    def real_batch(self) -> torch.Tensor:
        """This replica's rows of the next global batch, on the device (the sampler moves on)."""
        return self.batches.next(self.sampler)

    def normal(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal draws of `shape` per sample for this round's global batch, this rank's rows."""
        return self.noise.latent("normal", self.progress.rounds, slot, (self.settings.global_batch, *shape),
                                 self.rank, self.world)

    def average(self, tensors: list[Optional[torch.Tensor]]) -> None:
        """Replace each tensor by its mean over the replicas, in place (nothing without peers)."""
        if self.start_sync is None:
            return
        t = time.perf_counter()
        self.start_sync(tensors).wait()
        self.time_comm += time.perf_counter() - t

    def step(self, name: str, stats: RoundStats) -> None:
        """Average optimizer `name`'s gradients over the replicas, then step unless non-finite."""
        entry = self.optimizers[name]
        self.average([p.grad for p in entry.params])
        norm, skipped = guarded_step(entry.opt, entry.params)
        stats.report(f"grad_norm/{name}", norm.detach(), "last")
        stats.report(SKIPPED, skipped, "sum")

    # -- the interface ReplicaStepper has -----------------------------------------------------
    @property
    def images_seen(self) -> int:
        return self.progress.images_seen

    @property
    def rounds(self) -> int:
        return self.progress.rounds

    @property
    def sampler_key(self) -> str:
        return f"rank{self.rank}"

    def run_rounds(self, n_rounds: int, stop_at_images: Optional[int] = None) -> dict[str, Any]:
        """Run up to `n_rounds` rounds; return per-round statistics lists (local to this replica)."""
        records: list[RoundStats] = []
        t0 = time.perf_counter()
        comm_before = self.time_comm
        for _ in range(n_rounds):
            if stop_at_images is not None and self.progress.images_seen >= stop_at_images:
                break
            self.apply_hyper()  # this round's learning rates (decay is defined over absolute kimg)
            stats = RoundStats()
            self.round(stats)
            self.progress.rounds += 1
            self.progress.images_seen += self.images_per_round()
            records.append(stats)
        elapsed = time.perf_counter() - t0
        comm = self.time_comm - comm_before
        metrics = per_round_lists(records)  # one device-to-host transfer per chunk
        for skipped in metrics.get(SKIPPED, []):
            self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        return {"rounds": len(records), "images_seen": self.progress.images_seen,
                "round_index": self.progress.rounds, "time_compute_s": elapsed - comm,
                "time_comm_s": comm, "nonfinite_run": self.nonfinite_run, "metrics": metrics}

    def state(self) -> dict[str, Any]:
        """Every network (buffers included) by name, each optimizer as "opt_<name>", the sampling
        module's state as "G_ema", the progress, and the sampler under this replica's own key."""
        out: dict[str, Any] = {name: cpu_tree(m.state_dict()) for name, m in self.networks().items()}
        out.update({f"opt_{name}": cpu_tree(o.opt.state_dict()) for name, o in self.optimizers.items()})
        out[SAMPLING_PART] = cpu_tree(self.sampling_module().state_dict())
        out["progress"] = self.progress.state()
        out["sampler"] = {self.sampler_key: self.sampler.state_dict()}
        return out

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        sampler = sampler_state_for(state.get("sampler", {}), self.sampler_key)
        parts = [*self.networks(), *(f"opt_{name}" for name in self.optimizers)]
        missing = [p for p in parts if p not in state]
        if missing:
            raise CheckpointError(f"the state has no part {', '.join(map(repr, missing))} of the "
                                  f"'{self.name}' learner; resume with the config the run was trained with")
        for name, module in self.networks().items():
            module.load_state_dict(state[name])
        for name, entry in self.optimizers.items():
            entry.opt.load_state_dict(state[f"opt_{name}"])
        self.progress.load(state["progress"])
        self.sampler.load_state_dict(sampler)
        if keep_hyper:
            self.apply_hyper()

    def rebind(self, rank: int, world: int, start_sync: Any) -> None:
        """Become rank `rank` of `world` replicas (an elastic job that shrank or grew): the same
        global batch, data order and noise, this rank's part of them. The caller loads a job
        state next, which sets the sampler's position."""
        self.rank, self.world, self.start_sync = int(rank), int(world), start_sync
        self.sampler = ShardSampler(self.sampler.n, self.sampler.global_batch, self.sampler.seed, rank, world)

    def apply_hyper(self) -> None:
        """Every optimizer takes its current learning rate (at the current kimg) and betas."""
        h, factor = self.settings.hyper, self.settings.lr_factor(self.progress.kimg)
        for entry in self.optimizers.values():
            set_lr(entry.opt, float(getattr(h, entry.lr_key)) * factor, h.betas)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        """Validated update of the hyperparameters (an unknown name is a ConfigError)."""
        self.settings.hyper.update(hyper)
        self.apply_hyper()

    def scale_lr(self, factor: float) -> None:
        h = self.settings.hyper
        self.set_hyper({"g_lr": h.g_lr * factor, "d_lr": h.d_lr * factor})

    def modules(self) -> tuple[nn.Module, ...]:
        """The networks whose parameters the checksum covers and a group broadcast shares."""
        return tuple(self.networks().values())

    def averaged_numel(self) -> int:
        """Elements of the largest `average` call of a round other than gradients (0: none)."""
        return 0

    def reduced_numel(self) -> int:
        """Elements of the largest all-reduce: one optimizer's parameters, or `averaged_numel`."""
        return max(self.averaged_numel(), *(sum(p.numel() for p in o.params) for o in self.optimizers.values()))
