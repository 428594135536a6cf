"""The `split` topology's actors: `GeneratorWorker` (G, G_ema, opt_G) and `DiscriminatorWorker`.

The network is cut where G's output meets D's input. Per round:

- D phases of the round table: each of the M generator workers generates its part j of the
  fake batches of the D phases (`fakes`); the parts reach the K discriminator workers through the
  object store; D worker i runs every D phase on its B/K real samples and slice i of K of each
  fake batch (`d_phase`).
- G phase: each generator worker runs G with its graph kept (`forward`) and sends the detached
  batch; every D worker returns (L_i, dL_i/dx) for the whole batch, split into the M parts
  (`feedback`); generator worker j weighs the K gradients (mean, max, or GMAN softmax), back-
  propagates them through its kept graph, all-reduces among the generators, steps and runs the
  G_ema phase (`apply_feedback`). It reports each L_i and w_i as the round statistics
  `feedback/loss_G/d{i}` and `feedback/weight/d{i}`.

Data and noise follow the `local` conventions exactly (sampler rank i of K, noise streams drawn
for the global batch and sliced), so 1 G + 1 D with mean feedback reproduces `local`. With the
relativistic loss, D worker i pairs the G phase's B fakes with the B/K reals of its own last D
phase (fake j with real j mod B/K): for K = 1 that is `local`'s pairing, for K > 1 a variant in
which every critic judges the fakes against its own data. A conditional GAN's fake classes are
drawn from the noise streams on both sides (G for its rows, each D for the rows it scores), so
only images travel; the real classes come with each D's real rows.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray
import torch
from torch import nn

from ganray.workers.collective import Collective
from ganray.workers.conditional import class_labels
from ganray.workers.data import load_dataset
from ganray.workers.augment import DRAWS
from ganray.workers.noise import (ALPHA_SLOT, AUGMENT_FAKE_SLOT, AUGMENT_G_SLOT, AUGMENT_REAL_SLOT, G_LABEL_SLOT,
                                  G_NOISE_SLOT, G_SLOT, LABEL_SLOT, NoiseStreams)
from ganray.workers.phases import Progress, table_of
from ganray.workers.settings import StepSettings
from ganray.workers.sharding import RealBatches, RotatingShard
from ganray.workers.stats import LOSS_G, RoundStats, per_round_lists
from ganray.workers.steps import DiscriminatorRole, GeneratorRole, cpu_tree
from ganray.workers.worker_base import WorkerBase

FEEDBACK_MODES = ("mean", "max", "softmax")


def feedback_loss_name(d_index: int) -> str:
    """The statistic of discriminator `d_index`'s G loss L_i, as the generators received it."""
    return f"feedback/loss_G/d{d_index}"


def feedback_weight_name(d_index: int) -> str:
    """The statistic of the weight w_i that the feedback mode gave discriminator `d_index`."""
    return f"feedback/weight/d{d_index}"


def feedback_weights(losses: torch.Tensor, mode: str, lam: float) -> torch.Tensor:
    """Weights w_i (summing to 1) of the K discriminators' feedback.

    mean: 1/K each; max: all weight on the harshest critic (largest G loss); softmax: GMAN's
    softmax(lambda * L), which moves from mean (lambda=0) towards max (lambda -> inf).
    """
    if mode == "mean":
        return torch.full_like(losses, 1.0 / losses.numel())
    if mode == "max":
        w = torch.zeros_like(losses)
        w[int(torch.argmax(losses))] = 1.0
        return w
    if mode == "softmax":
        return torch.softmax(lam * losses, dim=0)
    raise ValueError(f"feedback mode must be one of {FEEDBACK_MODES} (got {mode!r})")


def rows_of(index: int, parts: int, batch: int) -> tuple[int, int]:
    """[start, stop) rows of part `index` of `parts` in a global batch of `batch` rows."""
    size = batch // parts
    return index * size, (index + 1) * size


