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
from torch import nn

from ganray.workers.collective import Collective, PendingMean
from ganray.workers.stepper import build_replica
from ganray.workers.worker_base import WorkerBase


# Fault tests on a real multi-node cluster only: `ROUND:FLAG` in a node's environment parks its
# replica as `hold_at_round_for_fault_test(ROUND, FLAG)` would (a job run as a subprocess cannot
# be called into; the node's workers inherit its environment).
FAULT_TEST_HOLD_ENV = "GANRAY_FAULT_TEST_HOLD_AT_ROUND"


@ray.remote
class ReplicaWorker(WorkerBase):
    """Rank `rank` of `world` replicas; created by the coordinator inside the job's placement group."""

    def setup(self) -> dict[str, Any]:
        """Load this replica's data and build its networks; returns `info()`.

        Not in `__init__`: an error raised there reaches the driver as a bare "actor died",
        while one raised in a method keeps its type, so a bad data path stays a one-line
        DataError (exit 2) instead of a Ray traceback.
        """
        # world == 1 gets no sync hook at all, so a single replica runs exactly what `local` runs.
        self.stepper = build_replica(self.config, self.rank, self.world,
                                     start_sync=self._start_all_reduce if self.world > 1 else None)
        self.settings = self.stepper.settings
        self.group = Collective(self.rank, self.world, self.settings.device)
        self._fault_test_hold: Optional[tuple[int, str]] = None  # (round, flag): `hold_at_round_for_fault_test`
        held = os.environ.get(FAULT_TEST_HOLD_ENV)
        if held and self.world > 1:  # a multi-node fault test marked this worker's node
            round_index, flag = held.split(":", 1)
            self.hold_at_round_for_fault_test(int(round_index), flag)
        return self.info()

    def modules(self) -> tuple[nn.Module, ...]:
        return self.stepper.modules()

    def generator(self) -> nn.Module:
        return self.stepper.sampling_module()

    def reduced_numel(self) -> int:
        return self.stepper.reduced_numel()

    def apply_hyper(self) -> None:
        self.stepper.apply_hyper()

    def _start_all_reduce(self, grads: list[Optional[torch.Tensor]]) -> PendingMean:
        assert self.group is not None
        if self._fault_test_hold is not None and self._fault_test_hold[0] == self.stepper.rounds:
            flag, self._fault_test_hold = self._fault_test_hold[1], None
            self.hold_for_fault_test(flag)
        return self.group.start_all_reduce_mean(grads)

    def rounds_done(self) -> int:
        return self.stepper.rounds

    def rebind(self, rank: int, world: int) -> dict[str, Any]:
        """Become rank `rank` of `world` replicas: an elastic job shrank onto the survivors or grew
        by newcomers. The old group is left first (a no-op when already left); the coordinator
        forms the new one and loads the job state next. Returns `info()`."""
        self.leave_group()
        self.rank, self.world = int(rank), int(world)
        self.stepper.rebind(self.rank, self.world, self._start_all_reduce if self.world > 1 else None)
        self.group = Collective(self.rank, self.world, self.settings.device)
        return self.info()

    def hold_at_round_for_fault_test(self, round_index: int, flag: str) -> None:
        """Fault tests only: in round `round_index` of a later chunk, park this replica in
        `hold_for_fault_test` just before its first gradient all-reduce of that round: mid-round,
        its D gradients computed and not applied, its peers waiting for them in the reduce. One
        chunk is a single Ray call, so no call can be queued inside it; this is the way in.
        (Only replicas with peers reduce; the hold is one comparison per reduce otherwise.)"""
        self._fault_test_hold = (int(round_index), flag)

    # -- training ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        source = self.stepper.source
        return {"sample_shape": tuple(source.sample_shape), "fingerprint": source.fingerprint,
                "device": str(self.settings.device), "backend": self.group.backend if self.group else "none",
                "threads": torch.get_num_threads()}

    def run_rounds(self, n_rounds: int, stop_at_images: Optional[int] = None) -> dict[str, Any]:
        sent = self.payload_bytes()
        out = self.stepper.run_rounds(n_rounds, stop_at_images)
        out["comm_bytes"] = self.payload_bytes() - sent  # this chunk's all-reduce payload (docs/scaling.md)
        return out

    def state(self, full: bool = True) -> dict[str, Any]:
        """The replica's state; with full=False only its sampler, under its own key (`rank{r}`)."""
        state = self.stepper.state()
        return state if full else {"sampler": state["sampler"]}

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        self.stepper.load_state(state, keep_hyper=keep_hyper)

    def scale_lr(self, factor: float) -> None:
        self.stepper.scale_lr(factor)
