"""The `replicated` topology on Ray: N `ReplicaWorker`s, one Ray call per chunk.

The driver calls `run_rounds(n)` on every replica at once; the replicas synchronise among
themselves (one gradient all-reduce per phase), so there is one Ray call per chunk, not per step.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import ray

from ganray.orchestrator.job.engine import ChunkResult
from ganray.orchestrator.job.layout import REPLICA, Layout
from ganray.orchestrator.job.placement import Placement
from ganray.orchestrator.job.ray_calls import START_LIMIT, check_same, form_group, get, get_chunk, kill, mean
from ganray.workers.stats import merge_chunks, merge_replicas


class ReplicatedJob:
    """N `ReplicaWorker`s, one Ray call per chunk.

    `bundles` (default: every replica's) are the placement bundles the job's replicas occupy,
    rank r in the r-th smallest: an elastic job that shrank or grew is a new `ReplicatedJob` over
    the bundles it has now. `reuse` maps bundles to live workers that carry over (survivors,
    newcomers already set up): they are rebound to their new rank and world instead of created."""

    def __init__(self, cfg: dict[str, Any], layout: Layout, placement: Placement, timeout_s: float,
                 start_timeout_s: float, bundles: Optional[Sequence[int]] = None,
                 reuse: Optional[dict[int, Any]] = None) -> None:
        from ganray.workers.replica import ReplicaWorker

        self.timeout_s = timeout_s
        specs = layout.of_role(REPLICA)
        self.bundles = sorted(bundles) if bundles is not None else [s.index for s in specs]
        reuse = reuse or {}
        n = len(self.bundles)
        self.workers = [reuse[b] if b in reuse else
                        ReplicaWorker.options(**placement.actor_options(b)).remote(cfg, rank, n)
                        for rank, b in enumerate(self.bundles)]
        try:
            calls = [w.rebind.remote(rank, n) if b in reuse else w.setup.remote()
                     for rank, (b, w) in enumerate(zip(self.bundles, self.workers))]
            info = get(calls, start_timeout_s, "starting the replicas", START_LIMIT)
            self.sample_shape = tuple(info[0]["sample_shape"])
            self.fingerprint = info[0]["fingerprint"]
            self.allreduce = "none (one replica)"
            if n > 1:
                checksums, self.allreduce = form_group(self.workers, specs[0].gpus, timeout_s,
                                                        "replica", layout.collective)
                check_same(checksums, "replica")
        except BaseException:
            kill(self.workers)
            raise

    @property
    def actors(self) -> list[Any]:
        return self.workers

    def run(self, n_rounds: int, stop_at_images: Optional[int]) -> ChunkResult:
        t0 = time.perf_counter()
        outs = get_chunk([w.run_rounds.remote(n_rounds, stop_at_images) for w in self.workers], self.timeout_s,
                         f"a chunk of {n_rounds} rounds")
        wall = time.perf_counter() - t0
        first = outs[0]
        # Per round, the mean over replicas: with averaged gradients, the global-batch value.
        metrics = merge_chunks([o["metrics"] for o in outs], merge_replicas)
        compute = mean([o["time_compute_s"] for o in outs])
        comm = mean([o["time_comm_s"] for o in outs])
        return ChunkResult(rounds=first["rounds"], images_seen=first["images_seen"],
                           round_index=first["round_index"], metrics=metrics, time_compute_s=compute,
                           time_comm_s=comm, time_wait_s=max(0.0, wall - compute - comm),
                           nonfinite_run=max(o["nonfinite_run"] for o in outs),
                           comm_bytes=max(int(o.get("comm_bytes", 0)) for o in outs))

    def state(self) -> dict[str, Any]:
        check_same(get([w.param_checksum.remote() for w in self.workers], self.timeout_s, "checksums"), "replica")
        full = get(self.workers[0].state.remote(True), self.timeout_s, "the replica state")
        others = get([w.state.remote(False) for w in self.workers[1:]], self.timeout_s, "sampler states")
        # Each replica names its own sampler ("rank{r}"); the driver only merges them.
        for other in others:
            full["sampler"].update(other["sampler"])
        return full

    def load_state(self, state: dict[str, Any], keep_hyper: bool) -> None:
        ref = ray.put(state)
        get([w.load_state.remote(ref, keep_hyper) for w in self.workers], self.timeout_s, "loading state")

    def generator_state(self) -> dict[str, Any]:
        return get(self.workers[0].generator_state.remote(), self.timeout_s, "the generator state")

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        get([w.set_hyper.remote(hyper) for w in self.workers], self.timeout_s, "set_hyper")

    def scale_lr(self, factor: float) -> None:
        get([w.scale_lr.remote(factor) for w in self.workers], self.timeout_s, "scale_lr")