def g_parts_for(d_index: int, k: int, m: int, batch: int) -> list[int]:
    """Which of the M generator parts overlap discriminator `d_index`'s slice (of K)."""
    start, stop = rows_of(d_index, k, batch)
    size = batch // m
    return list(range(start // size, (stop - 1) // size + 1))


class _Timed:
    """Accumulates the compute time a worker spends, for the coordinator's time split."""

    def __init__(self) -> None:
        self.compute = 0.0
        self.comm = 0.0

    def take(self) -> tuple[float, float]:
        out = (self.compute, self.comm)
        self.compute = self.comm = 0.0
        return out


def _round_record(stats: RoundStats) -> dict[str, float]:
    """A round's statistics as floats (one device-to-host transfer)."""
    return {name: values[0] for name, values in per_round_lists([stats]).items()}


@ray.remote
class GeneratorWorker(WorkerBase):
    """Generator worker j of M: G, G_ema and opt_G (all-reduced among the M when M > 1)."""

    def __init__(self, config: dict[str, Any], rank: int, world: int, feedback: str = "mean",
                 softmax_lambda: float = 1.0) -> None:
        super().__init__(config, rank, world)
        if feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback must be one of {FEEDBACK_MODES} (got {feedback!r})")
        self.feedback_mode, self.softmax_lambda = feedback, float(softmax_lambda)

    def setup(self, data_info: dict[str, Any]) -> float:
        """Build G from `data_info` = `DiscriminatorWorker.setup()` (G needs the sample shape,
        not the data); returns the parameter checksum. Errors raised here (not in `__init__`)
        reach the driver with their type."""
        self.settings = StepSettings.from_config(self.config)
        self.gen = GeneratorRole(self.config, tuple(data_info["sample_shape"]), self.settings)
        self.noise = NoiseStreams(self.settings.seed, self.settings.device)
        self.group = Collective(self.rank, self.world, self.settings.device)
        self.progress = Progress()
        self.timer = _Timed()
        self._fake: Optional[torch.Tensor] = None  # G's output with its graph, between forward and apply
        self._critics: Optional[list[int]] = None  # the discriminators giving feedback (None: all K)
        return self.param_checksum()

    def set_critics(self, indices: list[int]) -> None:
        """The discriminators whose feedback `apply_feedback` receives, in order: all K, or the
        survivors of an elastic job that lost some (its statistics keep each one's own name)."""
        self._critics = [int(i) for i in indices]

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.gen.G, self.gen.G_ema)

    def generator(self) -> nn.Module:
        return self.gen.G_ema

    def reduced_numel(self) -> int:
        return sum(p.numel() for p in self.gen.params)

    def apply_hyper(self) -> None:
        self.gen.apply_hyper(self.progress.kimg)

    # -- the round ---------------------------------------------------------------------------
    def _labels(self, round_idx: int, slot: int) -> Optional[torch.Tensor]:
        """Part j of the fake classes from stream `slot` (None for an unconditional GAN)."""
        return self.noise.labels(round_idx, slot, self.settings.global_batch, self.gen.num_classes,
                                 self.rank, self.world)

    def fakes(self, round_idx: int) -> torch.Tensor:
        """Part j of the fake batches of round `round_idx`'s D phases: (D phases, B/M, *shape)."""
        t0 = time.perf_counter()
        zshape = (self.settings.global_batch, self.gen.z_dim)
        out = torch.stack([self.gen.generate(self.noise.latent(self.gen.latent, round_idx, phase.step, zshape,
                                                               self.rank, self.world),
                                             self._labels(round_idx, LABEL_SLOT + phase.step))
                           for phase in table_of(self.settings).d_steps])
        out = out.cpu() if out.device.type != "cpu" else out
        self.timer.compute += time.perf_counter() - t0
        return out

    def forward(self, round_idx: int) -> torch.Tensor:
        """G's part j of the G phase's batch, kept with its graph here; the detached copy goes to the Ds."""
        t0 = time.perf_counter()
        self.gen.apply_hyper(self.progress.kimg)
        B = self.settings.global_batch
        z = self.noise.latent(self.gen.latent, round_idx, G_SLOT, (B, self.gen.z_dim), self.rank, self.world)
        self._fake = self.gen.forward_with_graph(z, self._labels(round_idx, G_LABEL_SLOT))
        out = self._fake.detach().cpu()
        self.timer.compute += time.perf_counter() - t0
        return out

    def apply_feedback(self, *losses_and_grads: torch.Tensor) -> dict[str, Any]:
        """Combine the K discriminators' feedback, backpropagate it, all-reduce, step (the G
        phase), then the G_ema phase; returns the round's G statistics and times.

        `losses_and_grads` holds the K G-losses, then the K gradients dL_i/dx of this worker's
        rows. The losses are means over the global batch, so each worker's backward gives only
        its rows' share of the full-batch gradient; scaling by M makes the average all-reduce
        equal the full-batch gradient.
        """
        if self._fake is None:
            raise RuntimeError("apply_feedback called before forward in this round")
        t0 = time.perf_counter()
        k = len(losses_and_grads) // 2
        losses = torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()) for x in losses_and_grads[:k]])
        grads = losses_and_grads[k:]
        w = feedback_weights(losses, self.feedback_mode, self.softmax_lambda)
        grad = sum(float(w[i]) * grads[i] for i in range(k)) * float(self.world)
        self._fake.backward(grad.to(self._fake.device))
        self._fake = None
        if self.world > 1:
            tc = time.perf_counter()
            assert self.group is not None
            self.group.all_reduce_mean([p.grad for p in self.gen.params])
            self.timer.comm += time.perf_counter() - tc
        stats = RoundStats()
        stats.report(LOSS_G, (w * losses).sum())
        # Each critic's loss and the weight it got, so a run shows what the feedback mode did.
        names = self._critics or list(range(k))
        for i in range(k):
            stats.report(feedback_loss_name(names[i]), losses[i])
            stats.report(feedback_weight_name(names[i]), w[i])
        self.gen.apply(stats)
        self.gen.update_ema()
        self.progress.end_round(table_of(self.settings), self.settings.global_batch)
        self.timer.compute += time.perf_counter() - t0 - self.timer.comm
        compute, comm = self.timer.take()
        return {"stats": _round_record(stats), "compute_s": compute, "comm_s": comm}

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"G": cpu_tree(self.gen.G.state_dict()), "G_ema": cpu_tree(self.gen.G_ema.state_dict()),
                "opt_G": cpu_tree(self.gen.opt.state_dict())}

    def load_state(self, state: dict[str, Any], progress: dict[str, int], keep_hyper: bool = True) -> None:
        self.gen.G.load_state_dict(state["G"])
        self.gen.G_ema.load_state_dict(state["G_ema"])
        self.gen.opt.load_state_dict(state["opt_G"])
        self.progress.load(progress)
        self._fake = None
        self.gen.opt.zero_grad(set_to_none=True)  # a round cut short by a lost peer leaves its gradients
        if keep_hyper:
            self.apply_hyper()


