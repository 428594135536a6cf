"""Issue 21's long scenarios on real `ray start` clusters on this host, with their timings.

Not part of CI (it takes about a quarter of an hour). Each scenario starts its own cluster
(tests/ray_cluster.py: a head with no CPUs and worker nodes of one CPU, Ray's default health
checks unless `--fast-health-checks`), runs `ganray train` as a subprocess against it and
timestamps every line the job prints, while this script watches the cluster as a Ray driver of
its own (when Ray reports a node dead, when a new one is alive):

- `elastic`: replicated, 2 workers, `min_workers=1`, STRICT_SPREAD, gloo. The worker node of
  replica 1 is SIGKILLed while that replica is parked mid-round (`GANRAY_FAULT_TEST_HOLD_AT_ROUND`),
  no node replaces it for `--replace-after-s` (90), then one joins.
- `recreate`: the same job without `min_workers` (today's path: every worker recreated at the
  full size once a node replaces the lost one), a node joining after `--recreate-replace-after-s` (20).
- `split`: 1 G + 2 D, `min_discriminators=1`, three worker nodes; the node of discriminator 1 is
  killed, a new node joins after `--replace-after-s`.

Prints, per scenario: seconds from the kill to Ray reporting the node dead, to the job training
again, from the new node being alive to the grown (or recreated) world, the job's images_seen,
final evaluation, `topology/workers` as it changed, restarts and resizes. Usage:

    .venv/bin/python scripts/elastic_acceptance.py [--scenarios elastic,recreate,split] [--total-kimg 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import RayCluster  # noqa: E402 - tests/ is not a package

GANRAY = Path(sys.executable).with_name("ganray")
HOLD_ROUND = 500  # after the first metric point (sync_kimg 20 = 312 rounds of 64)


class Job:
    """`ganray train` as a subprocess; every stderr line kept with the time it arrived."""

    def __init__(self, config: Path, env: dict[str, str], cwd: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([str(GANRAY), "train", str(config), "--no-progress"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.stdout = ""
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))

    def first(self, text: str, after: float = 0.0) -> Optional[float]:
        return next((t for t, line in list(self.lines) if text in line and t >= after), None)

    def wait_for(self, text: str, timeout_s: float, after: float = 0.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.first(text, after)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(line for _, line in self.lines[-30:])
        raise RuntimeError(f"no '{text}' from the job within {timeout_s} s:\n{tail}")

    def finish(self, timeout_s: float) -> dict[str, str]:
        out, _ = self.proc.communicate(timeout=timeout_s)
        if self.proc.returncode != 0:
            tail = "\n".join(line for _, line in self.lines[-30:])
            raise RuntimeError(f"the job failed (exit {self.proc.returncode}):\n{tail}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def watch_nodes(address: str, env: dict[str, str]) -> subprocess.Popen:
    """A driver of its own that prints `<monotonic time> <alive node count>` on every change."""
    code = ("import ray, sys, time\nray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)\n"
            "last = None\nwhile True:\n    n = sum(1 for x in ray.nodes() if x['Alive'])\n"
            "    if n != last:\n        print(time.monotonic(), n, flush=True); last = n\n    time.sleep(0.1)\n")
    return subprocess.Popen([sys.executable, "-c", code, address], env=env, stdout=subprocess.PIPE, text=True, bufsize=1)


def node_changes(watcher: subprocess.Popen, out: list[tuple[float, int]]) -> None:
    assert watcher.stdout is not None
    for line in watcher.stdout:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():  # Ray's own start-up lines go past too
            out.append((float(parts[0]), int(parts[1])))


def job_config(tmp: Path, kind: str, total_kimg: float) -> Path:
    tree = yaml.safe_load((REPO / "configs/ring8.yaml").read_text())
    tree["schedule"]["total_kimg"] = total_kimg
    tree["schedule"]["lr_decay_kimg"] = total_kimg
    tree["schedule"]["checkpoint_kimg"] = total_kimg
    tree["resources"] = {"strategy": "STRICT_SPREAD", "collective": "gloo", "cpus_per_worker": 1,
                         "threads_per_worker": 1, "connect_timeout_s": 30, "placement_timeout_s": 120}
    tree["fault"] = {"snapshot_rounds": 50, "capacity_wait_s": 600}
    if kind == "elastic":
        tree["topology"] = {"kind": "replicated", "num_workers": 2, "min_workers": 1}
    elif kind == "recreate":
        tree["topology"] = {"kind": "replicated", "num_workers": 2}
    else:
        tree["topology"] = {"kind": "split", "num_generators": 1, "num_discriminators": 2, "min_discriminators": 1}
    path = tmp / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_scenario(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from mlflow import MlflowClient

    from ganray.workers.replica import FAULT_TEST_HOLD_ENV

    tmp = Path(tempfile.mkdtemp(prefix=f"ganray-accept-{kind}-"))
    flag = tmp / "held"
    health = {} if not args.fast_health_checks else {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    kwargs: dict[str, Any] = {"health_check_period_ms": None, "health_check_failure_threshold": None, **health}
    cluster = RayCluster(tmp / "nodes", head_cpus=0, worker_cpus=1, **kwargs)
    workers = 3 if kind == "split" else 2
    hold = {} if kind == "split" else {2: {FAULT_TEST_HOLD_ENV: f"{HOLD_ROUND}:{flag}"}}
    cluster.start(workers=workers, node_env=hold)
    watcher = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update({"RAY_ADDRESS": cluster.address, **cluster.auth_env(), "OMP_NUM_THREADS": "1",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"})
        changes: list[tuple[float, int]] = []
        watcher = watch_nodes(cluster.address, env)
        threading.Thread(target=node_changes, args=(watcher, changes), daemon=True).start()
        job = Job(job_config(tmp, kind, args.total_kimg), env, tmp)
        if kind == "split":
            job.wait_for("workers:", 300)
            wait_for_first_metric_point(tmp / "mlflow.db", job, 600)  # so topology/workers reads 3 first
            victim = node_of_discriminator_1(job, cluster, env)
        else:
            deadline = time.monotonic() + 300
            while not flag.exists():
                if time.monotonic() > deadline or job.proc.poll() is not None:
                    raise RuntimeError("replica 1 never parked")
                time.sleep(0.05)
            victim = 2
        killed_at = time.monotonic()
        cluster.kill_node(victim)
        wait = args.recreate_replace_after_s if kind == "recreate" else args.replace_after_s
        if kind == "recreate":  # today's path trains again only once a node replaces the lost one
            time.sleep(max(0.0, killed_at + wait - time.monotonic()))
            cluster.add_node()
            training_again = job.wait_for("workers recreated", 900, after=killed_at)
        else:
            training_again = job.wait_for("training on the survivors", 900, after=killed_at)
            time.sleep(max(0.0, killed_at + wait - time.monotonic()))
            cluster.add_node()
        joined_at = next((t for t, n in changes if t >= killed_at + wait and n == workers + 1), time.monotonic())
        if kind == "recreate":
            grown_at: Optional[float] = training_again  # the recreate path trains again only once the node is there
        else:
            try:
                grown_at = job.wait_for("elastic grow", 900, after=killed_at)
            except RuntimeError as missed:  # the job ended first: a miss, reported as one
                print(f"no grow: {str(missed).splitlines()[0]}", file=sys.stderr)
                grown_at = None
        try:
            printed = job.finish(3600)
        finally:
            if args.out:  # the job's console, each line with its time since the kill
                log = args.out.with_name(f"{args.out.stem}-{kind}.log")
                log.write_text("".join(f"{t - killed_at:+8.1f} s  {line}\n" for t, line in job.lines))
        reported = next((t for t, n in changes if t >= killed_at and n == workers), None)
    finally:
        if watcher is not None:
            watcher.kill()
        cluster.stop()
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(printed["run_id"])
    history = sorted(client.get_metric_history(run.info.run_id, "topology/workers"), key=lambda m: (m.step, m.timestamp))
    sizes = [int(m.value) for m in history]
    result = {
        "scenario": kind, "total_kimg": args.total_kimg,
        "kill_to_ray_reports_dead_s": None if reported is None else round(reported - killed_at, 1),
        "kill_to_training_again_s": round(training_again - killed_at, 1),
        "ray_reports_dead_to_training_again_s": None if reported is None else round(training_again - reported, 1),
        "node_wait_s": wait,
        "new_node_alive_to_full_world_s": None if grown_at is None else round(grown_at - joined_at, 1),
        "images_seen": int(printed["images_seen"]), "wall_s": float(printed["wall_s"]),
        "eval": {k: float(v) for k, v in printed.items() if k.startswith("eval/")},
        "topology_workers": [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]],
        "restarts": run.data.tags.get("ganray.fault.restarts"), "resizes": run.data.tags.get("ganray.fault.resizes"),
        "nodes_with_system_metrics": len({n.split("/")[1] for n in run.data.metrics
                                          if n.startswith("system/") and n.count("/") == 2
                                          and n.endswith("/cpu_utilization_percentage")}),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def wait_for_first_metric_point(store: Path, job: Job, timeout_s: float) -> None:
    """Until the job has logged `topology/workers` once (read from its sqlite store directly:
    the run id is printed only at the end)."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.proc.poll() is None:
        try:
            with sqlite3.connect(store) as db:
                if db.execute("select count(*) from metrics where key = 'topology/workers'").fetchone()[0]:
                    return
        except sqlite3.Error:  # the store is still being created
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no metric point from the job within {timeout_s:g} s")


