"""Joining Ray and reserving the job's workers: who owns the Ray instance, and where actors go.

The coordinator may run in the `ganray train` driver (then it starts or joins Ray itself and
owns what it started) or inside a Ray Tune trial (Ray is already up, and the trial's placement
group already holds the workers' bundles). Both cases go through `RayRuntime` so the
coordinator code is the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ganray.orchestrator.errors import PlacementError

log = logging.getLogger("ganray")

# Ray refuses a bundle with no resources; a worker asking for none still takes this sliver.
_MIN_CPU = 0.01


@dataclass(frozen=True)
class WorkerSpec:
    """One worker's reservation: its role (for messages) and its CPUs/GPUs."""

    role: str
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


def connect(resources: Any) -> bool:
    """Join the Ray instance in use, or start/join one; True when this call started it (we own it).

    Already initialised (a Tune trial, a test session, a user's script): used as is, never shut
    down by us. Otherwise `resources.ray_address`, else RAY_ADDRESS, else a local instance.
    """
    if ray.is_initialized():
        return False
    address = resources.ray_address or os.environ.get("RAY_ADDRESS")
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address and address != "local":
        ray.init(address=address, **common)
    else:
        # A local instance: no dashboard (nothing listens beyond what Ray itself needs).
        ray.init(address="local", num_cpus=resources.num_cpus, include_dashboard=False, **common)
    return True


def _totals(bundles: list[dict[str, float]]) -> tuple[float, float]:
    return (sum(b.get("CPU", 0.0) for b in bundles), sum(b.get("GPU", 0.0) for b in bundles))


def _describe(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


class Placement:
    """Where the job's actors go: a placement group reserved here, or the trial's own group."""

    def __init__(self, specs: list[WorkerSpec], strategy: str, timeout_s: float) -> None:
        self.specs = specs
        self.group: Optional[PlacementGroup] = None
        self.owned = False
        current = get_current_placement_group()
        if current is not None:
            # Inside a Tune trial (or any task already in a placement group): the trial reserved
            # the bundles, so the workers go into it instead of asking the cluster a second time.
            self.group = current
            return
        bundles = [s.bundle() for s in specs]
        group = placement_group(bundles, strategy=strategy, name="")
        if not group.wait(timeout_seconds=timeout_s):
            remove_placement_group(group)
            raise PlacementError(self._failure(bundles, strategy, timeout_s))
        self.group, self.owned = group, True

    def _failure(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> str:
        cpus, gpus = _totals(bundles)
        roles: dict[str, int] = {}
        for s in self.specs:
            roles[s.role] = roles.get(s.role, 0) + 1
        who = ", ".join(f"{n} {role}{'s' if n > 1 else ''}" for role, n in roles.items())
        kinds = sorted({str(b) for b in bundles})
        return (f"cannot place the job's workers within resources.placement_timeout_s={timeout_s:g} s: "
                f"asked {len(bundles)} bundles ({who}; each {' / '.join(kinds)}; {cpus:g} CPUs, {gpus:g} GPUs "
                f"in all, strategy {strategy}); the cluster has {_describe(ray.cluster_resources())} "
                f"({_describe(ray.available_resources())} available); lower resources.cpus_per_worker/"
                "gpus_per_worker or the worker count, or add nodes")

    def strategy_for(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling of worker `index` (its own bundle; any bundle with room inside a trial's group)."""
        if self.owned:
            return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=-1,
                                                placement_group_capture_child_tasks=True)

    def actor_options(self, index: int) -> dict[str, Any]:
        return {**self.specs[index].actor_resources(), "scheduling_strategy": self.strategy_for(index),
                "max_restarts": 0}

    def release(self) -> None:
        if self.owned and self.group is not None:
            try:
                remove_placement_group(self.group)
            except Exception as err:  # the cluster may already be gone at exit
                log.debug("removing the placement group failed: %s", err)
        self.group, self.owned = None, False
