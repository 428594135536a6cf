"""Joining Ray and reserving the job's workers: who owns the Ray instance, and where actors go.

The coordinator may run in the `ganray train` driver (then it starts or joins Ray itself and
owns what it started) or inside a Ray Tune trial (Ray is already up, and the trial's placement
group already holds the workers' bundles). `connect` says which Ray instance is in use and
whether capacity can still arrive there; `Placement` reserves the layout's bundles (or finds
the trial's group), so the coordinator code is the same in both cases.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ganray.orchestrator.errors import PlacementError
from ganray.orchestrator.job.layout import Layout

log = logging.getLogger("ganray")


@dataclass(frozen=True)
class RayInstance:
    """The Ray instance a job uses: `owned` when ganray started or joined it (and shuts it down),
    `fixed` when it is a local instance ganray started itself, to which no capacity can arrive."""

    owned: bool
    fixed: bool


RAY_CLIENT_PORT = 10001  # Ray Client's default port (`ray://host` without one)
_PROBE_EVERY_S = 0.5
_SAY_STILL_WAITING_EVERY_S = 10.0
_answered: set[tuple[str, int]] = set()  # endpoints that answered in this process: probed once


def explicit_address(resources: Any) -> Optional[tuple[str, str]]:
    """(address, where it was given) of a cluster to join; None for a local instance."""
    if resources.ray_address:
        address, source = resources.ray_address, "resources.ray_address"
    else:
        address, source = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
    address = address.strip()
    if not address or address == "local":
        return None
    return address, source


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """The TCP endpoint of a GCS address (`host:port`) or a Ray Client one (`ray://host[:port]`);
    None for `auto` and other forms Ray resolves itself."""
    if address.startswith("ray://"):
        parts = urlsplit(address)
        try:
            return (parts.hostname, parts.port or RAY_CLIENT_PORT) if parts.hostname else None
        except ValueError:  # a port that is not a number: let the caller's message say so
            return (parts.hostname or address, -1)
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address:
        return None
    return (host.strip("[]"), int(port)) if port.isdigit() else (host, -1)


def probe(resources: Any) -> None:
    """Wait, at most `resources.connect_timeout_s`, until an explicit Ray address accepts a TCP
    connection; otherwise a one-line PlacementError naming the address and where it came from.

    `ray.init` against an address nobody answers retries for minutes with warnings (GCS form)
    or ends in a traceback (`ray://`), so ganray asks first, before any MLflow run is opened.
    """
    given = explicit_address(resources)
    if given is None or ray.is_initialized():
        return
    address, source = given
    endpoint = _host_port(address)
    if endpoint is None:
        return
    host, port = endpoint
    if (host, port) in _answered:  # the trainer probed before opening its run; connect needs no second try
        return
    timeout = float(resources.connect_timeout_s)
    check = ("the head node is up and this machine can reach that port (for a `ray start` head: its --port, "
             "6379 by default; for Ray Client: ray://HEAD:10001)")
    if port < 0:
        raise PlacementError(f"Ray address '{address}' (from {source}) has no valid port; give it as HOST:PORT, "
                             "or ray://HOST:PORT for Ray Client")
    start = time.monotonic()
    said = start
    log.info("connecting to Ray at %s (from %s), waiting up to resources.connect_timeout_s=%g s",
             address, source, timeout)
    while True:
        remaining = timeout - (time.monotonic() - start)
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
                _answered.add((host, port))
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if time.monotonic() - start >= timeout:
            raise PlacementError(f"cannot reach Ray at {address} (from {source}) within resources.connect_timeout_s="
                                 f"{timeout:g} s ({reason}); check the address, that {check}, or unset {source} "
                                 "to start a local instance")
        if time.monotonic() - said >= _SAY_STILL_WAITING_EVERY_S:
            said = time.monotonic()
            log.warning("still waiting for Ray at %s (from %s): %.0f of %g s (%s)", address, source,
                        said - start, timeout, reason)
        time.sleep(min(_PROBE_EVERY_S, max(0.0, timeout - (time.monotonic() - start))))


def connect(resources: Any) -> RayInstance:
    """Join the Ray instance in use, or start/join one.

    Already initialised (a Tune trial, a test session, a user's script): used as is, never shut
    down by us. Otherwise `resources.ray_address`, else RAY_ADDRESS (probed first, see `probe`),
    else a local instance.
    """
    if ray.is_initialized():
        return RayInstance(owned=False, fixed=False)
    given = explicit_address(resources)
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if given is not None:
        probe(resources)
        ray.init(address=given[0], **common)
        return RayInstance(owned=True, fixed=False)
    # A local instance: no dashboard (nothing listens beyond what Ray itself needs).
    ray.init(address="local", num_cpus=resources.num_cpus, include_dashboard=False, **common)
    return RayInstance(owned=True, fixed=True)


def _totals(bundles: list[dict[str, float]]) -> tuple[float, float]:
    return (sum(b.get("CPU", 0.0) for b in bundles), sum(b.get("GPU", 0.0) for b in bundles))


def _describe(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


class Placement:
    """Where the job's actors go: a placement group reserved here, or the trial's own group.

    On a local instance ganray started (`fixed_capacity`), a layout that does not fit fails at
    once: waiting `timeout_s` cannot help there. On a cluster, capacity may arrive (an
    autoscaler, a replacement node), so it waits, then explains."""

    def __init__(self, layout: Layout, timeout_s: float, fixed_capacity: bool = False,
                 timeout_key: str = "resources.placement_timeout_s") -> None:
        self.layout = layout
        self.specs = layout.workers
        self.group: Optional[PlacementGroup] = None
        self.owned = False
        current = get_current_placement_group()
        if current is not None:
            # Inside a Tune trial (or any task already in a placement group): the trial reserved
            # the bundles, so the workers go into it instead of asking the cluster a second time.
            self.group = current
            return
        bundles = layout.bundles()
        if fixed_capacity:
            self._check_fits(bundles)
        group = placement_group(bundles, strategy=layout.strategy, name="")
        if not group.wait(timeout_seconds=timeout_s):
            remove_placement_group(group)
            raise PlacementError(self._failure(bundles, timeout_s, timeout_key))
        self.group, self.owned = group, True

    def _asked(self, bundles: list[dict[str, float]]) -> str:
        cpus, gpus = _totals(bundles)
        roles: dict[str, int] = {}
        for s in self.specs:
            roles[s.role] = roles.get(s.role, 0) + 1
        who = ", ".join(f"{n} {role}{'s' if n > 1 else ''}" for role, n in roles.items())
        kinds = sorted({str(b) for b in bundles})
        return (f"asked {len(bundles)} bundles ({who}; each {' / '.join(kinds)}; {cpus:g} CPUs, {gpus:g} GPUs "
                f"in all, strategy {self.layout.strategy})")

    def _check_fits(self, bundles: list[dict[str, float]]) -> None:
        """Fail now when the bundles cannot fit the local instance's fixed resources."""
        have = ray.cluster_resources()
        cpus, gpus = _totals(bundles)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        fixes = []
        if cpus > have.get("CPU", 0.0) + 1e-9:
            cpu_keys = " or ".join(self.layout.cpu_keys) or "resources.cpus_per_worker"
            fixes.append(f"set resources.num_cpus={math.ceil(cpus - 1e-9)} (logical CPUs may exceed the cores) "
                         f"or lower {cpu_keys} (e.g. 0.5)")
        if gpus > have.get("GPU", 0.0) + 1e-9:
            gpu_keys = " or ".join(self.layout.gpu_keys) or "resources.gpus_per_worker"
            fixes.append(f"lower {gpu_keys} (fractions share a GPU) or the worker count")
        if self.layout.strategy == "STRICT_SPREAD" and len(bundles) > nodes:
            fixes.append("use resources.strategy PACK (STRICT_SPREAD needs one node per worker)")
        if fixes:
            raise PlacementError(f"the job's workers cannot fit the local Ray instance ganray started "
                                 f"({_describe(have)}, {nodes} node{'s' if nodes != 1 else ''}): "
                                 f"{self._asked(bundles)}; {'; '.join(fixes)}")

    def _failure(self, bundles: list[dict[str, float]], timeout_s: float, timeout_key: str) -> str:
        return (f"cannot place the job's workers within {timeout_key}={timeout_s:g} s: "
                f"{self._asked(bundles)}; the cluster has {_describe(ray.cluster_resources())} "
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
