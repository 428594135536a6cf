"""`ReplicaWorker`: one replica of the `replicated` topology, a Ray actor around `ReplicaStepper`.

Each replica holds G, D, G_ema and both optimizers, reads its own part of every global batch
(`ShardSampler` rank/world) from data it loads itself, and ends each phase with one gradient
all-reduce (average) over the torch.distributed group formed among the replicas, started as
soon as the phase's backward is done and waited for only when the step needs it. G and D are
synchronised separately, phase by phase (never one DDP wrapper around both). The coordinator
hands it many rounds per call (`run_rounds`), so the Ray call cost is spread over many steps.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import ray
import torch

from ganray.workers.collective import Collective, PendingMean, free_port, module_tensors, node_address
from ganray.workers.data import load_dataset
from ganray.workers.sharding import ShardSampler
from ganray.workers.steps import ReplicaStepper


@ray.remote
class ReplicaWorker:
    """Rank `rank` of `world` replicas; created by the coordinator inside the job's placement group."""

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        # Threads first: the data loader and the networks built in `setup` run with them.
        torch.set_num_threads(int(config["resources"]["threads_per_worker"]))
        self.config = config
        self.rank, self.world = int(rank), int(world)

    def setup(self) -> dict[str, Any]:
        """Load this replica's data and build its networks; returns `info()`.

        Not in `__init__`: an error raised there reaches the driver as a bare "actor died",
        while one raised in a method keeps its type, so a bad data path stays a one-line
        DataError (exit 2) instead of a Ray traceback.
        """
        config = self.config
        seed = int(config["seed"])
        self.source = load_dataset(config["data"], seed, "train")
        sampler = ShardSampler(len(self.source), int(config["schedule"]["batch_size"]), seed, self.rank, self.world)
        # world == 1 gets no sync hook at all, so a single replica runs exactly what `local` runs.
        self.stepper = ReplicaStepper(config, self.source, sampler, self.rank, self.world,
                                      start_sync=self._start_all_reduce if self.world > 1 else None)
        self.group = Collective(self.rank, self.world, self.stepper.settings.device)
        return self.info()

    def process_info(self) -> dict[str, Any]:
        """This worker's process id and node: a liveness probe for the coordinator (and fault tests)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    # -- group -------------------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for the group's TCP store; asked of rank 0 only."""
        return node_address(), free_port()

    def join_group(self, address: str, port: int, timeout_s: float, shared_gpu: bool = False) -> tuple[float, str]:
        """Join the replicas' group and take rank 0's parameters; returns this replica's checksum
        and how the group's all-reduces travel (`Collective.path`).

        The replicas are identical anyway (same seed), but the broadcast makes that a fact
        rather than an assumption (a custom model with unseeded init would otherwise diverge).
        """
        gen, disc = self.stepper.gen, self.stepper.disc
        largest = max(sum(p.numel() for p in gen.params), sum(p.numel() for p in disc.params))
        self.group.join(address, port, timeout_s, shared_gpu, shared_numel=largest)
        self.group.broadcast(module_tensors(gen.G, disc.D, gen.G_ema), src=0)
        return self.stepper.param_checksum(), self.group.path()

    def _start_all_reduce(self, grads: list[Optional[torch.Tensor]]) -> PendingMean:
        return self.group.start_all_reduce_mean(grads)

    def leave_group(self) -> None:
        self.group.leave()

    # -- training ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"sample_shape": tuple(self.source.sample_shape), "fingerprint": self.source.fingerprint,
                "device": str(self.stepper.settings.device), "backend": self.group.backend,
                "threads": torch.get_num_threads()}

    def run_rounds(self, n_rounds: int, stop_at_images: Optional[int] = None) -> dict[str, Any]:
        return self.stepper.run_rounds(n_rounds, stop_at_images)

    def param_checksum(self) -> float:
        return self.stepper.param_checksum()

    def state(self, full: bool = True) -> dict[str, Any]:
        """The replica's state; with full=False only its sampler position (ranks > 0 at a checkpoint)."""
        state = self.stepper.state()
        return state if full else {"sampler": state["sampler"]["rank0"]}

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        self.stepper.load_state(state, keep_hyper=keep_hyper)

    def generator_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.stepper.gen.G_ema.state_dict().items()}

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        self.stepper.set_hyper(hyper)

    def scale_lr(self, factor: float) -> None:
        self.stepper.scale_lr(factor)