def node_of_discriminator_1(job: Job, cluster: RayCluster, env: dict[str, str]) -> int:
    """The index of the cluster node that hosts discriminator 1 (from the job's `workers:` line):
    a node's object store socket lives under its temp dir, which names the cluster's node."""
    line = next(line for _, line in job.lines if "workers:" in line)
    node_id = line.split("discriminator 1 on node ")[1].split(",")[0].strip()
    code = ("import json, sys, ray\nray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)\n"
            "print(json.dumps({n['NodeID'][:12]: n.get('ObjectStoreSocketName', '') for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code, cluster.address], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    sockets = json.loads(out.strip().splitlines()[-1])
    for node in cluster.live_nodes():
        if sockets.get(node_id, "").startswith(str(node.temp_dir)):
            return node.index
    raise RuntimeError(f"no node of this cluster hosts {node_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="elastic,recreate,split")
    parser.add_argument("--total-kimg", type=float, default=3000.0)
    parser.add_argument("--replace-after-s", type=float, default=90.0)
    parser.add_argument("--recreate-replace-after-s", type=float, default=20.0)
    parser.add_argument("--fast-health-checks", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    results = []
    for kind in args.scenarios.split(","):
        print(f"== {kind}", file=sys.stderr, flush=True)
        result = run_scenario(kind, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
