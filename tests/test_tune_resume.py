"""`ganray tune --resume` of a search whose driver was killed while its trials ran.

The search runs as `ganray tune` subprocesses with their own local Ray (in a short RAY_TMPDIR, so
every process that Ray started can be found and stopped). The first driver is SIGKILLed, with its
whole process group, once Tune's saved experiment state records a finished trial and a running
one with a checkpoint whose MLflow run already holds points past that checkpoint. What the resume
must do (Tune's documented `Tuner.restore` semantics, as ganray uses them): finish the search,
leave finished trials alone, continue the running ones from their last checkpoint, and keep one
MLflow child run per trial, each holding the history an uninterrupted trial logs (no step twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from helpers import processes_of, small_tree
from mlflow_server import sqlite_store  # noqa: F401

GANRAY = Path(sys.executable).parent / "ganray"
SHORT_KIMG, LONG_KIMG = 1, 8
EVAL_KIMG = 0.5


def _kill_all(temp_dir: str, timeout_s: float = 30.0) -> None:
    """SIGKILL every process of the Ray instances under `temp_dir` until none is left."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while procs := processes_of(temp_dir, "RAY_TMPDIR"):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        assert time.monotonic() < deadline, f"Ray processes survive: {[p.pid for p in procs]}"


@pytest.fixture()
def ray_tmp() -> Iterator[str]:
    # Short: Ray's unix socket paths under it must stay within 107 characters.
    folder = tempfile.mkdtemp(prefix="gr-tr-", dir="/tmp")
    try:
        yield folder
    finally:
        _kill_all(folder)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _experiment_state(experiment: Path) -> dict[str, dict[str, Any]]:
    """Tune's saved view of each trial (what a restore starts from): status and last result."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, ValueError):  # caught while Tune rewrites it
        return {}
    out = {}
    for state_json, metadata_json in data["trial_data"]:
        state, metadata = json.loads(state_json), json.loads(metadata_json)
        out[state["trial_id"]] = {"status": state["status"], "last": metadata.get("last_result") or {}}
    return out


def _result_rows(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _children(client: Any, parent_run_id: str) -> dict[str, Any]:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    by_trial: dict[str, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags["ganray.trial_id"], []).append(run)
    assert all(len(v) == 1 for v in by_trial.values()), {k: len(v) for k, v in by_trial.items()}
    return {k: v[0] for k, v in by_trial.items()}


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_mid_search(sqlite_store: Path, ray_tmp: str) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.job.config import config_from_dict
    from ganray.orchestrator.job.trainer import Trainer

    root = sqlite_store
    tree = small_tree(schedule={"total_kimg": SHORT_KIMG, "batch_size": 64, "sync_kimg": 0.25},
                      eval={"every_kimg": EVAL_KIMG, "num_samples": 200}, resources={"num_cpus": 2})
    (root / "job.yaml").write_text(yaml.safe_dump(tree))
    # Two at a time: the short first trial finishes while the long second one still runs; the
    # third waits (or has just started) when the driver dies.
    (root / "search.yaml").write_text(yaml.safe_dump({
        "metric": "eval/kl", "max_concurrent_trials": 2, "name": "cut", "storage_path": str(root / "ray_results"),
        "space": {"schedule.total_kimg": {"grid": [SHORT_KIMG, LONG_KIMG, SHORT_KIMG]}}}))
    experiment = root / "ray_results" / "cut"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp,
                # Tune saves its experiment state at every step, not every 10 s: the kill point
                # is read from it, so the running trial is caught between two of its reports.
                "TUNE_GLOBAL_CHECKPOINT_S": "0"})
    cmd = [str(GANRAY), "tune", "job.yaml", "--search", "search.yaml"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

    def logged_past_its_checkpoint(last: dict[str, Any]) -> bool:
        steps = [m.step for m in client.get_metric_history(last["mlflow_run_id"], "kimg")]
        return max(steps, default=0) > last["images_seen"]

    def kill_point(trials: dict[str, dict[str, Any]]) -> bool:
        """A finished trial, and a running one whose run holds points its last checkpoint lacks."""
        return (any(t["status"] == "TERMINATED" for t in trials.values())
                and any(t["status"] == "RUNNING" and t["last"].get("checkpoint_dir_name")
                        and logged_past_its_checkpoint(t["last"]) for t in trials.values()))

    with open(root / "first.err", "w") as err:
        first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                 start_new_session=True)  # its own group: the kill takes its Ray along
    try:
        deadline = time.monotonic() + 240
        while True:
            if kill_point(seen := _experiment_state(experiment)):
                # Frozen, the driver saves no newer state: the one that made the kill point is the
                # one the restore reads.
                os.killpg(first.pid, signal.SIGSTOP)
                if kill_point(_experiment_state(experiment)):
                    break
                os.killpg(first.pid, signal.SIGCONT)
            assert first.poll() is None, f"the search ended first:\n{(root / 'first.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no kill point in time: {seen}"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        _kill_all(ray_tmp)  # trial workers that outlive their raylet, if any, go too
    parent_run_id = next(line.split("=", 1)[1] for line in first.stdout.read().splitlines()
                         if line.startswith("parent_run_id="))

    # What the restore starts from: the state Tune saved last before the kill.
    at_kill = _experiment_state(experiment)
    finished = {tid for tid, t in at_kill.items() if t["status"] == "TERMINATED"}
    running = {tid: t["last"] for tid, t in at_kill.items() if t["status"] == "RUNNING" and t["last"]}
    assert finished and any(logged_past_its_checkpoint(last) for last in running.values()), at_kill
    rows_before = _result_rows(experiment)
    children_before = _children(client, parent_run_id)
    finished_history = {tid: _history(client, children_before[tid].info.run_id) for tid in finished}

    resumed = subprocess.run([*cmd, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    values = dict(line.split("=", 1) for line in resumed.stdout.splitlines() if "=" in line)
    assert values["parent_run_id"] == parent_run_id and values["trials"] == "3" and "failed_trials" not in values

    after = _experiment_state(experiment)
    assert len(after) == 3 and all(t["status"] == "TERMINATED" for t in after.values()), after
    rows = _result_rows(experiment)
    children = _children(client, parent_run_id)
    assert set(children) == set(after)  # one child run per trial: the killed trials' runs continued
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert client.get_run(parent_run_id).info.status == "FINISHED"
    for tid in finished:  # not rerun: neither Tune nor MLflow heard from them again
        assert rows[tid] == rows_before[tid]
        assert _history(client, children[tid].info.run_id) == finished_history[tid]
    for tid, last in running.items():
        # Its first report after the restore is the next evaluation after the checkpoint Tune had.
        (row,) = [r for r in rows[tid] if "restored_from" in r]
        assert row["restored_from"] == tid and row["restored_kimg"] * 1000 == pytest.approx(last["images_seen"])
        assert row["training_iteration"] == last["training_iteration"] + 1
        assert 0 < row["images_seen"] - last["images_seen"] <= EVAL_KIMG * 1000 + 64

    # Each child run holds what an uninterrupted `ganray train` of its trial's config logs: every
    # point once, the same values (a resumed trial continued the very state it had reached).
    keys = ("loss/D", "loss/G", "eval/kl", "eval/hq")
    for kimg in (SHORT_KIMG, LONG_KIMG):
        config = config_from_dict({**tree, "schedule": {**tree["schedule"], "total_kimg": kimg}})
        reference = _history(client, Trainer(config, progress=False).run().run_id)
        trials = [tid for tid, t in after.items() if t["last"]["config"]["schedule.total_kimg"] == kimg]
        assert trials
        for tid in trials:
            history = _history(client, children[tid].info.run_id)
            assert {k: history[k] for k in keys} == {k: reference[k] for k in keys}, tid
