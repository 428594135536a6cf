"""The Ray coordinator: `RayEngine` runs the `replicated` and `split` topologies.

It implements the same `Engine` interface as `LocalEngine` (see engine.py), so the training loop,
Tune trials and retraining drive every topology alike. It joins (or starts) Ray, reserves the
workers' placement group, creates the job (`replicated_job.ReplicatedJob` or
`split_job.SplitJob`), runs rounds in chunks and assembles the job state at checkpoints.

Worker loss: a call that fails because a worker died (its process killed, its node lost) or hung
(no answer within `resources.step_timeout_s`) is raised as `fault.WorkerLostError`, after a
liveness probe of every worker tells a lost worker from a bug. `restart_workers` then kills
what is left of the job, reserves the placement group again (waiting for capacity up to the
given limit) and creates, sets up and groups a fresh set of workers; the training loop restores
them from its snapshot (see `fault.py` and `trainer.py`).

Time split per chunk: compute = workers' busy time (mean over workers; in split, G's plus D's
along the round), comm = gradient all-reduce time, wait = the rest of the wall time (Ray calls,
object transfers, stragglers).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray

from ganray.models.errors import ConfigError, DataError, GanrayError
from ganray.orchestrator.job.elastic import Newcomers, Resize, leave_groups, node_of, placed_bundles
from ganray.orchestrator.job.engine import ChunkResult, restore_rng_state, rng_state
from ganray.orchestrator.job.fault import SnapshotLostError, WorkerLostError, is_worker_loss
from ganray.orchestrator.job.node_metrics import NodeMetrics
from ganray.orchestrator.job.placement import Placement, connect
from ganray.orchestrator.job.layout import DISCRIMINATOR, GENERATOR
from ganray.orchestrator.job.ray_calls import get, kill, lost_workers
from ganray.orchestrator.job.replicated_job import ReplicatedJob
from ganray.orchestrator.job.split_job import SplitJob

log = logging.getLogger("ganray")


class RayEngine:
    """`topology.kind: replicated | split` on Ray, with `LocalEngine`'s interface."""

    def __init__(self, config: Any) -> None:
        layout, res = config.layout, config.resources
        if layout.kind not in ("replicated", "split"):
            raise ConfigError(f"RayEngine runs topology.kind 'replicated' or 'split', not '{layout.kind}'")
        self.config = config
        self.layout = layout
        self.restarts = 0
        self._job_cls = SplitJob if layout.kind == "split" else ReplicatedJob
        self._cfg = config.model_dump()
        self._closed = False
        self._job: Any = None
        self._placement: Optional[Placement] = None
        self._node_metrics = NodeMetrics()
        self._newcomers = Newcomers()
        self._ray = connect(res)
        try:
            self._placement = Placement(layout, res.placement_timeout_s, fixed_capacity=self._ray.fixed)
            self._job = self._job_cls(self._cfg, layout, self._placement, res.step_timeout_s,
                                      max(res.step_timeout_s, res.placement_timeout_s))
        except BaseException:
            self.close()
            raise
        self.sample_shape: tuple[int, ...] = self._job.sample_shape
        self.data_fingerprint: str = self._job.fingerprint
        specs = self.layout.workers
        log.info("workers: %s", ", ".join(f"{specs[b].role} {specs[b].rank} on node {node[:12]}"
                                           for b, node in zip(self._bundles(), node_of(self._job.actors))))

    @property
    def allreduce(self) -> str:
        """How the current workers' gradient all-reduces travel (an MLflow tag of the run)."""
        return self._job.allreduce if self._job is not None else "none (closed)"

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a job call; a failure caused by a dead or hung worker becomes `WorkerLostError`."""
        try:
            return fn(*args)
        except GanrayError:
            raise
        except Exception as err:
            if self._job is None:
                raise
            probe_s = min(10.0, self.config.resources.step_timeout_s)
            lost = lost_workers(self._job.actors, probe_s)
            if not lost and not is_worker_loss(err):
                raise  # every worker is alive: a real error, not a fault to recover from
            specs, bundles = self.layout.workers, self._bundles()
            who = ", ".join(f"{specs[bundles[i]].role} {specs[bundles[i]].rank} ({why})"
                            for i, why in sorted(lost.items())) or "a worker"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise WorkerLostError(f"{what}: lost {who}: {type(err).__name__}: {first}") from err

    def _bundles(self) -> list[int]:
        """The placement bundle of each current worker, in `actors` order."""
        return list(self._job.bundles)

    @property
    def worker_count(self) -> int:
        """Workers of the job now (fewer than the layout's after an elastic shrink)."""
        return len(self._job.actors) if self._job is not None else 0

    def _elastic(self) -> Optional[str]:
        """The elastic role (replicas, or split's discriminators), when the job may shrink and
        grow: that needs the job's own placement group (a Tune trial's is Tune's)."""
        if self._job is None or self._placement is None or not self._placement.owned:
            return None
        return self.layout.elastic_role

    def shrink(self) -> Optional[Resize]:
        """After a worker loss: go on with the survivors, in their own bundles, when at least the
        elastic minimum of them is left (`topology.min_workers`, `min_discriminators`); None
        otherwise (not elastic, too few left, nobody lost, a generator lost), and the caller
        recreates every worker as before. The caller restores the state."""
        role = self._elastic()
        if role is None:
            return None
        t0 = time.perf_counter()
        old = self._job
        before = len(old.actors)
        lost = lost_workers(old.actors, min(10.0, self.config.resources.step_timeout_s))
        if not lost:
            return None
        if role == DISCRIMINATOR:
            if any(pos < old.m for pos in lost) or len(old.discs) - len(lost) < self.layout.min_elastic:
                return None
            old.drop_discriminators(sorted(lost))
            self._newcomers.discard()
            return Resize("shrink", before, len(old.actors), time.perf_counter() - t0, node_of(old.actors))
        kill([a for i, a in enumerate(old.actors) if i in lost])
        survivors = leave_groups({b: a for i, (b, a) in enumerate(zip(old.bundles, old.actors)) if i not in lost})
        if len(survivors) < self.layout.min_elastic:
            return None
        self._newcomers.discard()
        self._job = None
        self._job = self._regroup(survivors)
        return Resize("shrink", before, len(survivors), time.perf_counter() - t0, node_of(self._job.actors))

    def grow(self) -> Optional[Resize]:
        """At a round boundary, between chunks: start workers in bundles Ray has placed on live
        nodes again (returns at once), and once they are set up, let them join. None when
        nothing joined."""
        role = self._elastic()
        if role is None or len(self._job.actors) >= len(self.layout.workers):
            return None
        if not self._newcomers.pending:
            if self._newcomers.poll_due():
                have = set(self._job.bundles)
                free = sorted(b for b in placed_bundles(self._placement.group) if b not in have)
                if free:
                    self._newcomers.start(free, self._new_worker)
            return None
        joining = self._newcomers.take_ready()
        if not joining:
            return None
        t0 = time.perf_counter()
        before = len(self._job.actors)
        if role == DISCRIMINATOR:
            first = self.layout.count(GENERATOR)
            self._guard("rejoining discriminators", self._job.add_discriminators,
                        {b - first: actor for b, actor in joining.items()})
        else:
            self._grow_replicas(joining)
        grown = Resize("grow", before, len(self._job.actors), time.perf_counter() - t0, node_of(self._job.actors))
        log.warning("%s", grown.line())  # the trainer's tag `ganray.fault.last_event` says at which kimg
        return grown

    def _grow_replicas(self, joining: dict[int, Any]) -> None:
        """The job's current state and hyperparameters go to every replica of the grown world."""
        old = self._job
        try:
            state, hyper = old.state(), get(old.actors[0].hyper.remote(), old.timeout_s, "the hyperparameters")
            survivors = leave_groups(dict(zip(old.bundles, old.actors)))
        except Exception:
            kill(list(joining.values()))
            raise
        self._job = None
        try:
            self._job = self._regroup({**survivors, **joining})
            self._job.set_hyper(hyper)
            self._job.load_state(state, keep_hyper=True)
        except Exception as err:
            raise WorkerLostError(f"growing the job from {len(old.actors)} workers failed: {type(err).__name__}: "
                                  f"{str(err).strip()[:200]}") from err

    def _new_worker(self, bundle: int) -> Any:
        """A worker for `bundle`, started outside the loop (its `setup` call follows)."""
        assert self._placement is not None
        options = self._placement.actor_options(bundle)
        spec = self.layout.workers[bundle]
        if spec.role == DISCRIMINATOR:
            from ganray.workers.split import DiscriminatorWorker

            assert self.layout.split is not None
            return DiscriminatorWorker.options(**options).remote(self._cfg, spec.rank, self.layout.count(DISCRIMINATOR),
                                                                 self.layout.split.swap_every_epochs)
        from ganray.workers.replica import ReplicaWorker

        # Rank 0 of 1 until it joins: `rebind` gives it its rank in the world it joins.
        return ReplicaWorker.options(**options).remote(self._cfg, 0, 1)

    def _regroup(self, workers: dict[int, Any]) -> Any:
        """A job over exactly `workers` (bundle -> live worker), rebound to ranks by bundle order."""
        res = self.config.resources
        assert self._placement is not None
        job = self._job_cls(self._cfg, self.layout, self._placement, res.step_timeout_s,
                            max(res.step_timeout_s, res.placement_timeout_s), bundles=sorted(workers), reuse=workers)
        if job.fingerprint != self.data_fingerprint:
            kill(job.actors)
            raise DataError(f"the training data changed while the job ran (fingerprint {job.fingerprint[:12]}, "
                            f"was {self.data_fingerprint[:12]}); restore the data and resume the run")
        return job

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> ChunkResult:
        return self._guard(f"a chunk of {n_rounds} rounds", self._job.run, n_rounds, stop_at_images)

    def state(self) -> dict[str, Any]:
        """The job state in `LocalEngine`'s parts; checks the replicas agree before anything is saved."""
        return {**self._guard("gathering the state", self._job.state), "rng": rng_state()}

    def load_state(self, state: dict[str, Any], keep_hyper: bool = True) -> None:
        self._guard("loading the state", self._job.load_state, state, keep_hyper)
        restore_rng_state(state.get("rng", {}))

    def generator_state(self) -> dict[str, Any]:
        return self._guard("fetching the generator", self._job.generator_state)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        self._guard("set_hyper", self._job.set_hyper, hyper)

    def scale_lr(self, factor: float) -> None:
        self._guard("scale_lr", self._job.scale_lr, factor)

    def restart_workers(self, wait_s: float) -> None:
        """Replace every worker: kill what is left, reserve the bundles again (waiting up to
        `wait_s` for capacity, e.g. a replacement node), create, set up and group fresh workers.

        Survivors are replaced too: their collective group is broken and their state is about
        to be overwritten from the snapshot anyway. The caller restores the state."""
        res = self.config.resources
        old, self._job = self._job, None
        self._newcomers.discard()
        if old is not None:
            kill(old.actors)  # no leave_group: a peer is dead, a survivor may be stuck in a collective
        if self._placement is not None:
            self._placement.release()  # a Tune trial's own group is kept (release skips groups we do not own)
        self._placement = None
        self._placement = Placement(self.layout, wait_s, fixed_capacity=self._ray.fixed,
                                    timeout_key="fault.capacity_wait_s")
        self._job = self._job_cls(self._cfg, self.layout, self._placement, res.step_timeout_s,
                                  max(res.step_timeout_s, res.placement_timeout_s, wait_s))
        self.restarts += 1
        if self._job.fingerprint != self.data_fingerprint:
            raise DataError(f"the training data changed while the job ran (fingerprint {self._job.fingerprint[:12]}, "
                            f"was {self.data_fingerprint[:12]}); restore the data and resume the run")

    @property
    def actors(self) -> list[Any]:
        """The worker actor handles (for fault handling and tests)."""
        return list(self._job.actors) if self._job is not None else []

    def node_metrics(self) -> dict[str, float]:
        """`system/<node>/<name>` of each Ray node that hosts a worker (see node_metrics.py); a
        worker that does not answer within a short wait is left out, never failing the job."""
        return self._node_metrics.sample(self.actors)

    def snapshot(self) -> Any:
        """The job state in Ray's object store, owned by the driver: it outlives any worker or worker node."""
        return ray.put(self.state())

    def read_snapshot(self, handle: Any) -> dict[str, Any]:
        try:
            return ray.get(handle, timeout=120)
        except Exception as exc:  # noqa: BLE001 - lost objects surface as several Ray errors
            raise SnapshotLostError(f"the snapshot is lost ({type(exc).__name__})") from exc

    def close(self) -> None:
        """Kill the actors and free the placement group; shut Ray down only if this engine started it."""
        if self._closed:
            return
        self._closed = True
        self._newcomers.discard()
        if self._job is not None:
            actors = self._job.actors
            # Leave the process groups cleanly when the workers answer quickly; kill regardless.
            groups = [a.leave_group.remote() for a in actors]  # every worker has one (no-op outside a group)
            if groups:
                ray.wait(groups, num_returns=len(groups), timeout=5.0)
            kill(actors)
        if self._placement is not None:
            self._placement.release()
        if self._ray.owned and ray.is_initialized():
            ray.shutdown()
