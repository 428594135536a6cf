"""`ganray train` against a real multi-node cluster started with `ray start` (tests/ray_cluster.py):
a head and two worker nodes, each its own raylet, as a user runs them.

The job runs as the console script in a subprocess with `RAY_ADDRESS` (the test session's own
Ray instance stays untouched), `resources.collective=gloo` (the path ranks on different hosts
take) and `STRICT_SPREAD` (one replica per node). The head has no CPUs, so both replicas land on
the worker nodes; which nodes they ran on is read back from the run itself: the per-node system
metrics `system/<node>/...` name the Ray node of each worker.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import small_tree
from mlflow_server import template_db
from ray_cluster import RayCluster, ray_cluster  # noqa: F401 - the fixture

GANRAY = Path(sys.executable).with_name("ganray")
BATCH = 64
ROUNDS = 10
SYNC_ROUNDS = 2  # five metric points
# Bounds a hang, nothing else: the job takes a fraction of it even on 2 busy cores.
JOB_TIMEOUT_S = 300


def _job(tmp_path: Path) -> Path:
    tree = small_tree(topology={"kind": "replicated", "num_workers": 2},
                      schedule={"total_kimg": ROUNDS * BATCH / 1000, "batch_size": BATCH,
                                "sync_kimg": SYNC_ROUNDS * BATCH / 1000},
                      resources={"strategy": "STRICT_SPREAD", "collective": "gloo", "cpus_per_worker": 1,
                                 "connect_timeout_s": 30})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_replicated_job_spreads_over_two_nodes_with_gloo_and_leaves_the_cluster_up(
        ray_cluster: RayCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.job.node_metrics import short_node_id

    workers = {node_id for node_id, cpus in ray_cluster.alive_nodes().items() if cpus > 0}
    assert len(workers) == 2
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), db)  # no schema migrations here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"RAY_ADDRESS": ray_cluster.address, **ray_cluster.auth_env(), "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    job = subprocess.run([str(GANRAY), "train", str(_job(tmp_path)), "--no-progress"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stderr[-4000:]
    printed = dict(m.groups() for m in map(re.compile(r"^([a-z_/]+)=(.*)$").match, job.stdout.splitlines()) if m)
    assert int(printed["images_seen"]) == ROUNDS * BATCH  # what total_kimg implies

    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(printed["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ganray.allreduce"].startswith("gloo (2 ranks)"), run.data.tags["ganray.allreduce"]
    # One replica per worker node: the system metrics name exactly those two Ray nodes.
    cpu = {name.split("/")[1]: name for name in run.data.metrics
           if name.startswith("system/") and name.endswith("/cpu_utilization_percentage") and name.count("/") == 2}
    assert set(cpu) == {short_node_id(node_id) for node_id in workers}, (sorted(cpu), workers)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/D")]
    assert sorted(steps) == [BATCH * SYNC_ROUNDS * k for k in range(1, ROUNDS // SYNC_ROUNDS + 1)]
    for name in cpu.values():
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == sorted(steps), name

    # The job joined the cluster and left it running: every node is still there.
    assert len(ray_cluster.alive_nodes()) == 3
    assert all(node.proc.poll() is None for node in ray_cluster.nodes)


ELASTIC_ROUNDS = 1500
HOLD_ROUND = 40  # the lost node's replica parks mid-round here, its peer waiting in the reduce
SNAPSHOT_ROUNDS = 10


def _elastic_job(tmp_path: Path) -> Path:
    # A wider MLP than the first test's, so the 1-replica stretch lasts long enough for a node to
    # join and its newcomer to start; the job's length, not a timer, decides the test.
    tree = small_tree(topology={"kind": "replicated", "num_workers": 2, "min_workers": 1},
                      model={"hidden": 256, "depth": 3},
                      schedule={"total_kimg": ELASTIC_ROUNDS * BATCH / 1000, "batch_size": BATCH,
                                "sync_kimg": SNAPSHOT_ROUNDS * BATCH / 1000},
                      fault={"snapshot_rounds": SNAPSHOT_ROUNDS, "max_restarts": 0},
                      resources={"strategy": "STRICT_SPREAD", "collective": "gloo", "cpus_per_worker": 1,
                                 "connect_timeout_s": 30})
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _wait_for(predicate, what: str, job: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_elastic_job_trains_on_after_a_busy_node_is_lost_and_grows_back_when_a_node_joins(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow import MlflowClient

    from ganray.workers.replica import FAULT_TEST_HOLD_ENV

    flag = tmp_path / "held"
    cluster = RayCluster(tmp_path / "ray-nodes", head_cpus=0, worker_cpus=1)
    cluster.start(workers=2, node_env={2: {FAULT_TEST_HOLD_ENV: f"{HOLD_ROUND}:{flag}"}})
    job = None
    try:
        db = tmp_path / "mlflow.db"
        shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), db)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update({"RAY_ADDRESS": cluster.address, **cluster.auth_env(), "OMP_NUM_THREADS": "1",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
        log = tmp_path / "job.log"
        with open(log, "w") as err, open(tmp_path / "job.out", "w") as out:
            job = subprocess.Popen([str(GANRAY), "train", str(_elastic_job(tmp_path)), "--no-progress"],
                                   cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
        # Node 2's replica parks inside a chunk, mid-round; the node is lost with it.
        _wait_for(flag.exists, "hold of node 2's replica", job, log)
        cluster.kill_node(2)
        _wait_for(lambda: "elastic shrink: 2 -> 1" in log.read_text(), "shrink onto the survivor", job, log)
        cluster.add_node()
        _wait_for(lambda: "elastic grow: 1 -> 2" in log.read_text(), "grow back to 2", job, log)
        assert job.wait(timeout=JOB_TIMEOUT_S) == 0, log.read_text()[-4000:]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        cluster.stop()

    printed = dict(line.split("=", 1) for line in (tmp_path / "job.out").read_text().splitlines() if "=" in line)
    assert int(printed["images_seen"]) == ELASTIC_ROUNDS * BATCH  # what total_kimg implies
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(printed["run_id"])
    assert run.info.status == "FINISHED"
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "topology/workers"),
                                          key=lambda m: (m.step, m.timestamp))]
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 1, 2], sizes
    assert run.data.tags["ganray.fault.restarts"] == "0" and run.data.tags["ganray.fault.resizes"] == "2"
    # Three nodes hosted a worker: the two first and the one that joined.
    nodes = {name.split("/")[1] for name in run.data.metrics
             if name.startswith("system/") and name.endswith("/cpu_utilization_percentage") and name.count("/") == 2}
    assert len(nodes) == 3, sorted(nodes)
