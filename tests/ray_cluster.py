"""A real multi-node Ray cluster on this host for tests: a head and worker nodes, each its own
`ray start --block` (the venv's), each its own raylet, as a user's cluster is.

Every node is one process group (`start_new_session=True`: `ray start` and the GCS, raylet and
agents it starts) with its own short `--temp-dir`. The raylet starts each worker in a session of
its own, so a node's workers are found by a marker in the environment they inherit
(`NODE_MARKER`). `kill_node(i)` is a node loss (SIGKILL of every process of the node: nothing of
it says goodbye); `stop()` ends exactly the processes of the nodes this cluster started, nothing
else on the machine (`ray stop` would end every Ray here, the test session's own included), and
asserts that none is left.

The test process keeps its own in-process Ray session (`ray_session`), so this module never
calls `ray.init`: the number of alive nodes is asked by a short Python subprocess that joins the
cluster as a driver. Jobs run against the cluster as subprocesses with `RAY_ADDRESS=address`.

The `ray_cluster` fixture is a head and two worker nodes (import it into a test module, as
`sqlite_store` is); a test that needs another shape builds a `RayCluster` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from helpers import free_ports

RAY = Path(sys.executable).with_name("ray")  # the venv's CLI: its nodes run the venv's Python and ganray
# In each node's environment (its value: the node's temp dir), so every process of the node,
# workers included, can be found and stopped: see `RayCluster.node_processes`.
NODE_MARKER = "GANRAY_TEST_RAY_NODE"

# Joins the cluster as a driver and prints its alive nodes (JSON: Ray node id -> logical CPUs) once
# they are argv[2] (or argv[3] seconds have passed). The driver attaches to the head's raylet (Ray
# prefers the head among raylets sharing an IP), so it survives the loss of any worker node.
_ALIVE_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    alive = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}
    if len(alive) == want or time.monotonic() > deadline:
        break
    time.sleep(0.1)
print("alive=" + json.dumps(alive))
"""


@dataclass
class Node:
    """One `ray start --block` process group."""

    index: int  # 0 is the head
    proc: subprocess.Popen
    temp_dir: Path
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the group id is the leader's pid


