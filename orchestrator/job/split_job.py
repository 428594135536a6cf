"""The `split` topology on Ray: M `GeneratorWorker`s and K `DiscriminatorWorker`s.

The driver runs the round table (`workers/phases.py`) across the actors: the fakes of the D
phases from the generators, every D phase on each discriminator, then the G phase (G's forward,
each discriminator's feedback, the generators' step) and the G_ema phase. A round needs data to
move between actors (fakes G -> D, dL/dx D -> G), so the driver submits each round as a chain of
actor calls whose ObjectRefs feed each other; it never waits inside a chunk except to bound how
many rounds are in flight, and fetches the small records once per chunk. (Ray inlines objects
under ~100 KiB in the caller's memory store, so tiny 2D batches do pass the driver; image batches
travel through plasma from G's node to D's.) With `topology.overlap` the fakes for round r+1 are
made while the Ds step on round r; a restore drops those pre-made fakes, so the first round after
`load_state` uses fresh ones.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import ray

from ganray.models.errors import CheckpointError
from ganray.orchestrator.job.engine import ChunkResult
from ganray.orchestrator.job.layout import DISCRIMINATOR, GENERATOR, Layout
from ganray.orchestrator.job.placement import Placement
from ganray.orchestrator.job.ray_calls import START_LIMIT, check_same, form_group, get, get_chunk, kill, mean
from ganray.workers.phases import Progress, RoundTable, round_table
from ganray.workers.settings import Hyper
from ganray.workers.stats import SKIPPED, combine, merge_models, merge_replicas

# Rounds a split job may have submitted but not finished: enough to keep every actor busy
# (G's next generation queues behind the current round), few enough to bound object-store use.
INFLIGHT_ROUNDS = 3
# The job-state parts each discriminator writes under its own name ("d{i}").
D_PARTS = ("D", "opt_D", "sampler")
# Parts only some jobs' discriminators hold: each D's own augmentation p (augment.kind set).
OPTIONAL_D_PARTS = ("augment",)


class SplitJob:
    """M `GeneratorWorker`s and K `DiscriminatorWorker`s; rounds as chains of ObjectRefs."""

    def __init__(self, cfg: dict[str, Any], layout: Layout, placement: Placement, timeout_s: float,
                 start_timeout_s: float) -> None:
        from ganray.workers.split import DiscriminatorWorker, GeneratorWorker, g_parts_for

        split = layout.split
        assert split is not None, "SplitJob needs a split layout"
        g_specs, d_specs = layout.of_role(GENERATOR), layout.of_role(DISCRIMINATOR)
        self.timeout_s = timeout_s
        self.m, self.k = len(g_specs), len(d_specs)
        self.batch = layout.batch_size
        self.loss = cfg["loss"]
        self.hyper = Hyper.from_config(cfg)
        self.overlap = split.overlap
        self.discs = [DiscriminatorWorker.options(**placement.actor_options(s.index))
                      .remote(cfg, s.rank, self.k, split.swap_every_epochs) for s in d_specs]
        # Elastic split: the discriminators the job has now (by index i of K, named "d{i}"), and
        # the job-state entries of those it lost, kept (from the last state loaded) so every
        # state and checkpoint still holds all K and a newcomer starts from its predecessor's.
        self.d_ids = [s.rank for s in d_specs]
        self.g_bundles, self.d_first_bundle = [s.index for s in g_specs], d_specs[0].index
        self.dormant: dict[str, dict[str, Any]] = {}
        self.gens = [GeneratorWorker.options(**placement.actor_options(s.index))
                     .remote(cfg, s.rank, self.m, split.feedback, split.softmax_lambda) for s in g_specs]
        try:
            d_infos = [d.setup.remote() for d in self.discs]
            # The generators take the sample shape from D_0's data info as an ObjectRef resolved
            # on their side: all actors start in parallel and the driver waits once.
            g_sums = [g.setup.remote(d_infos[0]) for g in self.gens]
            infos = get(d_infos, start_timeout_s, "starting the discriminators", START_LIMIT)
            get(g_sums, start_timeout_s, "starting the generators", START_LIMIT)
            self.sample_shape = tuple(infos[0]["sample_shape"])
            self.fingerprint = infos[0]["fingerprint"]
            # Discriminators never all-reduce (each trains on its own share); generators do when M > 1.
            self.allreduce = "none (one generator)"
            if self.m > 1:
                checksums, self.allreduce = form_group(self.gens, g_specs[0].gpus, timeout_s, "generator",
                                                        layout.collective)
                check_same(checksums, "generator")
        except BaseException:
            kill(self.actors)
            raise
        self.parts = [g_parts_for(i, self.k, self.m, self.batch) for i in range(self.k)]
        self.progress = Progress()
        self.nonfinite_run = 0
        self._pending: Optional[list[Any]] = None  # overlap: next round's fakes, already submitted

    @property
    def actors(self) -> list[Any]:
        return [*self.gens, *self.discs]

    @property
    def bundles(self) -> list[int]:
        """The placement bundle of each actor, in `actors` order."""
        return [*self.g_bundles, *(self.d_first_bundle + i for i in self.d_ids)]

    def drop_discriminators(self, lost: list[int]) -> None:
        """Go on without the discriminators at these `actors` positions (lost with their node):
        the generators weigh the survivors' feedback. The next `load_state` keeps the lost ones'
        entries (`dormant`), which a newcomer takes over in `add_discriminators`."""
        gone = {pos - self.m for pos in lost}
        kill([d for i, d in enumerate(self.discs) if i in gone])
        self.discs = [d for i, d in enumerate(self.discs) if i not in gone]
        self.d_ids = [d_id for i, d_id in enumerate(self.d_ids) if i not in gone]
        self._pending = None
        get([g.set_critics.remote(self.d_ids) for g in self.gens], self.timeout_s, "the critics")

    def add_discriminators(self, joining: dict[int, Any]) -> None:
        """Discriminators (by index, set up) rejoin at this round boundary: each takes its
        predecessor's D, optimizer (and p) from the last state loaded, and the job's current
        progress and data position."""
        live = get(self.discs[0].state.remote(), self.timeout_s, "a discriminator's position")
        position = next(iter(live["sampler"].values()))
        progress = {**self.progress.state(), "d_steps": int(live["d_steps"])}
        refs = []
        for d_id, actor in joining.items():
            entry = self.dormant.pop(f"d{d_id}")
            own = {part: {f"d{d_id}": value} for part, value in entry.items()}
            own["sampler"] = {f"d{d_id}": position}
            refs.append(actor.load_state.remote(own, progress, True))
        get(refs, self.timeout_s, "loading the rejoining discriminators")
        order = sorted([*zip(self.d_ids, self.discs), *joining.items()], key=lambda pair: pair[0])
        self.d_ids, self.discs = [d_id for d_id, _ in order], [d for _, d in order]
        self._pending = None
        get([g.set_critics.remote(self.d_ids) for g in self.gens], self.timeout_s, "the critics")

    def _table(self) -> RoundTable:
        return round_table(self.loss["kind"], int(self.loss["r1_interval"]), float(self.loss["gp_weight"]), self.hyper)

    def _submit_round(self) -> tuple[list[Any], list[Any]]:
        """One pass of the round table as a chain of actor calls; returns the D and G records' refs."""
        r = self.progress.rounds
        table = self._table()
        # The D phases: their fakes from the generators, all of them on every discriminator.
        if self.overlap:
            # Staleness 1: round r's D phases use fakes made before G's step r-1 landed, and G
            # makes round r+1's fakes while the Ds are busy with round r.
            fakes = self._pending or [g.fakes.remote(r) for g in self.gens]
            self._pending = [g.fakes.remote(r + 1) for g in self.gens]
        else:
            fakes = [g.fakes.remote(r) for g in self.gens]
        d_refs = [d.d_phase.remote(r, self.parts[i][0], *[fakes[j] for j in self.parts[i]])
                  for i, d in zip(self.d_ids, self.discs)]
        # The G phase and the G_ema phase: G's forward, every D's feedback, the generators' step.
        g_out = [g.forward.remote(r) for g in self.gens]
        feedback = [d.feedback.options(num_returns=self.m + 1).remote(*g_out) for d in self.discs]
        losses = [fb[0] for fb in feedback]
        g_refs = [g.apply_feedback.remote(*losses, *[fb[1 + j] for fb in feedback])
                  for j, g in enumerate(self.gens)]
        self.progress.end_round(table, self.batch)
        return d_refs, g_refs

    def run(self, n_rounds: int, stop_at_images: Optional[int]) -> ChunkResult:
        per_round = self._table().images(self.batch)
        todo = n_rounds
        if stop_at_images is not None:
            todo = min(n_rounds, max(0, math.ceil((stop_at_images - self.progress.images_seen) / per_round)))
        t0 = time.perf_counter()
        rounds: list[tuple[list[Any], list[Any]]] = []
        for q in range(todo):
            if q >= INFLIGHT_ROUNDS:
                ray.wait(rounds[q - INFLIGHT_ROUNDS][1], num_returns=self.m, timeout=self.timeout_s)
            rounds.append(self._submit_round())
        flat = [ref for d_refs, g_refs in rounds for ref in (*d_refs, *g_refs)]
        values = get_chunk(flat, self.timeout_s, f"a chunk of {todo} rounds")
        wall = time.perf_counter() - t0
        metrics: dict[str, list[float]] = {}
        g_busy = d_busy = comm = 0.0
        k = len(self.discs)  # the discriminators the job has now (fewer than K after an elastic shrink)
        step = k + self.m
        for q in range(todo):
            d_out = values[q * step:q * step + k]
            g_out = values[q * step + k:(q + 1) * step]
            # The K discriminators are K models, the M generators one.
            record = combine(merge_models([d["stats"] for d in d_out]), merge_replicas([g["stats"] for g in g_out]))
            for name, value in record.items():
                metrics.setdefault(name, []).append(value)
            self.nonfinite_run = self.nonfinite_run + 1 if record.get(SKIPPED) else 0
            d_busy += mean([d["compute_s"] for d in d_out])
            g_busy += mean([g["compute_s"] for g in g_out])
            comm += mean([g["comm_s"] for g in g_out])
        # G and D alternate within a round (they overlap only with topology.overlap), so busy
        # time adds up along the round; the rest of the wall time is transfer, call latency, idling.
        # Compute, comm and wait add up to the chunk's wall time: the driver's waits for the
        # in-flight bound overlap the workers' busy time, so adding them would count it twice.
        compute = min(g_busy + d_busy, max(0.0, wall - comm))
        return ChunkResult(rounds=todo, images_seen=self.progress.images_seen, round_index=self.progress.rounds,
                           metrics=metrics, time_compute_s=compute, time_comm_s=comm,
                           time_wait_s=max(0.0, wall - compute - comm), nonfinite_run=self.nonfinite_run)

    def state(self) -> dict[str, Any]:
        """The job state: generator 0's parts, each discriminator's parts under its own name
        ("d{i}", written by the worker), the driver's progress. The driver only merges."""
        if self.m > 1:
            check_same(get([g.param_checksum.remote() for g in self.gens], self.timeout_s, "checksums"), "generator")
        g_ref = self.gens[0].state.remote()
        d_states = get([d.state.remote() for d in self.discs], self.timeout_s, "discriminator states")
        g_state = get(g_ref, self.timeout_s, "the generator state")
        merged: dict[str, Any] = {**g_state, "D": {}, "opt_D": {}, "sampler": {}}
        for d_state in d_states:
            for part in D_PARTS:
                merged[part].update(d_state[part])
            for part in OPTIONAL_D_PARTS:
                if part in d_state:
                    merged.setdefault(part, {}).update(d_state[part])
        position = next(iter(merged["sampler"].values()))
        for name, entry in self.dormant.items():  # a lost discriminator's last state, at today's position
            for part, value in entry.items():
                merged.setdefault(part, {})[name] = value
            merged["sampler"][name] = position
        merged["progress"] = {**self.progress.state(), "d_steps": int(d_states[0]["d_steps"])}
        return merged

    def load_state(self, state: dict[str, Any], keep_hyper: bool) -> None:
        names = [f"d{i}" for i in range(self.k)]
        saved = sorted(state.get("D", {}).keys()) if isinstance(state.get("D"), dict) else []
        if saved != sorted(names):
            raise CheckpointError(f"the state holds discriminators {saved or 'of another topology'}, this split job has "
                                  f"{self.k} ({', '.join(names)}); resume with the run's topology")
        progress = {k: int(v) for k, v in state["progress"].items()}
        g_part = ray.put({"G": state["G"], "G_ema": state["G_ema"], "opt_G": state["opt_G"]})
        refs = [g.load_state.remote(g_part, progress, keep_hyper) for g in self.gens]
        live = [f"d{i}" for i in self.d_ids]
        self.dormant = {name: {part: state[part][name] for part in ("D", "opt_D", *OPTIONAL_D_PARTS)
                               if part in state and name in state[part]}
                        for name in names if name not in live}
        for name, d in zip(live, self.discs):
            # Each discriminator is sent only its own entries, under its own name.
            own = {part: {name: state[part][name]} for part in (*D_PARTS, *OPTIONAL_D_PARTS) if part in state}
            refs.append(d.load_state.remote(own, progress, keep_hyper))
        get(refs, self.timeout_s, "loading state")
        self.progress.load(progress)
        self._pending = None  # stale fakes of the replaced generator must not be used

    def generator_state(self) -> dict[str, Any]:
        return get(self.gens[0].generator_state.remote(), self.timeout_s, "the generator state")

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        before = self.hyper.n_critic
        self.hyper.update(hyper)  # validated here first: an unknown name reaches no worker
        get([a.set_hyper.remote(hyper) for a in self.actors], self.timeout_s, "set_hyper")
        if self.hyper.n_critic != before:
            self._pending = None  # pre-made fakes hold the old number of D phases

    def scale_lr(self, factor: float) -> None:
        self.set_hyper({"g_lr": self.hyper.g_lr * factor, "d_lr": self.hyper.d_lr * factor})
