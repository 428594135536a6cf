"""The engine interface the training loop drives, and the in-process `local` engine.

An engine owns the networks (in this process or in Ray actors) and runs rounds in chunks; the
loop in `trainer.py` decides chunk sizes, logging, evaluation and checkpoints. `LocalEngine` is
the numerical reference: it runs the very `ReplicaStepper` that every `ReplicaWorker` runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ganray.models.registry import build_sampling_module
from ganray.workers.stepper import build_replica


@dataclass
class ChunkResult:
    """What one engine call returns: per-round metrics (already averaged over workers)."""

    rounds: int
    images_seen: int
    round_index: int
    metrics: dict[str, list[float]] = field(default_factory=dict)
    time_compute_s: float = 0.0
    time_comm_s: float = 0.0
    time_wait_s: float = 0.0
    nonfinite_run: int = 0
    # Logical bytes one replica sent in the chunk's gradient all-reduces (the largest over the
    # replicas; they are equal): docs/scaling.md gives it per round as a formula. 0 for `local`
    # and for `split`, whose object-store payload docs/scaling.md derives instead.
    comm_bytes: int = 0


class Engine(Protocol):
    sample_shape: tuple[int, ...]
    data_fingerprint: str
    allreduce: str  # how gradient all-reduces travel, in words (`Collective.path`)

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> ChunkResult: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None: ...

    def generator_state(self) -> dict[str, torch.Tensor]: ...

    def set_hyper(self, hyper: dict[str, Any]) -> None: ...

    def scale_lr(self, factor: float) -> None: ...

    @property
    def actors(self) -> list[Any]:
        """The worker actor handles (empty for an engine without actors)."""

    def snapshot(self) -> Any:
        """A handle to the current job state that outlives the loss of any worker."""

    def read_snapshot(self, handle: Any) -> dict[str, Any]:
        """The state behind a `snapshot()` handle; `fault.SnapshotLostError` when it is gone."""

    def restart_workers(self, wait_s: float) -> None:
        """Recreate every worker (waiting up to `wait_s` for capacity); the caller restores the state."""

    @property
    def worker_count(self) -> int:
        """Worker actors of the job now (0 without actors; fewer than the layout's after a shrink)."""

    def shrink(self) -> Optional[Any]:
        """After a worker loss, go on with the survivors when the layout is elastic and enough
        survive (`elastic.Resize`); None when the caller must recreate every worker instead."""

    def grow(self) -> Optional[Any]:
        """Between chunks: let workers rejoin where capacity came back (`elastic.Resize`), or None."""

    def node_metrics(self) -> dict[str, float]:
        """`system/<node>/<name>` figures of every node that hosts a worker (MLflow's names for
        several nodes); `{}` without workers. Asked at metric sync points, never per round."""

    def close(self) -> None: ...


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors/ints only (a checkpoint part loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "python": torch.tensor(py_state[1], dtype=torch.int64), "python_version": int(py_state[0])}


def restore_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()), None))


class LocalEngine:
    """`topology.kind: local`: one process, no Ray; the oracle for the Ray topologies."""

    def __init__(self, config: Any) -> None:
        torch.set_num_threads(config.resources.threads_per_worker)
        self.stepper = build_replica(config.model_dump())
        self.sample_shape = tuple(self.stepper.source.sample_shape)
        self.data_fingerprint = self.stepper.source.fingerprint
        self.allreduce = "none (one process)"

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> ChunkResult:
        out = self.stepper.run_rounds(n_rounds, stop_at_images)
        return ChunkResult(rounds=out["rounds"], images_seen=out["images_seen"],
                           round_index=out["round_index"], metrics=out["metrics"],
                           time_compute_s=out["time_compute_s"], time_comm_s=out["time_comm_s"],
                           nonfinite_run=out["nonfinite_run"])

    def state(self) -> dict[str, Any]:
        return {**self.stepper.state(), "rng": rng_state()}

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        self.stepper.load_state(state, keep_hyper=keep_hyper)
        restore_rng_state(state.get("rng", {}))

    def generator_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.stepper.sampling_module().state_dict().items()}

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        self.stepper.set_hyper(hyper)

    def scale_lr(self, factor: float) -> None:
        self.stepper.scale_lr(factor)

    @property
    def actors(self) -> list[Any]:
        return []  # everything runs in this process

    def snapshot(self) -> dict[str, Any]:
        return self.state()  # already copies, kept in this process

    def read_snapshot(self, handle: dict[str, Any]) -> dict[str, Any]:
        return handle

    def restart_workers(self, wait_s: float) -> None:
        # Nothing here can be lost without this process: a "loss" is a bug, re-raised as one.
        raise RuntimeError("the local engine has no workers to recreate")

    @property
    def worker_count(self) -> int:
        return 0

    def shrink(self) -> None:
        return None  # nothing to shrink onto: the loop runs in this process

    def grow(self) -> None:
        return None

    def node_metrics(self) -> dict[str, float]:
        # The one machine that trains is the coordinator's, whose un-prefixed `system/<name>`
        # figures the trainer logs: MLflow names a single node's metrics without a node id.
        return {}

    def close(self) -> None:
        pass


def build_eval_generator(config: Any, sample_shape: tuple[int, ...], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU generator (the learner's z -> x sampling module: G_ema for the GAN) rebuilt from the
    config and a (digest-checked) state dict of it."""
    G = build_sampling_module(config.model.model_dump(), tuple(sample_shape))
    try:
        G.load_state_dict(state)
    except RuntimeError as err:
        from ganray.models.errors import CheckpointError

        what = (f"model.generator '{config.model.generator}'" if config.model.learner == "gan"
                else f"the '{config.model.learner}' learner's sampling module")
        raise CheckpointError(f"generator state does not fit {what} "
                              f"with this config ({str(err).splitlines()[0]}); use the config the run was trained with") from None
    return G.eval()


def make_engine(config: Any) -> Engine:
    """The engine for `topology.kind`; the Ray coordinator is imported only when needed."""
    if config.topology.kind == "local":
        return LocalEngine(config)
    from ganray.orchestrator.job.coordinator import RayEngine

    return RayEngine(config)