class RayCluster:
    """A head and worker nodes on this host; `address` is the GCS address on 127.0.0.1
    (`RAY_ADDRESS`). Ray registers every node under the host's routable IP (it replaces a
    loopback `--node-ip-address`), and its servers listen on all interfaces, as `ray start` does.

    `head_cpus=0` keeps the workers of a job off the head (the driver's node), as on a cluster
    whose head only coordinates; `worker_cpus` is each worker node's logical CPUs (they may
    exceed the cores: a test's actors are small). The health checks are short
    (`health_check_period_ms` x `health_check_failure_threshold`) so a lost node is reported in
    seconds instead of Ray's default 15 s or more.
    """

    def __init__(self, log_dir: Path, head_cpus: int = 0, worker_cpus: int = 1,
                 object_store_mb: int = 80, health_check_period_ms: Optional[int] = 1000,
                 health_check_failure_threshold: Optional[int] = 3, start_timeout_s: float = 120.0) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.health_check_period_ms = health_check_period_ms
        self.health_check_failure_threshold = health_check_failure_threshold
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = 3.0  # a graceful `ray start` shutdown takes far longer; nothing in it is needed
        self.nodes: list[Node] = []
        self.killed: set[int] = set()
        self.gcs_port = 0
        # Ray's servers listen on every interface: the cluster takes a token of its own, which
        # every node, the node counter and a test's job are given (`auth_env`).
        self.token = secrets.token_hex(32)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def auth_env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster: Ray token auth with its token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    # ---- starting -------------------------------------------------------------------------

    def environment(self, temp_dir: Path) -> dict[str, str]:
        """A node's environment (its workers inherit it from the raylet).

        The health checks are read by the GCS (on the head): it checks each raylet every period
        and declares the node dead after that many failed checks in a row. A SIGKILLed raylet
        refuses connections, so each check fails at once; a live but busy one still has Ray's
        RPC timeout (seconds) to answer each check, so a loaded machine does not lose nodes by
        mistake. None keeps Ray's default."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no inherited address or config
        env.update({
            **self.auth_env(),
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",  # 2 cores shared by every node's workers
            "PYTHONUNBUFFERED": "1",
            NODE_MARKER: str(temp_dir),
        })
        if self.health_check_period_ms is not None:
            env["RAY_health_check_period_ms"] = str(self.health_check_period_ms)
        if self.health_check_failure_threshold is not None:
            env["RAY_health_check_failure_threshold"] = str(self.health_check_failure_threshold)
        return env

    def _command(self, head: bool, temp_dir: Path) -> list[str]:
        cmd = [str(RAY), "start", "--block", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", "--num-gpus=0",
               f"--num-cpus={self.head_cpus if head else self.worker_cpus}",
               f"--object-store-memory={self.object_store_bytes}",
               # Ray's fixed defaults collide between nodes on one host (and with any other Ray
               # here): the dashboard agent's HTTP port (52365) on every node, and the worker port
               # range (10002-19999, handed out by each raylet without knowing of the others).
               # 0/0 lets every worker bind a port the OS picks. The node manager, object manager,
               # agents' gRPC and metrics ports are bound by the OS already when not given.
               "--min-worker-port=0", "--max-worker-port=0"]
        if head:
            # The GCS port (6379 by default) is the address; Ray Client listens on 10001 by default.
            gcs, client_server, agent_http = free_ports(3)
            self.gcs_port = gcs
            cmd += ["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={client_server}",
                    f"--dashboard-agent-listen-port={agent_http}"]
        else:
            (agent_http,) = free_ports(1)
            cmd += [f"--address={self.address}", f"--dashboard-agent-listen-port={agent_http}"]
        return cmd

    def _spawn(self, head: bool, extra_env: Optional[dict[str, str]] = None) -> Node:
        index = len(self.nodes)
        # Short, under /tmp: Ray's unix socket paths below it must stay within 107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"grc{index}-", dir="/tmp"))
        log_path = self.log_dir / f"node{index}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(self._command(head, temp_dir), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=temp_dir, env={**self.environment(temp_dir), **(extra_env or {})},
                                    start_new_session=True)
        node = Node(index, proc, temp_dir, log_path)
        self.nodes.append(node)
        return node

    def _wait_for_port(self, port: int, node: Node) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self._check_running(node)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the Ray head's GCS is not listening on {port} after {self.start_timeout_s} s:\n"
                           f"{self.log_tail(node)}")

    def _check_running(self, node: Node) -> None:
        if node.proc.poll() is not None:
            raise RuntimeError(f"`ray start` of node {node.index} exited with {node.proc.returncode}:\n"
                               f"{self.log_tail(node)}")

    def start(self, workers: int, node_env: Optional[dict[int, dict[str, str]]] = None) -> "RayCluster":
        """Start the head, then `workers` worker nodes at once (node i, from 1, with `node_env[i]`
        added to its environment, which its workers inherit); return when all are alive."""
        try:
            head = self._spawn(head=True)
            self._wait_for_port(self.gcs_port, head)
            for index in range(1, workers + 1):
                self._spawn(head=False, extra_env=(node_env or {}).get(index))
            self.wait_for_nodes(1 + workers, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self) -> int:
        """Start one more worker node; return its index once the cluster counts exactly the
        nodes not killed as alive (so after any earlier `kill_node` has been reported too)."""
        node = self._spawn(head=False)
        self.wait_for_nodes(len(self.live_nodes()), self.start_timeout_s)
        return node.index

    def live_nodes(self) -> list[Node]:
        """The nodes started and not killed."""
        return [node for node in self.nodes if node.index not in self.killed]

    # ---- observing ------------------------------------------------------------------------

    def _alive(self, want: int, timeout_s: float) -> dict[str, float]:
        """Alive nodes, once they are `want` or after `timeout_s`; fails at once when a node
        this cluster did not kill has exited (a bad flag, a port taken)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.auth_env())
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            counter = subprocess.Popen([sys.executable, "-c", _ALIVE_NODES, self.address, str(want), str(timeout_s)],
                                       stdout=out, stderr=err, text=True, env=env)
            try:
                # The counter's own start-up (importing Ray, joining) comes on top of timeout_s.
                deadline = time.monotonic() + timeout_s + 120
                while counter.poll() is None:
                    for node in self.live_nodes():
                        self._check_running(node)
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"counting the nodes at {self.address} did not end")
                    time.sleep(0.2)
            finally:
                if counter.poll() is None:
                    counter.kill()
                    counter.wait()
            out.seek(0)
            err.seek(0)
            lines = [line for line in out.read().splitlines() if line.startswith("alive=")]
            if counter.returncode != 0 or not lines:
                raise RuntimeError(f"counting the nodes at {self.address} failed (exit {counter.returncode}):\n"
                                   f"{err.read()[-2000:]}")
        return json.loads(lines[-1].split("=", 1)[1])

    def alive_nodes(self) -> dict[str, float]:
        """The nodes the cluster counts alive now: Ray node id -> logical CPUs."""
        return self._alive(-1, 0.0)

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        """Return once the cluster counts exactly `count` alive nodes; fail after `timeout_s`."""
        for node in self.live_nodes():
            self._check_running(node)
        alive = len(self._alive(count, timeout_s))
        if alive != count:
            tails = "\n".join(f"--- node {n.index}:\n{self.log_tail(n, 800)}" for n in self.nodes)
            raise RuntimeError(f"{alive} alive nodes at {self.address} after {timeout_s} s, expected {count}\n{tails}")

    def log_tail(self, node: Node, chars: int = 3000) -> str:
        try:
            return node.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- losing and stopping ----------------------------------------------------------------

    def node_processes(self, node: Node) -> list:
        """The live processes of `node`: its group, and every process carrying its marker (the
        raylet starts each worker in a session of its own and renames it `ray::...`, so neither
        the group nor the command line finds a worker; the environment it inherits does)."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile, or not ours to read
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(proc.pid) == node.pgid or proc.environ().get(NODE_MARKER) == str(node.temp_dir):
                    found.append(proc)
        return found

    def _kill(self, node: Node) -> None:
        """SIGKILL every process of `node` until none is left (a worker being spawned meanwhile
        carries the marker too)."""
        import psutil

        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pgid, signal.SIGKILL)
        for _ in range(5):
            procs = self.node_processes(node)
            if not procs:
                break
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(procs, timeout=5)
        if node.proc.poll() is None:
            node.proc.wait(timeout=10)

    def kill_node(self, index: int) -> None:
        """A node loss: SIGKILL every process of node `index` (`ray start`, its raylet, object
        store, agents and the workers on it), with no chance to say goodbye."""
        node = self.nodes[index]
        self.killed.add(index)
        self._kill(node)

    def stop(self) -> None:
        """End every node: SIGTERM to each group, SIGKILL to every process of the node left
        after a short grace period; then remove the temp dirs and assert no process of the
        cluster remains."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes:
            self._kill(node)  # `ray start`'s children and the workers outlive its exit after SIGTERM
        remaining = {node.index: [p.pid for p in self.node_processes(node)] for node in self.nodes}
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        assert not any(remaining.values()), f"processes of the Ray cluster outlived its stop: {remaining}"


@pytest.fixture()
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """A head (no CPUs: it only hosts drivers) and two worker nodes of one logical CPU each."""
    cluster = RayCluster(tmp_path / "ray-nodes", head_cpus=0, worker_cpus=1).start(workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()  # asserts that no process of the cluster is left
