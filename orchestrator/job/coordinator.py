"""The Ray coordinator: `RayEngine` runs the `replicated` and `split` topologies.

It implements the same `Engine` interface as `LocalEngine` (see engine.py), so the training loop,
Tune trials and retraining drive every topology alike. It joins (or starts) Ray, reserves the
workers' placement group, creates the actors, runs rounds in chunks and gathers per-round
metrics, and assembles the job state from the workers at checkpoints.

- `replicated`: the driver calls `run_rounds(n)` on every replica at once; the replicas
  synchronise among themselves (one gradient all-reduce per phase), so there is one Ray call per
  chunk, not per step.
- `split`: a round needs data to move between actors (fakes G -> D, dL/dx D -> G), so the driver
  submits each round as a chain of actor calls whose ObjectRefs feed each other; it never waits
  inside a chunk except to bound how many rounds are in flight, and fetches the small metric
  dicts once per chunk. (Ray inlines objects under ~100 KiB in the caller's memory store, so tiny
  2D batches do pass the driver; image batches travel through plasma from G's node to D's.)
  With `topology.overlap` the fakes for round r+1 are made while the Ds step on round r; a
  restore drops those pre-made fakes, so the first round after `load_state` uses fresh ones.

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
import math
import time
from typing import Any, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from ganray.models.errors import CheckpointError, ConfigError, DataError, GanrayError
from ganray.orchestrator.job.engine import ChunkResult, restore_rng_state, rng_state
from ganray.orchestrator.job.fault import WorkerLostError, is_worker_loss
from ganray.orchestrator.job.placement import Placement, WorkerSpec, connect

log = logging.getLogger("ganray")

# Rounds a split job may have submitted but not finished: enough to keep every actor busy
# (G's next generation queues behind the current round), few enough to bound object-store use.
INFLIGHT_ROUNDS = 3
METRIC_KEYS = ("loss_D", "loss_G", "real_score", "fake_score", "grad_norm_D", "grad_norm_G", "skipped")


def get(refs: Any, timeout_s: float, what: str, limit: str = "resources.step_timeout_s") -> Any:
    """`ray.get` that turns a user error raised in a worker back into itself (one line, exit 2)
    and a hung worker into a TimeoutError naming the limit."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise TimeoutError(f"{what} took longer than {limit}={timeout_s:g} s; "
                           "a worker is hung or too slow (raise the limit for very large chunks)") from None
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, GanrayError):
            raise cause from None
        raise


