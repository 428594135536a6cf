"""Elastic worlds: a job that keeps training on the workers it has left, and grows back.

With `topology.min_workers` below `num_workers` (replicated) a worker loss does not stop the
survivors: the coordinator keeps the job's placement group (Ray reschedules the bundles of a
dead node itself, reporting the group `RESCHEDULING` and those bundles on no node), re-forms the
group among the survivors that leave their broken one cleanly, and the loop goes on from its
snapshot. At chunk boundaries it asks the group which bundles are placed on live nodes again,
starts workers there while the job trains, and lets them join at the next round boundary after
they are set up. The global batch, data order and noise stay those of the full world (one
permutation sliced by rank; noise a pure function of seed, round and slot), so only the share
of each worker changes.

The pieces here are Ray-level and topology-free: which bundles are placed (`placed_bundles`),
which survivors can be reused (`leave_groups`), the workers being started (`Newcomers`) and the
record of one resize (`Resize`). `RayEngine` (coordinator.py) puts them together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table

from ganray.orchestrator.job.ray_calls import kill

log = logging.getLogger("ganray")

# Asking the GCS for the group's table and the node list costs a round trip each: at most this
# often, however short the chunks.
POLL_EVERY_S = 1.0
# A survivor whose old group does not let go within this long is replaced, not reused.
LEAVE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Resize:
    """One change of the job's world: `shrink` after a loss, `grow` when capacity came back."""

    kind: str
    before: int
    after: int
    seconds: float
    nodes: tuple[str, ...]  # the Ray node of each worker of the new world, by rank

    def line(self) -> str:
        where = ", ".join(node[:12] for node in self.nodes)
        return (f"elastic {self.kind}: {self.before} -> {self.after} workers in {self.seconds:.1f} s "
                f"(nodes {where})")


def placed_bundles(group: PlacementGroup) -> dict[int, str]:
    """Bundle index -> Ray node id of every bundle of `group` placed on a node that is alive.

    A dead node's bundles show no node while Ray reschedules them, but until the GCS has declared
    the node dead (its health checks) they still name it: the node list filters those."""
    table = placement_group_table(group)
    alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    return {int(index): node for index, node in table.get("bundles_to_node_id", {}).items()
            if node and node in alive}


def leave_groups(workers: dict[int, Any], timeout_s: float = LEAVE_TIMEOUT_S) -> dict[int, Any]:
    """Ask each worker (by bundle) to leave its worker group; those that do within `timeout_s`
    are returned for reuse, the others are killed (a worker stuck in a collective with a dead
    peer may never return)."""
    if not workers:
        return {}
    refs = {bundle: actor.leave_group.remote() for bundle, actor in workers.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    clean: dict[int, Any] = {}
    for bundle, ref in refs.items():
        try:
            if ref in done:
                ray.get(ref)
                clean[bundle] = workers[bundle]
                continue
        except Exception as err:  # noqa: BLE001 - a dead worker raises one of several Ray errors
            log.debug("worker in bundle %d did not leave its group: %s", bundle, err)
        kill([workers[bundle]])
    return clean


class Newcomers:
    """Workers started in bundles placed again, set up while the job trains; they join at a
    round boundary once every one of them is ready."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Any, Any]] = {}  # bundle -> (actor, its setup call)
        self._last_poll = 0.0

    def poll_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_poll < POLL_EVERY_S:
            return False
        self._last_poll = now
        return True

    def start(self, bundles: list[int], create: Callable[[int], Any]) -> None:
        for bundle in bundles:
            actor = create(bundle)
            self.pending[bundle] = (actor, actor.setup.remote())
        log.info("capacity is back for bundles %s: starting workers there", sorted(bundles))

    def take_ready(self) -> Optional[dict[int, Any]]:
        """The newcomers, once every setup has ended (None while any is still starting); one whose
        setup failed (its node lost again, say) is killed and left out."""
        if not self.pending:
            return None
        refs = [ref for _, ref in self.pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs):
            return None
        joined: dict[int, Any] = {}
        for bundle, (actor, ref) in self.pending.items():
            try:
                ray.get(ref)
                joined[bundle] = actor
            except Exception as err:  # noqa: BLE001 - one newcomer's failure must not stop the job
                log.warning("a worker starting in bundle %d failed (%s); it is tried again when the bundle "
                            "is placed", bundle, str(err).strip().splitlines()[0][:200] if str(err).strip() else
                            type(err).__name__)
                kill([actor])
        self.pending = {}
        return joined

    def discard(self) -> None:
        kill([actor for actor, _ in self.pending.values()])
        self.pending = {}


def node_of(actors: list[Any], timeout_s: float = 10.0) -> tuple[str, ...]:
    """The Ray node of each worker (their liveness probe says it); '?' for one that did not answer."""
    refs = [a.process_info.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    nodes = []
    for ref in refs:
        try:
            nodes.append(ray.get(ref)["node_id"] if ref in done else "?")
        except Exception:  # noqa: BLE001 - a worker lost meanwhile: the next chunk says so
            nodes.append("?")
    return tuple(nodes)
