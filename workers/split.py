"""The `split` topology's actors: `GeneratorWorker` (G, G_ema, opt_G) and `DiscriminatorWorker`.

The network is cut where G's output meets D's input. Per round:

- D phase: each of the M generator workers generates its part j of the n_critic fake batches
  (`fakes`); the parts reach the K discriminator workers through the object store; D worker i
  steps on its B/K real samples and slice i of K of each fake batch (`d_phase`).
- G phase: each generator worker runs G with its graph kept (`forward`) and sends the detached
  batch; every D worker returns (L_i, dL_i/dx) for the whole batch, split into the M parts
  (`feedback`); generator worker j weighs the K gradients (mean, max, or GMAN softmax), back-
  propagates them through its kept graph, all-reduces among the generators and steps
  (`apply_feedback`).

Data and noise follow the `local` conventions exactly (sampler rank i of K, noise streams drawn
for the global batch and sliced), so 1 G + 1 D with mean feedback reproduces `local`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import ray
import torch

from ganray.workers.collective import Collective, free_port, module_tensors, node_address
from ganray.workers.data import load_dataset
from ganray.workers.sharding import RealBatches, ShardSampler
from ganray.workers.steps import (ALPHA_SLOT, G_NOISE_SLOT, G_SLOT, DiscriminatorRole, GeneratorRole, NoiseStreams,
                                  StepSettings, cpu_tree)

FEEDBACK_MODES = ("mean", "max", "softmax")


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


@ray.remote
class GeneratorWorker:
    """Generator worker j of M: G, G_ema and opt_G (all-reduced among the M when M > 1)."""

    def __init__(self, config: dict[str, Any], rank: int, world: int, feedback: str = "mean",
                 softmax_lambda: float = 1.0) -> None:
        torch.set_num_threads(int(config["resources"]["threads_per_worker"]))
        if feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback must be one of {FEEDBACK_MODES} (got {feedback!r})")
        self.config = config
        self.rank, self.world = int(rank), int(world)
        self.feedback_mode, self.softmax_lambda = feedback, float(softmax_lambda)

    def setup(self, data_info: dict[str, Any]) -> float:
        """Build G from `data_info` = `DiscriminatorWorker.setup()` (G needs the sample shape,
        not the data); returns the parameter checksum. Errors raised here (not in `__init__`)
        reach the driver with their type."""
        config = self.config
        self.settings = StepSettings.from_config(config)
        self.gen = GeneratorRole(config, tuple(data_info["sample_shape"]), self.settings)
        self.noise = NoiseStreams(self.settings.seed, self.settings.device)
        self.group = Collective(self.rank, self.world, self.settings.device)
        self.images_seen = 0
        self.rounds = 0
        self.timer = _Timed()
        self._fake: Optional[torch.Tensor] = None  # G's output with its graph, between forward and apply
        return self.param_checksum()

    def process_info(self) -> dict[str, Any]:
        """This worker's process id and node: a liveness probe for the coordinator (and fault tests)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    # -- group -------------------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        return node_address(), free_port()

    def join_group(self, address: str, port: int, timeout_s: float, shared_gpu: bool = False) -> tuple[float, str]:
        self.group.join(address, port, timeout_s, shared_gpu, shared_numel=sum(p.numel() for p in self.gen.params))
        self.group.broadcast(module_tensors(self.gen.G, self.gen.G_ema), src=0)
        return self.param_checksum(), self.group.path()

    def leave_group(self) -> None:
        self.group.leave()

    # -- the round ---------------------------------------------------------------------------
    def fakes(self, round_idx: int) -> torch.Tensor:
        """Part j of the n_critic fake batches of round `round_idx`: (n_critic, B/M, *shape)."""
        t0 = time.perf_counter()
        B = self.settings.global_batch
        zshape = (B, self.gen.z_dim)
        out = torch.stack([self.gen.generate(self.noise.latent(self.gen.latent, round_idx, k, zshape, self.rank, self.world))
                           for k in range(self.settings.hyper.n_critic)])
        out = out.cpu() if out.device.type != "cpu" else out
        self.timer.compute += time.perf_counter() - t0
        return out

    def forward(self, round_idx: int) -> torch.Tensor:
        """G's part j of the G-step batch, kept with its graph here; the detached copy goes to the Ds."""
        t0 = time.perf_counter()
        self.gen.apply_hyper(self.images_seen / 1000.0)
        B = self.settings.global_batch
        z = self.noise.latent(self.gen.latent, round_idx, G_SLOT, (B, self.gen.z_dim), self.rank, self.world)
        self._fake = self.gen.forward_with_graph(z)
        out = self._fake.detach().cpu()
        self.timer.compute += time.perf_counter() - t0
        return out

    def apply_feedback(self, n_images: int, *losses_and_grads: torch.Tensor) -> dict[str, float]:
        """Combine the K discriminators' feedback, backpropagate it, all-reduce, step, EMA.

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
        comm_before = self.timer.comm
        norm, skipped = self.gen.step(self._timed_all_reduce if self.world > 1 else None)
        self.gen.update_ema()
        self.rounds += 1
        self.images_seen += int(n_images)
        self.timer.compute += time.perf_counter() - t0 - (self.timer.comm - comm_before)
        compute, comm = self.timer.take()
        return {"loss_G": float((w * losses).sum()), "grad_norm_G": float(norm), "skipped_G": float(skipped),
                "compute_s": compute, "comm_s": comm}

    def _timed_all_reduce(self, grads: list[Optional[torch.Tensor]]) -> None:
        t = time.perf_counter()
        self.group.all_reduce_mean(grads)
        self.timer.comm += time.perf_counter() - t

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"G": cpu_tree(self.gen.G.state_dict()), "G_ema": cpu_tree(self.gen.G_ema.state_dict()),
                "opt_G": cpu_tree(self.gen.opt.state_dict())}

    def load_state(self, state: dict[str, Any], progress: dict[str, int], keep_hyper: bool = True) -> None:
        self.gen.G.load_state_dict(state["G"])
        self.gen.G_ema.load_state_dict(state["G_ema"])
        self.gen.opt.load_state_dict(state["opt_G"])
        self.images_seen, self.rounds = int(progress["images_seen"]), int(progress["rounds"])
        self._fake = None
        if keep_hyper:
            self.gen.apply_hyper(self.images_seen / 1000.0)

    def generator_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.gen.G_ema.state_dict().items()}

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        _set_hyper(self.settings, hyper)
        self.gen.apply_hyper(self.images_seen / 1000.0)

    def param_checksum(self) -> float:
        return _checksum(self.gen.G, self.gen.G_ema)


@ray.remote
class DiscriminatorWorker:
    """Discriminator worker i of K: its own D, opt_D, data and shard (B/K real samples per step)."""

    def __init__(self, config: dict[str, Any], index: int, count: int, swap_every_epochs: int = 0) -> None:
        torch.set_num_threads(int(config["resources"]["threads_per_worker"]))
        self.config = config
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
        self.disc = DiscriminatorRole(config, self.shape, self.settings, seed_offset=self.index)
        self.sampler = ShardSampler(len(self.source), self.settings.global_batch, seed, self.index, self.count)
        self.batches = RealBatches(self.source, self.settings.device)
        self.noise = NoiseStreams(seed, self.settings.device)
        self.images_seen = 0
        self.rounds = 0
        # Round index and instance-noise std of the last D phase: the feedback call of a round
        # always follows its D phase on this actor (one caller, calls run in submission order).
        self._noise_round, self._noise_std = 0, 0.0
        self.timer = _Timed()
        return self.info()

    def process_info(self) -> dict[str, Any]:
        """This worker's process id and node: a liveness probe for the coordinator (and fault tests)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def info(self) -> dict[str, Any]:
        return {"sample_shape": self.shape, "fingerprint": self.source.fingerprint,
                "device": str(self.settings.device), "threads": torch.get_num_threads()}

    def _shard(self) -> int:
        """The shard this D reads now: MD-GAN rotates D i over the shards every E epochs."""
        if self.swap_every_epochs <= 0:
            return self.index
        return (self.index + self.sampler.epoch // self.swap_every_epochs) % self.count

    def _next_real(self) -> torch.Tensor:
        shard = self._shard()
        if shard != self.sampler.rank:
            # The position is rank-independent, so a sampler for the new shard continues in place.
            moved = ShardSampler(len(self.source), self.settings.global_batch, self.settings.seed, shard, self.count)
            moved.load_state_dict(self.sampler.state_dict())
            self.sampler = moved
        return self.batches.next(self.sampler)

    def _my_rows(self, first_part: int, parts: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
        """Slice i of K of the global batch from the overlapping generator parts (concatenated)."""
        whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        part_rows = parts[0].shape[dim]
        start, stop = rows_of(self.index, self.count, self.settings.global_batch)
        offset = first_part * part_rows
        return whole.narrow(dim, start - offset, stop - start)

    def d_phase(self, round_idx: int, first_part: int, *fake_parts: torch.Tensor) -> dict[str, float]:
        """n_critic D steps on this D's real batches and its slice of the round's fake batches."""
        t0 = time.perf_counter()
        s = self.settings
        self.disc.apply_hyper(self.images_seen / 1000.0)
        std = s.noise_std(self.images_seen / 1000.0)
        self._noise_round, self._noise_std = round_idx, std
        fakes = self._my_rows(first_part, fake_parts, dim=1).to(s.device, non_blocking=True)
        n_critic = fakes.shape[0]
        B, i, K = s.global_batch, self.index, self.count
        steps = []
        for k in range(n_critic):
            real, fake = self.noise.noisy_d_inputs(self._next_real(), fakes[k], std, round_idx, k, B, i, K)
            alpha = (self.noise.uniform(round_idx, ALPHA_SLOT + k, B, i, K)
                     if s.loss_kind == "wgan-gp" else None)
            steps.append(self.disc.d_step(real, fake, alpha, None))
        self.rounds += 1
        self.images_seen += n_critic * s.global_batch
        last = steps[-1]
        self.timer.compute += time.perf_counter() - t0
        # Includes the previous round's feedback call (which returns only tensors).
        compute, _ = self.timer.take()
        return {"loss_D": float(torch.stack([m["loss_D"] for m in steps]).mean()),
                "real_score": float(last["real_score"]), "fake_score": float(last["fake_score"]),
                "grad_norm_D": float(last["grad_norm_D"]),
                "skipped_D": float(sum(float(m["skipped_D"]) for m in steps)), "compute_s": compute}

    def feedback(self, *fake_parts: torch.Tensor) -> tuple[Any, ...]:
        """(L_i, dL_i/dx of part 0, ..., of part M-1) for the whole G-step batch.

        Returned as separate objects (the caller sets num_returns = M + 1), so generator j
        fetches only its own rows' gradient.
        """
        t0 = time.perf_counter()
        whole = torch.cat(fake_parts, dim=0) if len(fake_parts) > 1 else fake_parts[0]
        whole = whole.to(self.settings.device, non_blocking=True)
        # Additive noise leaves dL/dx unchanged in form: the gradient at x + n is G's feedback for x.
        whole = self.noise.add_noise(whole, self._noise_std, self._noise_round, G_NOISE_SLOT, whole.shape[0], 0, 1)
        loss, grad = self.disc.feedback(whole)
        grad = grad.cpu()
        sizes = [p.shape[0] for p in fake_parts]
        out = (loss.cpu(), *torch.split(grad, sizes, dim=0))
        self.timer.compute += time.perf_counter() - t0
        return out

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"D": cpu_tree(self.disc.D.state_dict()),
                "opt_D": cpu_tree(self.disc.opt.state_dict()), "d_steps": self.disc.d_steps,
                "sampler": self.sampler.state_dict()}

    def load_state(self, state: dict[str, Any], progress: dict[str, int], keep_hyper: bool = True) -> None:
        self.disc.D.load_state_dict(state["D"])
        self.disc.opt.load_state_dict(state["opt_D"])
        self.disc.d_steps = int(state.get("d_steps", progress["d_steps"]))
        self.sampler.load_state_dict(state["sampler"])
        self.images_seen, self.rounds = int(progress["images_seen"]), int(progress["rounds"])
        if keep_hyper:
            self.disc.apply_hyper(self.images_seen / 1000.0)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        _set_hyper(self.settings, hyper)
        self.disc.apply_hyper(self.images_seen / 1000.0)

    def param_checksum(self) -> float:
        return _checksum(self.disc.D)


def _set_hyper(settings: StepSettings, hyper: dict[str, Any]) -> None:
    h = settings.hyper
    for key, value in hyper.items():
        if not hasattr(h, key):
            raise ValueError(f"unknown hyperparameter '{key}'; use one of g_lr, d_lr, betas, n_critic, r1_gamma")
        if key == "betas":
            value = (float(value[0]), float(value[1]))
        setattr(h, key, value)


def _checksum(*modules: torch.nn.Module) -> float:
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64)
        for m in modules:
            for p in m.parameters():
                total += p.detach().double().sum().cpu()
        return float(total)