def lost_workers(actors: list[Any], timeout_s: float) -> dict[int, str]:
    """Which of `actors` are dead or do not answer a probe within `timeout_s`: {index: why}.

    A worker stuck in a collective whose peer died cannot answer either; it is lost too (its
    group is broken and it would block until the collective's own timeout)."""
    refs = [a.process_info.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    lost: dict[int, str] = {}
    for i, ref in enumerate(refs):
        if ref not in done:
            lost[i] = f"no answer within {timeout_s:g} s"
            continue
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001 - dead actors raise several Ray error types
            lost[i] = type(err).__name__
    return lost


def check_split_batch(batch: int, generators: int, discriminators: int) -> None:
    """The global batch must divide among the M generators and the K discriminators."""
    for count, role in ((generators, "topology.num_generators"), (discriminators, "topology.num_discriminators")):
        if batch % count:
            raise ConfigError(f"schedule.batch_size {batch} does not divide among {role}={count} workers; "
                              f"use a multiple of {count}")


# Starting a worker (a process, a torch import, its data) is not a step: it may take as long as
# placing it (or, when recovering, as long as the wait for capacity).
_START_LIMIT = "max(resources.step_timeout_s, resources.placement_timeout_s)"


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _kill(actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as err:  # already dead, or the cluster is gone
            log.debug("killing an actor failed: %s", err)


def _form_group(actors: list[Any], gpus_each: float, timeout_s: float, role: str) -> tuple[list[float], str]:
    """Form the torch.distributed group among `actors` (rank = position); returns their checksums
    and how the group's all-reduces travel (`Collective.path`).

    Workers with a fraction of a GPU may share a device, which NCCL refuses: they use gloo. Logs
    how the all-reduces travel: shared memory, gloo or nccl make a large difference in speed,
    and a user tuning a job should not have to guess which one a group got."""
    address, port = get(actors[0].rendezvous.remote(), timeout_s, "group rendezvous")
    shared_gpu = 0 < gpus_each < 1
    joined = get([a.join_group.remote(address, port, timeout_s, shared_gpu) for a in actors], timeout_s,
                 "joining the group")
    log.info("%s gradient all-reduce: %s", role, joined[0][1])
    return [checksum for checksum, _ in joined], joined[0][1]


def _check_same(checksums: list[float], role: str) -> None:
    """Replicas apply identical averaged updates, so their parameters must agree to the bit
    (up to a float64 sum's rounding); anything else means the synchronisation broke."""
    ref = checksums[0]
    bad = [i for i, c in enumerate(checksums) if abs(c - ref) > 1e-9 * max(1.0, abs(ref))]
    if bad:
        detail = ", ".join(f"{role} {i}: {checksums[i]!r}" for i in bad)
        raise RuntimeError(f"parameter checksums differ across {role}s ({role} 0: {ref!r}; {detail}); "
                           "the replicas diverged, refusing to checkpoint")


class _ReplicatedJob:
    """N `ReplicaWorker`s, one Ray call per chunk."""

    def __init__(self, cfg: dict[str, Any], config: Any, placement: Placement, timeout_s: float,
                 start_timeout_s: float) -> None:
        from ganray.workers.replica import ReplicaWorker

        self.timeout_s = timeout_s
        n = config.topology.workers
        self.workers = [ReplicaWorker.options(**placement.actor_options(r)).remote(cfg, r, n) for r in range(n)]
        try:
            info = get([w.setup.remote() for w in self.workers], start_timeout_s, "starting the replicas",
                       _START_LIMIT)
            self.sample_shape = tuple(info[0]["sample_shape"])
            self.fingerprint = info[0]["fingerprint"]
            self.allreduce = "none (one replica)"
            if n > 1:
                checksums, self.allreduce = _form_group(self.workers, config.resources.gpus_per_worker, timeout_s,
                                                        "replica")
                _check_same(checksums, "replica")
        except BaseException:
            _kill(self.workers)
            raise

    @property
    def actors(self) -> list[Any]:
        return self.workers

    def run(self, n_rounds: int, stop_at_images: Optional[int]) -> ChunkResult:
        t0 = time.perf_counter()
        outs = get([w.run_rounds.remote(n_rounds, stop_at_images) for w in self.workers], self.timeout_s,
                   f"a chunk of {n_rounds} rounds")
        wall = time.perf_counter() - t0
        first = outs[0]
        metrics: dict[str, list[float]] = {}
        for key in first["metrics"]:
            # Per round, the mean over replicas: with averaged gradients, the global-batch value.
            per_worker = [o["metrics"][key] for o in outs]
            metrics[key] = [_mean(vals) for vals in zip(*per_worker)]
        compute = _mean([o["time_compute_s"] for o in outs])
        comm = _mean([o["time_comm_s"] for o in outs])
        return ChunkResult(rounds=first["rounds"], images_seen=first["images_seen"],
                           round_index=first["round_index"], metrics=metrics, time_compute_s=compute,
                           time_comm_s=comm, time_wait_s=max(0.0, wall - compute - comm),
                           nonfinite_run=max(o["nonfinite_run"] for o in outs))

    def state(self) -> dict[str, Any]:
        _check_same(get([w.param_checksum.remote() for w in self.workers], self.timeout_s, "checksums"), "replica")
        full = get(self.workers[0].state.remote(True), self.timeout_s, "the replica state")
        others = get([w.state.remote(False) for w in self.workers[1:]], self.timeout_s, "sampler states")
        full["sampler"] = {"rank0": full["sampler"]["rank0"],
                           **{f"rank{r}": o["sampler"] for r, o in enumerate(others, start=1)}}
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


class _SplitJob:
    """M `GeneratorWorker`s and K `DiscriminatorWorker`s; rounds as chains of ObjectRefs."""

    def __init__(self, cfg: dict[str, Any], config: Any, placement: Placement, timeout_s: float,
                 start_timeout_s: float) -> None:
        from ganray.workers.split import DiscriminatorWorker, GeneratorWorker, g_parts_for

        topo = config.topology
        self.timeout_s = timeout_s
        self.m, self.k = topo.generators, topo.discriminators
        self.batch = config.schedule.batch_size
        self.n_critic = config.schedule.n_critic
        self.hyper = {"g_lr": config.schedule.g_lr, "d_lr": config.schedule.d_lr}
        self.overlap = topo.overlapped
        # Placement order: the M generators first, then the K discriminators.
        self.discs = [DiscriminatorWorker.options(**placement.actor_options(self.m + i))
                      .remote(cfg, i, self.k, topo.swap_epochs) for i in range(self.k)]
        self.gens = [GeneratorWorker.options(**placement.actor_options(j))
                     .remote(cfg, j, self.m, topo.feedback_mode, topo.feedback_lambda) for j in range(self.m)]
        try:
            d_infos = [d.setup.remote() for d in self.discs]
            # The generators take the sample shape from D_0's data info as an ObjectRef resolved
            # on their side: all actors start in parallel and the driver waits once.
            g_sums = [g.setup.remote(d_infos[0]) for g in self.gens]
            infos = get(d_infos, start_timeout_s, "starting the discriminators", _START_LIMIT)
            get(g_sums, start_timeout_s, "starting the generators", _START_LIMIT)
            self.sample_shape = tuple(infos[0]["sample_shape"])
            self.fingerprint = infos[0]["fingerprint"]
            # Discriminators never all-reduce (each trains on its own share); generators do when M > 1.
            self.allreduce = "none (one generator)"
            if self.m > 1:
                gpus = config.resources.role("generator").gpus
                checksums, self.allreduce = _form_group(self.gens, gpus, timeout_s, "generator")
                _check_same(checksums, "generator")
        except BaseException:
            _kill(self.actors)
            raise
        self.parts = [g_parts_for(i, self.k, self.m, self.batch) for i in range(self.k)]
        self.rounds = 0
        self.images_seen = 0
        self.nonfinite_run = 0
        self._pending: Optional[list[Any]] = None  # overlap: next round's fakes, already submitted

    @property
    def actors(self) -> list[Any]:
        return [*self.gens, *self.discs]

    def _submit_round(self) -> tuple[list[Any], list[Any]]:
        r = self.rounds
        if self.overlap:
            # Staleness 1: round r's D steps use fakes made before G's step r-1 landed, and G
            # makes round r+1's fakes while the Ds are busy with round r.
            fakes = self._pending or [g.fakes.remote(r) for g in self.gens]
            self._pending = [g.fakes.remote(r + 1) for g in self.gens]
        else:
            fakes = [g.fakes.remote(r) for g in self.gens]
        d_refs = [d.d_phase.remote(r, self.parts[i][0], *[fakes[j] for j in self.parts[i]])
                  for i, d in enumerate(self.discs)]
        g_out = [g.forward.remote(r) for g in self.gens]
        feedback = [d.feedback.options(num_returns=self.m + 1).remote(*g_out) for d in self.discs]
        losses = [fb[0] for fb in feedback]
        n_images = self.n_critic * self.batch
        g_refs = [g.apply_feedback.remote(n_images, *losses, *[fb[1 + j] for fb in feedback])
                  for j, g in enumerate(self.gens)]
        self.rounds += 1
        self.images_seen += n_images
        return d_refs, g_refs

    def run(self, n_rounds: int, stop_at_images: Optional[int]) -> ChunkResult:
        per_round = self.n_critic * self.batch
        todo = n_rounds
        if stop_at_images is not None:
            todo = min(n_rounds, max(0, math.ceil((stop_at_images - self.images_seen) / per_round)))
        t0 = time.perf_counter()
        wait_s = 0.0
        rounds: list[tuple[list[Any], list[Any]]] = []
        for q in range(todo):
            if q >= INFLIGHT_ROUNDS:
                tw = time.perf_counter()
                ray.wait(rounds[q - INFLIGHT_ROUNDS][1], num_returns=self.m, timeout=self.timeout_s)
                wait_s += time.perf_counter() - tw
            rounds.append(self._submit_round())
        flat = [ref for d_refs, g_refs in rounds for ref in (*d_refs, *g_refs)]
        values = get(flat, self.timeout_s, f"a chunk of {todo} rounds")
        wall = time.perf_counter() - t0
        metrics: dict[str, list[float]] = {key: [] for key in METRIC_KEYS} if todo else {}
        g_busy = d_busy = comm = 0.0
        step = self.k + self.m
        for q in range(todo):
            d_out = values[q * step:q * step + self.k]
            g_out = values[q * step + self.k:(q + 1) * step]
            for key in ("loss_D", "real_score", "fake_score", "grad_norm_D"):
                metrics[key].append(_mean([d[key] for d in d_out]))
            metrics["loss_G"].append(g_out[0]["loss_G"])
            metrics["grad_norm_G"].append(g_out[0]["grad_norm_G"])
            skipped = sum(d["skipped_D"] for d in d_out) + max(g["skipped_G"] for g in g_out)
            metrics["skipped"].append(float(skipped))
            self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
            d_busy += _mean([d["compute_s"] for d in d_out])
            g_busy += _mean([g["compute_s"] for g in g_out])
            comm += _mean([g["comm_s"] for g in g_out])
        # G and D alternate within a round (they overlap only with topology.overlap), so busy
        # time adds up along the round; the rest of the wall time is transfer, call latency, idling.
        compute = min(g_busy + d_busy, max(0.0, wall - comm))
        return ChunkResult(rounds=todo, images_seen=self.images_seen, round_index=self.rounds, metrics=metrics,
                           time_compute_s=compute, time_comm_s=comm,
                           time_wait_s=max(wait_s, wall - compute - comm), nonfinite_run=self.nonfinite_run)

    def state(self) -> dict[str, Any]:
        if self.m > 1:
            _check_same(get([g.param_checksum.remote() for g in self.gens], self.timeout_s, "checksums"), "generator")
        g_ref = self.gens[0].state.remote()
        d_states = get([d.state.remote() for d in self.discs], self.timeout_s, "discriminator states")
        g_state = get(g_ref, self.timeout_s, "the generator state")
        names = [f"d{i}" for i in range(self.k)]
        return {**g_state,
                "D": {n: s["D"] for n, s in zip(names, d_states)},
                "opt_D": {n: s["opt_D"] for n, s in zip(names, d_states)},
                "sampler": {n: s["sampler"] for n, s in zip(names, d_states)},
                "progress": {"rounds": self.rounds, "images_seen": self.images_seen,
                             "d_steps": int(d_states[0]["d_steps"])}}

    def load_state(self, state: dict[str, Any], keep_hyper: bool) -> None:
        names = [f"d{i}" for i in range(self.k)]
        saved = sorted(state.get("D", {}).keys()) if isinstance(state.get("D"), dict) else []
        if saved != sorted(names):
            raise CheckpointError(f"the state holds discriminators {saved or 'of another topology'}, this split job has "
                                  f"{self.k} ({', '.join(names)}); resume with the run's topology")
        progress = {k: int(v) for k, v in state["progress"].items()}
        g_part = ray.put({"G": state["G"], "G_ema": state["G_ema"], "opt_G": state["opt_G"]})
        refs = [g.load_state.remote(g_part, progress, keep_hyper) for g in self.gens]
        for name, d in zip(names, self.discs):
            part = {"D": state["D"][name], "opt_D": state["opt_D"][name], "sampler": state["sampler"][name]}
            refs.append(d.load_state.remote(part, progress, keep_hyper))
        get(refs, self.timeout_s, "loading state")
        self.rounds, self.images_seen = progress["rounds"], progress["images_seen"]
        self._pending = None  # stale fakes of the replaced generator must not be used

    def generator_state(self) -> dict[str, Any]:
        return get(self.gens[0].generator_state.remote(), self.timeout_s, "the generator state")

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        get([a.set_hyper.remote(hyper) for a in self.actors], self.timeout_s, "set_hyper")
        self.hyper.update({k: v for k, v in hyper.items() if k in self.hyper})
        if "n_critic" in hyper:
            self.n_critic = int(hyper["n_critic"])
            self._pending = None  # pre-made fakes hold the old number of critic steps

    def scale_lr(self, factor: float) -> None:
        self.set_hyper({"g_lr": self.hyper["g_lr"] * factor, "d_lr": self.hyper["d_lr"] * factor})


class RayEngine:
    """`topology.kind: replicated | split` on Ray, with `LocalEngine`'s interface."""

    def __init__(self, config: Any) -> None:
        topo, res = config.topology, config.resources
        if topo.kind not in ("replicated", "split"):
            raise ConfigError(f"RayEngine runs topology.kind 'replicated' or 'split', not '{topo.kind}'")
        if topo.kind == "split":
            check_split_batch(config.schedule.batch_size, topo.generators, topo.discriminators)
            specs = ([WorkerSpec("generator", res.role("generator").cpus, res.role("generator").gpus)] * topo.generators
                     + [WorkerSpec("discriminator", res.role("discriminator").cpus, res.role("discriminator").gpus)]
                     * topo.discriminators)
        else:
            specs = [WorkerSpec("replica", res.cpus_per_worker, res.gpus_per_worker)] * topo.workers
        self.config = config
        self.restarts = 0
        self._specs = specs
        self._job_cls = _SplitJob if topo.kind == "split" else _ReplicatedJob
        self._cfg = config.model_dump()
        self._closed = False
        self._job: Any = None
        self._placement: Optional[Placement] = None
        self._owns_ray = connect(res)
        try:
            self._placement = Placement(specs, res.strategy, res.placement_timeout_s)
            self._job = self._job_cls(self._cfg, config, self._placement, res.step_timeout_s,
                                      max(res.step_timeout_s, res.placement_timeout_s))
        except BaseException:
            self.close()
            raise
        self.sample_shape: tuple[int, ...] = self._job.sample_shape
        self.data_fingerprint: str = self._job.fingerprint

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
            roles = [s.role for s in self._specs]
            who = ", ".join(f"{roles[i]} {i} ({why})" for i, why in sorted(lost.items())) or "a worker"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise WorkerLostError(f"{what}: lost {who}: {type(err).__name__}: {first}") from err

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
        if old is not None:
            _kill(old.actors)  # no leave_group: a peer is dead, a survivor may be stuck in a collective
        if self._placement is not None:
            self._placement.release()  # a Tune trial's own group is kept (release skips groups we do not own)
        self._placement = None
        self._placement = Placement(self._specs, res.strategy, wait_s)
        self._job = self._job_cls(self._cfg, self.config, self._placement, res.step_timeout_s,
                                  max(res.step_timeout_s, res.placement_timeout_s, wait_s))
        self.restarts += 1
        if self._job.fingerprint != self.data_fingerprint:
            raise DataError(f"the training data changed while the job ran (fingerprint {self._job.fingerprint[:12]}, "
                            f"was {self.data_fingerprint[:12]}); restore the data and resume the run")

    @property
    def actors(self) -> list[Any]:
        """The worker actor handles (for fault handling and tests)."""
        return list(self._job.actors) if self._job is not None else []

    def close(self) -> None:
        """Kill the actors and free the placement group; shut Ray down only if this engine started it."""
        if self._closed:
            return
        self._closed = True
        if self._job is not None:
            actors = self._job.actors
            # Leave the process groups cleanly when the workers answer quickly; kill regardless.
            groups = [a.leave_group.remote() for a in actors if hasattr(a, "leave_group")]
            if groups:
                ray.wait(groups, num_returns=len(groups), timeout=5.0)
            _kill(actors)
        if self._placement is not None:
            self._placement.release()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
