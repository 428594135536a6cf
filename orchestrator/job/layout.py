"""The job's layout: which workers a topology runs, what each reserves and how the batch divides.

`TrainConfig` resolves it once, when the config is validated (`config.layout`), the way
torchtitan's `ParallelDims` resolves and checks the parallel degrees before anything is built:
the coordinator places and creates the workers it lists, Tune reserves its bundles, tracking
describes it. Nothing else reads the topology's optional keys or their defaults.

Placement order (the bundle index of each worker): in `split`, the M generators first, then the
K discriminators; in `replicated`, the replicas by rank. `local` has no worker actors: it runs
in the calling process (a Tune trial reserves its threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

# Ray refuses a bundle with no resources; a worker asking for none still takes this sliver.
_MIN_CPU = 0.01

REPLICA, GENERATOR, DISCRIMINATOR = "replica", "generator", "discriminator"

# Topology keys that only one kind reads; a key of another kind is a config error (or, when
# `topology.kind` comes from `--set`, dropped from the file's keys: see config.py).
KEY_OWNER = {"num_workers": "replicated", "min_workers": "replicated", "num_generators": "split",
             "min_discriminators": "split", "num_discriminators": "split",
             "feedback": "split", "softmax_lambda": "split", "swap_every_epochs": "split", "overlap": "split"}


@dataclass(frozen=True)
class WorkerSpec:
    """One worker actor: its role, its rank within the role, its position in placement order
    (its bundle) and the CPUs/GPUs it reserves."""

    role: str
    rank: int
    index: int
    cpus: float
    gpus: float

    def bundle(self) -> dict[str, float]:
        bundle = {}
        if self.cpus > 0:
            bundle["CPU"] = float(self.cpus)
        if self.gpus > 0:
            bundle["GPU"] = float(self.gpus)
        return bundle or {"CPU": _MIN_CPU}

    def actor_resources(self) -> dict[str, float]:
        b = self.bundle()
        return {"num_cpus": b.get("CPU", 0.0), "num_gpus": b.get("GPU", 0.0)}


@dataclass(frozen=True)
class SplitSettings:
    """How the `split` generators combine their discriminators, with the documented defaults."""

    feedback: str = "mean"
    softmax_lambda: float = 1.0
    swap_every_epochs: int = 0
    overlap: bool = False


@dataclass(frozen=True)
class Layout:
    """The resolved topology: kind, ordered worker specs, batch parts, placement bundles."""

    kind: str
    workers: tuple[WorkerSpec, ...]
    batch_size: int
    batch_parts: int
    strategy: str
    local_bundle: dict[str, float]
    split: Optional[SplitSettings] = None
    # The config keys that set the workers' CPUs and GPUs, for messages that say what to change.
    cpu_keys: tuple[str, ...] = ()
    gpu_keys: tuple[str, ...] = ()
    # How a worker group's all-reduces travel (`resources.collective`): "auto" takes same-host
    # shared memory where it can, "gloo" never does (what ranks on different hosts run).
    collective: str = "auto"
    # Elastic worlds (`topology.min_workers` / `min_discriminators`): the fewest workers of the
    # elastic role (replicas; discriminators in split) the job trains on after losing some.
    # Equal to the full count: not elastic (a loss recreates every worker at the full count).
    min_elastic: int = 0

    @property
    def per_worker_batch(self) -> int:
        """Real samples one worker takes per D step (a replica's share, or a discriminator's)."""
        return self.batch_size // self.batch_parts

    @property
    def elastic_role(self) -> Optional[str]:
        """The role whose workers may be lost without stopping the job (None: not elastic)."""
        role = {"replicated": REPLICA, "split": DISCRIMINATOR}.get(self.kind)
        return role if role is not None and 0 < self.min_elastic < self.count(role) else None

    def elastic_sizes(self) -> range:
        """Every count of the elastic role the job may train with (just the full count when not elastic)."""
        full = self.batch_parts
        return range(self.min_elastic if self.elastic_role else full, full + 1)

    def of_role(self, role: str) -> tuple[WorkerSpec, ...]:
        return tuple(s for s in self.workers if s.role == role)

    def count(self, role: str) -> int:
        return len(self.of_role(role))

    def bundles(self) -> list[dict[str, float]]:
        """One placement bundle per worker actor, in placement order."""
        return [s.bundle() for s in self.workers]

    def describe(self) -> str:
        """Short text for the run's `ganray.topology` tag."""
        if self.kind == "replicated":
            return f"replicated x{self.count(REPLICA)}"
        if self.kind == "split" and self.split is not None:
            return f"split {self.count(GENERATOR)}G+{self.count(DISCRIMINATOR)}D ({self.split.feedback})"
        return "local"

    def tune_resources(self) -> Any:
        """What one Tune trial reserves (a `ray.tune.PlacementGroupFactory`).

        `local` trains in the trial itself: its threads (and GPU). Ray topologies reserve one
        bundle per worker actor and an empty head bundle for the coordinator, which only drives
        the workers and evaluates: Tune runs a trial whose head bundle is empty with no
        resources of its own, and even a sliver (0.01 CPU) would keep two 1-worker trials from
        sharing a 2-CPU machine."""
        from ray import tune

        if self.kind == "local":
            return tune.PlacementGroupFactory([dict(self.local_bundle)])
        return tune.PlacementGroupFactory([{}, *self.bundles()], strategy=self.strategy)


def _role_specs(role: str, count: int, start: int, cpus: float, gpus: float) -> list[WorkerSpec]:
    return [WorkerSpec(role, rank, start + rank, float(cpus), float(gpus)) for rank in range(count)]


def _divides(batch: int, count: int, key: str) -> None:
    if batch % count:
        raise ValueError(f"schedule.batch_size {batch} does not divide among {key}={count} workers; "
                         f"use a multiple of {count}")


