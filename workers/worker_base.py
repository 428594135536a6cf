"""`WorkerBase`: what every training actor (`ReplicaWorker`, `GeneratorWorker`,
`DiscriminatorWorker`) shares, written once.

Thread count set before anything is built, a liveness probe (`process_info`), joining and
leaving the group of peers that all-reduce one model's gradients, a validated `set_hyper`, the
parameter checksum the coordinator compares across peers, and the G_ema weights for sampling
and evaluation. A subclass builds its networks in `setup()` and says which modules it holds
(`modules`), which hold the generator (`generator`), how large its largest reduce is
(`reduced_numel`) and how its optimizers take new hyperparameters (`apply_hyper`).
For fault tests only, `hold_for_fault_test` parks a worker at a point the test chose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import ray
import torch
from torch import nn

from ganray.workers.collective import Collective, free_port, module_tensors, node_address
from ganray.workers.settings import StepSettings
from ganray.workers.system_metrics import NodeMetricsSource

# A fault test's hold that nobody ends within this long fails the call, so a test that went
# wrong never leaves a worker parked for ever.
FAULT_TEST_HOLD_LIMIT_S = 120.0


class WorkerBase(NodeMetricsSource):  # `node_metrics`: this node's system figures, for the coordinator
    """Rank `rank` of the `world` peers that step one model together (world 1: no peers)."""

    settings: StepSettings

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        # Threads first: the data loader and the networks built in `setup` run with them.
        torch.set_num_threads(int(config["resources"]["threads_per_worker"]))
        self.config = config
        self.rank, self.world = int(rank), int(world)
        self.group: Optional[Collective] = None  # made in `setup`, once the device is known

    # -- what a subclass provides ------------------------------------------------------------
    def modules(self) -> tuple[nn.Module, ...]:
        """The networks this worker holds: checksummed, and broadcast from rank 0 on joining."""
        raise NotImplementedError

    def generator(self) -> Optional[nn.Module]:
        """G_ema, when this worker holds the generator."""
        return None

    def reduced_numel(self) -> int:
        """Elements of the largest gradient all-reduce this worker runs (shared-memory slot size)."""
        return 0

    def apply_hyper(self) -> None:
        """Let the optimizers take the current `settings.hyper` (at the current kimg)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def rounds_done(self) -> int:
        """Rounds this worker has completed: the split workers count them in `self.progress`, a
        replica in its stepper (it overrides this)."""
        return int(self.progress.rounds)  # type: ignore[attr-defined]

    def process_info(self) -> dict[str, Any]:
        """This worker's process id and node: a liveness probe for the coordinator (and fault tests)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for the group's TCP store; asked of rank 0 only."""
        return node_address(), free_port()

    def join_group(self, address: str, port: int, timeout_s: float, shared_gpu: bool = False,
                   collective: str = "auto") -> tuple[float, str]:
        """Join the peers' group and take rank 0's parameters; returns this worker's checksum and
        how the group's all-reduces travel (`Collective.path`).

        The peers are identical anyway (same seed), but the broadcast makes that a fact rather
        than an assumption (a custom model with unseeded init would otherwise diverge)."""
        assert self.group is not None, "setup() builds the group before join_group"
        self.group.join(address, port, timeout_s, shared_gpu, shared_numel=self.reduced_numel(),
                        collective=collective)
        self.group.broadcast(module_tensors(*self.modules()), src=0)
        return self.param_checksum(), self.group.path()

    def payload_bytes(self) -> int:
        """Logical bytes this worker has sent in its group's all-reduces so far
        (`Collective.sent_bytes`; docs/scaling.md); 0 without peers."""
        return self.group.sent_bytes if self.group is not None else 0

    def leave_group(self) -> None:
        if self.group is not None:
            self.group.leave()

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        """Change hyperparameters (an unknown name is a ConfigError naming the valid ones)."""
        self.settings.hyper.update(hyper)
        self.apply_hyper()

    def hyper(self) -> dict[str, Any]:
        """The current hyperparameters (`set_hyper` names), for a newcomer that joins the job."""
        return dataclasses.asdict(self.settings.hyper)

    def param_checksum(self) -> float:
        """Sum of every parameter of `modules()` in float64: equal on peers that agree."""
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for m in self.modules():
                for p in m.parameters():
                    total += p.detach().double().sum().cpu()
            return float(total)

    def generator_state(self) -> dict[str, torch.Tensor]:
        """G_ema's weights on the CPU (samples, evaluation, releases)."""
        g_ema = self.generator()
        if g_ema is None:
            raise RuntimeError(f"{type(self).__name__} holds no generator")
        return {k: v.detach().cpu().clone() for k, v in g_ema.state_dict().items()}

    # -- fault tests only (training never calls this) ----------------------------------------
    def hold_for_fault_test(self, flag: str) -> None:
        """Write the file `flag` (JSON: this worker's pid, node and `rounds_done`), then wait
        while that file exists: the test kills, stops or cuts off the worker meanwhile, or
        removes the file to let it go on.

        A test that must hit a worker inside a chunk cannot time the hit: a chunk of a tiny job
        can end within any timer. Parked here, at a point the test chose (an extra call queued
        between a chunk's calls, or `ReplicaWorker.hold_at_round_for_fault_test` mid-round),
        the worker is provably inside the chunk when the hit lands. Test and worker must share
        a filesystem (one machine)."""
        info = {**self.process_info(), "rounds": self.rounds_done()}
        partial = f"{flag}.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as out:
            json.dump(info, out)
        os.replace(partial, flag)  # whole or absent: the test reads it as soon as it appears
        deadline = time.monotonic() + FAULT_TEST_HOLD_LIMIT_S
        while os.path.exists(flag):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a fault test's hold ({flag}) was not ended within {FAULT_TEST_HOLD_LIMIT_S:g} s")
            time.sleep(0.005)