@ray.remote
class DiscriminatorWorker(WorkerBase):
    """Discriminator worker i of K: its own D, opt_D, data and shard (B/K real samples per step).

    The K discriminators are independent critics, not peers of one model: none joins a group
    (no all-reduce)."""

    def __init__(self, config: dict[str, Any], index: int, count: int, swap_every_epochs: int = 0) -> None:
        super().__init__(config, 0, 1)
        self.index, self.count = int(index), int(count)
        self.swap_every_epochs = int(swap_every_epochs)

    def setup(self) -> dict[str, Any]:
        """Load the data, build D; returns `info()`. Errors raised here (a bad data path, say)
        reach the driver with their type, unlike errors raised in `__init__`."""
        config = self.config
        self.settings = StepSettings.from_config(config)
        seed = self.settings.seed
        self.source = load_dataset(config["data"], seed, "train")
        self.shape = tuple(self.source.sample_shape)
        # seed_offset = index: D_0 starts exactly like local's D; the others are independent critics.
        self.disc = DiscriminatorRole(config, self.shape, self.settings, seed_offset=self.index, d_index=self.index)
        batches = RealBatches(self.source, self.settings.device, class_labels(config, self.source))
        self.reals = RotatingShard(batches, self.settings.global_batch, seed, self.index, self.count,
                                   self.swap_every_epochs)
        self.num_classes = self.disc.num_classes
        self.noise = NoiseStreams(seed, self.settings.device)
        self.progress = Progress()
        # Round index, instance-noise std and (noisy) reals of the last D phase: the feedback call
        # of a round always follows its D phases on this actor (one caller, calls run in
        # submission order).
        self._noise_round, self._noise_std = 0, 0.0
        self._last_real: Optional[torch.Tensor] = None
        self._last_labels: Optional[torch.Tensor] = None  # their classes (conditional)
        self.timer = _Timed()
        return self.info()

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.disc.D,)

    def apply_hyper(self) -> None:
        self.disc.apply_hyper(self.progress.kimg)

    def info(self) -> dict[str, Any]:
        return {"sample_shape": self.shape, "fingerprint": self.source.fingerprint,
                "device": str(self.settings.device), "threads": torch.get_num_threads()}

    def _my_rows(self, first_part: int, parts: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
        """Slice i of K of the global batch from the overlapping generator parts (concatenated)."""
        whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        part_rows = parts[0].shape[dim]
        start, stop = rows_of(self.index, self.count, self.settings.global_batch)
        offset = first_part * part_rows
        return whole.narrow(dim, start - offset, stop - start)

    def d_phase(self, round_idx: int, first_part: int, *fake_parts: torch.Tensor) -> dict[str, Any]:
        """The round's D phases on this D's real batches and its slice of the fake batches."""
        t0 = time.perf_counter()
        s = self.settings
        table = table_of(s)
        kimg = self.progress.kimg
        self.disc.apply_hyper(kimg)
        std = s.noise_std(kimg)
        self._noise_round, self._noise_std = round_idx, std
        fakes = self._my_rows(first_part, fake_parts, dim=1).to(s.device, non_blocking=True)
        if fakes.shape[0] != len(table.d_steps):
            raise RuntimeError(f"{fakes.shape[0]} fake batches for {len(table.d_steps)} D phases in round {round_idx}")
        B, i, K = s.global_batch, self.index, self.count
        stats = RoundStats()
        for phase in table.d_steps:
            k = phase.step
            real, labels = self.reals.next()
            real, fake = self.noise.noisy_d_inputs(real, fakes[k], std, round_idx, k, B, i, K)
            # The classes G drew for the fake rows this D scores: the same streams, sliced alike.
            fake_labels = self.noise.labels(round_idx, LABEL_SLOT + k, B, self.num_classes, i, K)
            alpha = self.noise.uniform(round_idx, ALPHA_SLOT + k, B, i, K) if s.loss_kind == "wgan-gp" else None
            # Augmentation parameters: this D's slice of the rows `local` draws (None when off).
            draws = [self.noise.uniform_rows(round_idx, slot + k, B, DRAWS, i, K) if phase.augment else None
                     for slot in (AUGMENT_REAL_SLOT, AUGMENT_FAKE_SLOT)]
            # The reals as D saw them (augmented): the G phase pairs with them.
            self._last_real = self.disc.d_step(phase, real, fake, alpha, self.progress.d_steps, stats, *draws,
                                               labels, fake_labels)
            self._last_labels = labels
            self.progress.d_steps += 1
        self.progress.end_round(table, B)
        record = _round_record(stats)
        self.timer.compute += time.perf_counter() - t0
        # Includes the previous round's feedback call (which returns only tensors).
        compute, _ = self.timer.take()
        return {"stats": record, "compute_s": compute}

    def feedback(self, *fake_parts: torch.Tensor) -> tuple[Any, ...]:
        """(L_i, dL_i/dx of part 0, ..., of part M-1) for the whole G-phase batch.

        Returned as separate objects (the caller sets num_returns = M + 1), so generator j
        fetches only its own rows' gradient.
        """
        t0 = time.perf_counter()
        whole = torch.cat(fake_parts, dim=0) if len(fake_parts) > 1 else fake_parts[0]
        whole = whole.to(self.settings.device, non_blocking=True)
        # Additive noise leaves dL/dx unchanged in form: the gradient at x + n is G's feedback for x.
        whole = self.noise.add_noise(whole, self._noise_std, self._noise_round, G_NOISE_SLOT, whole.shape[0], 0, 1)
        draws = (self.noise.uniform_rows(self._noise_round, AUGMENT_G_SLOT, whole.shape[0], DRAWS, 0, 1)
                 if table_of(self.settings).g_step.augment else None)
        fake_labels = self.noise.labels(self._noise_round, G_LABEL_SLOT, whole.shape[0], self.num_classes, 0, 1)
        loss, grad = self.disc.feedback(whole, self._last_real, draws, fake_labels, self._last_labels)
        grad = grad.cpu()
        sizes = [p.shape[0] for p in fake_parts]
        out = (loss.cpu(), *torch.split(grad, sizes, dim=0))
        self.timer.compute += time.perf_counter() - t0
        return out

    # -- state -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """This discriminator's key in the job state's D, opt_D and sampler parts."""
        return f"d{self.index}"

    def state(self) -> dict[str, Any]:
        """D, opt_D, the sampler (and its own p when augmentation is on) under this worker's own
        name, and its D step count."""
        state = {"D": {self.name: cpu_tree(self.disc.D.state_dict())},
                 "opt_D": {self.name: cpu_tree(self.disc.opt.state_dict())},
                 "sampler": {self.name: self.reals.sampler.state_dict()}, "d_steps": self.progress.d_steps}
        augment = self.disc.augment_state()
        if augment is not None:
            state["augment"] = {self.name: augment}
        return state

    def load_state(self, state: dict[str, Any], progress: dict[str, int], keep_hyper: bool = True) -> None:
        """Restore from job-state parts holding this worker's name; `progress` is the job's."""
        self.disc.D.load_state_dict(state["D"][self.name])
        self.disc.opt.load_state_dict(state["opt_D"][self.name])
        self.reals.sampler.load_state_dict(state["sampler"][self.name])
        self.disc.load_augment_state(state.get("augment", {}).get(self.name))
        self.progress.load(progress)
        self._last_real = self._last_labels = None
        self.disc.opt.zero_grad(set_to_none=True)  # a round cut short by a lost peer leaves its gradients
        if keep_hyper:
            self.apply_hyper()