def _elastic_floor(full: int, floor: Optional[int], key: str, full_key: str, batch: int) -> int:
    """The elastic minimum of a role of `full` workers; every count from it to `full` must divide the batch."""
    low = full if floor is None else int(floor)
    if low > full:
        raise ValueError(f"{key}={low} exceeds {full_key}={full}; set it to at most {full}")
    for count in range(low, full + 1):
        if batch % count:
            raise ValueError(f"schedule.batch_size {batch} does not divide among {count} workers, a size the "
                             f"elastic range {key}={low}..{full_key}={full} allows; use a multiple of every "
                             f"size in the range (e.g. {math.lcm(*range(low, full + 1))}) or narrow the range")
    return low


def resolve_layout(config: Any) -> Layout:
    """The layout of a `TrainConfig` (its sections already validated); a ValueError names the
    first key that makes it impossible."""
    topo, res, batch = config.topology, config.resources, config.schedule.batch_size
    local_bundle = {"CPU": float(res.threads_per_worker)}
    if res.gpus_per_worker > 0:
        local_bundle["GPU"] = float(res.gpus_per_worker)
    common: dict[str, Any] = {"kind": topo.kind, "batch_size": batch, "strategy": res.strategy,
                              "local_bundle": local_bundle, "collective": res.collective}
    if topo.kind == "replicated":
        n = topo.num_workers or 1
        _divides(batch, n, "topology.num_workers")
        low = _elastic_floor(n, topo.min_workers, "topology.min_workers", "topology.num_workers", batch)
        layout = Layout(workers=tuple(_role_specs(REPLICA, n, 0, res.cpus_per_worker, res.gpus_per_worker)),
                        batch_parts=n, min_elastic=low, cpu_keys=("resources.cpus_per_worker",),
                        gpu_keys=("resources.gpus_per_worker",), **common)
    elif topo.kind == "split":
        m, k = topo.num_generators or 1, topo.num_discriminators or 2
        _divides(batch, m, "topology.num_generators")
        _divides(batch, k, "topology.num_discriminators")
        low = _elastic_floor(k, topo.min_discriminators, "topology.min_discriminators",
                             "topology.num_discriminators", batch)
        roles = [(GENERATOR, res.generator, m), (DISCRIMINATOR, res.discriminator, k)]
        specs: list[WorkerSpec] = []
        cpu_keys: list[str] = []
        gpu_keys: list[str] = []
        for role, explicit, count in roles:
            cpus = explicit.cpus if explicit is not None else res.cpus_per_worker
            gpus = explicit.gpus if explicit is not None else res.gpus_per_worker
            specs += _role_specs(role, count, len(specs), cpus, gpus)
            cpu_keys.append(f"resources.{role}.cpus" if explicit is not None else "resources.cpus_per_worker")
            gpu_keys.append(f"resources.{role}.gpus" if explicit is not None else "resources.gpus_per_worker")
        split = SplitSettings(feedback=topo.feedback or "mean",
                              softmax_lambda=1.0 if topo.softmax_lambda is None else float(topo.softmax_lambda),
                              swap_every_epochs=topo.swap_every_epochs or 0, overlap=bool(topo.overlap))
        if low < k and split.swap_every_epochs:
            raise ValueError("topology.min_discriminators below topology.num_discriminators (an elastic split job) "
                             "cannot swap shards among discriminators that come and go; set "
                             "topology.swap_every_epochs: 0 or topology.min_discriminators to the full count")
        layout = Layout(workers=tuple(specs), batch_parts=k, split=split, min_elastic=low,
                        cpu_keys=tuple(dict.fromkeys(cpu_keys)), gpu_keys=tuple(dict.fromkeys(gpu_keys)), **common)
    else:
        layout = Layout(workers=(), batch_parts=1, **common)
    _check_pack(config, layout)
    _check_devices(config, layout)
    return layout


PACKING_DISCRIMINATORS = ("mlp", "dcgan")


def _check_pack(config: Any, layout: Layout) -> None:
    """A packed discriminator judges `model.pack` samples at once: each worker's share of the
    batch must hold whole packs. Only the built-in discriminators pack."""
    pack = config.model.pack
    if pack == 1:
        return
    if config.model.discriminator not in PACKING_DISCRIMINATORS:
        raise ValueError(f"model.pack={pack} applies to the built-in discriminators "
                         f"({', '.join(PACKING_DISCRIMINATORS)}), not '{config.model.discriminator}'; "
                         "set model.pack: 1 or pack inside your own discriminator")
    for count in reversed(layout.elastic_sizes()):
        share = layout.batch_size // count
        if share % pack:
            where = "" if count == 1 else f" per {'discriminator' if layout.kind == 'split' else 'replica'}"
            when = f" at {count} workers (a size of the elastic range)" if count != layout.batch_parts else ""
            raise ValueError(f"model.pack={pack} needs a batch{where} that is a multiple of {pack} "
                             f"(got {share}{when}); change schedule.batch_size or model.pack")


def _check_devices(config: Any, layout: Layout) -> None:
    """Ray hides every GPU from an actor that reserved none: `device: cuda` needs a GPU per worker."""
    if config.resources.device != "cuda":
        return
    bare = [s for s in layout.workers if s.gpus <= 0]
    if bare:
        key = layout.gpu_keys[0] if layout.kind == "replicated" else (
            f"resources.{bare[0].role}.gpus" if getattr(config.resources, bare[0].role) is not None
            else "resources.gpus_per_worker")
        raise ValueError(f"resources.device is 'cuda' but each {bare[0].role} reserves no GPU, and Ray hides "
                         f"the GPUs from it; set {key} (e.g. 1) or use resources.device: auto")
