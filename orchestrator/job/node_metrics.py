"""Per-node system metrics of a Ray job: one sample per Ray node that hosts a worker, named as
MLflow names the metrics of several nodes: `system/<node>/<name>` (`SystemMetricsMonitor` with a
`node_id`, see ganray.workers.system_metrics).

`<node>` is the first `NODE_ID_CHARS` hex characters of the Ray node id. Ray gives every raylet a
fresh random id, so a lost node and the node that replaces it (even on the same host, with the
same IP) get distinct series; an IP would not tell them apart. The full 56 characters would make
metric names unwieldy in MLflow's UI, and 12 of them (48 random bits) already keep the nodes of a
job apart. Which IP a node id has is logged once per node.

The coordinator asks at the sync points where the trainer logs its metrics (never per round), in
one wait bounded by `NODE_METRICS_TIMEOUT_S`: the workers have just finished a chunk and answer at
once; one that does not (busy, lost) is left out of that point with a debug line, and the job goes
on: a fault is the training calls' business, not this one's.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import ray

from ganray.workers.system_metrics import metric_names

log = logging.getLogger("ganray")

NODE_ID_CHARS = 12
NODE_METRICS_TIMEOUT_S = 5.0


def short_node_id(node_id: str) -> str:
    """The node's name in metric names: a prefix of the Ray node id (48 random bits)."""
    return node_id[:NODE_ID_CHARS]


class _Seen(NamedTuple):
    node: str  # short node id
    gpu: bool  # the worker uses a GPU: it is asked for that GPU at every sample


class NodeMetrics:
    """Samples the nodes of a changing set of worker actors (restarts and resizes replace some).

    The first time a worker is seen it is asked for everything (its node is not known yet);
    afterwards one known worker per node samples the node's CPU, memory and disk, and the other
    workers are asked only when they use a GPU (each worker sees only its own GPUs)."""

    def __init__(self, timeout_s: float = NODE_METRICS_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._seen: dict[Any, _Seen] = {}  # actor handle -> what its replies told
        self._named: set[str] = set()

    def _asks(self, actors: list[Any]) -> list[tuple[Any, bool]]:
        """(actor, sample the host) for the workers to ask now."""
        nodes: set[str] = set()
        asks: list[tuple[Any, bool]] = []
        for actor in actors:
            seen = self._seen.get(actor)
            if seen is None:
                asks.append((actor, True))
            elif seen.node not in nodes:
                nodes.add(seen.node)
                asks.append((actor, True))
            elif seen.gpu:
                asks.append((actor, False))
        return asks

    def sample(self, actors: list[Any]) -> dict[str, float]:
        """`{system/<node>/<name>: value}` for every node that answered in time."""
        self._seen = {a: s for a, s in self._seen.items() if a in actors}  # forget replaced workers
        asks = self._asks(actors)
        if not asks:
            return {}
        refs = [actor.node_metrics.remote(host) for actor, host in asks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        done = set(ready)
        out: dict[str, float] = {}
        for (actor, _), ref in zip(asks, refs):
            # A worker that does not answer is forgotten: at the next point another worker of
            # its node speaks for the node (it is asked again too, as a worker not seen yet).
            if ref not in done:
                self._seen.pop(actor, None)
                log.debug("node metrics: a worker did not answer within %g s; left out of this point", self.timeout_s)
                continue
            try:
                reply = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a lost worker raises several Ray errors
                self._seen.pop(actor, None)
                log.debug("node metrics: a worker failed to answer (%s); left out of this point", type(err).__name__)
                continue
            node = short_node_id(reply["node_id"])
            self._seen[actor] = _Seen(node, bool(reply["gpu"]))
            if node not in self._named:
                self._named.add(node)
                log.info("system metrics of node %s (%s) are logged as system/%s/*", node, reply["address"], node)
            for name, value in metric_names(reply["metrics"], node).items():
                out.setdefault(name, value)  # the first worker of a node in actor order speaks for it
        return out
