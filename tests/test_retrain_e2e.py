"""End to end: `ganray retrain` submitted as Ray jobs to a real local Ray head, checked in the registry.

The head is started with the venv's `ray start --head` (dashboard bound to 127.0.0.1, which serves
the Jobs API) in its own short `--temp-dir` and its own session, on free ports, so it never meets
the session-scoped `ray_session` cluster of the other tests; this test never calls `ray.init`.
Teardown stops exactly the processes this head started: those whose command line names its
temp dir, and their descendants (the workers, the job supervisor, the job itself). `ray stop`
would stop every Ray on the machine and is not used.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from helpers import free_ports, processes_of
from test_retrain import BASE, NAME, WRECK

VENV_BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def stop_processes(temp_dir: str) -> None:
    import psutil

    procs = processes_of(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive + processes_of(temp_dir):  # and anything respawned meanwhile
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture()
def ray_head(tmp_path) -> Iterator[tuple[str, str]]:
    """A local Ray head with the dashboard (Jobs API) on 127.0.0.1 and Ray token auth (Ray's other
    servers listen on every interface); yields (the dashboard URL, the cluster's token)."""
    # Short: Ray's unix socket paths under the temp dir must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="gr-e2e-", dir="/tmp")
    gcs, dash, agent_http, agent_grpc, metrics, env_agent, client_srv, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    token = secrets.token_hex(32)  # the jobs inherit it from the head, never through runtime_env
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
                "OMP_NUM_THREADS": "1"})
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
           f"--ray-client-server-port={client_srv}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--object-store-memory=100000000"]
    log_path = tmp_path / "ray-start.log"
    try:
        with open(log_path, "w") as log:
            # Its own session: a Ctrl-C of pytest does not reach the head, teardown stops it.
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=240,
                                  start_new_session=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            pytest.fail(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
        yield f"http://127.0.0.1:{dash}", token
    finally:
        stop_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_and_wait(client, workdir: Path, db: Path, *args: str, timeout_s: float = 420) -> tuple[str, dict[str, str]]:
    """Submit `ganray retrain ARGS` as a Ray job; wait for it; (status, key=value lines of its log)."""
    entrypoint = " ".join([str(VENV_BIN / "ganray"), "retrain", "retrain.yaml", "--model-name", NAME,
                           "--no-progress", *args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(workdir),
        "env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}",
                     "OMP_NUM_THREADS": "1", "GANRAY_CACHE": str(db.parent / "cache")}})
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while not any(status.endswith(t) for t in TERMINAL):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    logs = client.get_job_logs(job_id)
    lines = dict(m.groups() for m in map(re.compile(r"^([a-z_]+)=(.*)$").match, logs.splitlines()) if m)
    assert status.endswith("SUCCEEDED"), f"job {job_id} {status}:\n{logs[-3000:]}"
    return status, lines


@pytest.mark.slow
def test_retrain_as_ray_jobs(ray_head, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "retrain.yaml").write_text(yaml.safe_dump(BASE))
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    registry = MlflowClient(f"sqlite:///{db}")
    registry.search_experiments()  # one process creates the schema, before any job touches it
    registry.search_registered_models()
    url, token = ray_head
    with pytest.raises(Exception, match="(?i)auth|token|401|403"):  # the Jobs API is code execution: no token, no entry
        JobSubmissionClient(url).list_jobs()
    jobs = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})

    _, first = submit_and_wait(jobs, workdir, db, "--schedule-key", "2026-11-26T03:00")
    assert first["decision"] == "promoted" and first["version"] == "1"
    model = registry.get_registered_model(NAME)
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    assert registry.get_model_version(NAME, "1").run_id == first["run_id"]
    experiments = [e.experiment_id for e in registry.search_experiments()]
    runs = len(registry.search_runs(experiments))

    # The CronJob fires the same tick again: nothing is trained, the earlier decision is reported.
    _, again = submit_and_wait(jobs, workdir, db, "--schedule-key", "2026-11-26T03:00")
    assert again["decision"] == "skipped" and again["previous_decision"] == "promoted"
    assert again["run_id"] == first["run_id"]
    assert len(registry.search_runs(experiments)) == runs
    assert [str(v.version) for v in registry.search_model_versions(f"name='{NAME}'")] == ["1"]

    # The next tick makes a worse challenger: it is registered, but the champion stays.
    _, worse = submit_and_wait(jobs, workdir, db, "--schedule-key", "2026-11-27T03:00", *WRECK)
    assert worse["decision"] == "kept" and worse["version"] == "2"
    aliases = {k: str(v) for k, v in registry.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": "1", "challenger": "2"}
    assert registry.get_model_version(NAME, "2").tags["ganray.retrain.decision"] == "kept"
    assert not registry.search_registered_models(f"name = '{NAME}.retrain-lock'")
