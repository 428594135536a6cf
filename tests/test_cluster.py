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
