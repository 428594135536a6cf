"""Driver-side faults: snapshots, divergence rollback, driver SIGKILL, SIGTERM, tracking outage.

In-process tests drive `Trainer` with a NaN-injecting dataset (an import-path loader written to
tmp_path). Subprocess tests run the real `ganray` console script against an embedded sqlite
store (or a real `mlflow server`) and hurt it: SIGKILL while a checkpoint upload is half done,
SIGTERM mid-run, the tracking server stopped for 30 s. Each is compared with one uninterrupted
in-process run of the same config: the metric histories must match to the bit (CPU, `local`).

The moment of each fault is controlled by a test-only `sitecustomize` module put on the
subprocess's PYTHONPATH (see `HOOKS`): ganray itself carries no test hooks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from ganray.orchestrator.job.config import config_from_dict
from ganray.orchestrator.job.engine import LocalEngine, make_engine
from ganray.orchestrator.job.fault import (ChunkClock, FaultError, SnapshotKeeper, WorkerLostError, is_worker_loss,
                                       plan_chunk)
from ganray.orchestrator.job.trainer import Trainer
from ganray.workers.stats import SKIPPED
from helpers import small_config, small_tree
from mlflow_server import MlflowServer, mlflow_server, sqlite_store, template_db  # noqa: F401

GANRAY = Path(sys.executable).with_name("ganray")

POISON_MODULE = '''
"""A 2D dataset whose train-split reads return NaN for a window of get() calls (fault tests)."""
import json
import numpy as np
from ganray.workers.data import TensorSource


class PoisonSource(TensorSource):
    def __init__(self, data, window):
        super().__init__("poison", data)
        self.calls, self.window = 0, window

    def get(self, indices):
        out = super().get(indices)
        if self.window[0] <= self.calls < self.window[1]:
            out = out.clone()
            out[0, 0] = float("nan")
        self.calls += 1
        return out


def load(cfg, seed, split):
    data = np.random.default_rng(seed).normal(size=(2048 if split == "train" else 256, 2)).astype("float32")
    if split != "train":
        return data
    with open(cfg["path"]) as fh:
        return PoisonSource(data, json.load(fh)["window"])
'''

HOOKS = '''
"""Test-only fault hooks for `ganray` subprocesses of tests/test_fault_driver.py (loaded by
Python's site machinery from PYTHONPATH; active only when GANRAY_TEST_MARKER is set).

GANRAY_TEST_HOLD_MANIFEST=kimg-NNNNNN  that checkpoint's parts upload, its manifest never does
GANRAY_TEST_PAUSE_AT=IMAGES            after the first chunk reaching IMAGES (and the hold, if
GANRAY_TEST_PAUSE_S=S                  any, has begun) write GANRAY_TEST_MARKER and sleep S
GANRAY_TEST_MARKER=PATH                seconds (0: forever, until the test kills the process)
"""
import os

if os.environ.get("GANRAY_TEST_MARKER"):
    import time
    from pathlib import Path

    from ganray.orchestrator.job import engine as _engine

    from ganray.orchestrator.tracking import run_logger as _tracking

    _hold = os.environ.get("GANRAY_TEST_HOLD_MANIFEST")
    _pause_at = int(os.environ.get("GANRAY_TEST_PAUSE_AT", "-1"))
    _pause_s = float(os.environ.get("GANRAY_TEST_PAUSE_S", "0"))
    _marker = Path(os.environ["GANRAY_TEST_MARKER"])
    _state = {"held": not _hold, "paused": False}
    _log_artifact, _run = _tracking.RunLogger.log_artifact, _engine.LocalEngine.run

    def _hold_manifest(self, local_path, artifact_path=None):
        if _hold and Path(local_path).name == "manifest.json" and str(artifact_path).endswith(_hold):
            _state["held"] = True
            while True:
                time.sleep(3600)
        return _log_artifact(self, local_path, artifact_path)

    def _pausing_run(self, n_rounds, stop_at_images=None):
        res = _run(self, n_rounds, stop_at_images)
        if not _state["paused"] and 0 <= _pause_at <= res.images_seen:
            _state["paused"] = True
            while not _state["held"]:
                time.sleep(0.05)
            _marker.write_text(str(res.images_seen))
            time.sleep(_pause_s if _pause_s > 0 else 10**6)
        return res

    _tracking.RunLogger.log_artifact = _hold_manifest
    _engine.LocalEngine.run = _pausing_run
'''


class Recording:
    """An engine wrapper that records every chunk (start round, result) for assertions."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.chunks: list[tuple[int, Any]] = []

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> Any:
        start = self._engine.run(0).round_index
        res = self._engine.run(n_rounds, stop_at_images)
        if n_rounds:
            self.chunks.append((start, res))
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _recording_factory(box: list[Recording]):
    def factory(config: Any) -> Recording:
        box.append(Recording(make_engine(config)))
        return box[-1]
    return factory


# ---------------------------------------------------------------------------------------------
# Snapshots and chunk planning


def test_plan_chunk_and_clock() -> None:
    assert plan_chunk(0, sync_rounds=16, snapshot_rounds=7, rounds_left=100, cap=1000) == 7
    assert plan_chunk(14, 16, 7, 100, 1000) == 2       # the sync boundary at 16 comes first
    assert plan_chunk(16, 16, 7, 3, 1000) == 3         # the end of the job
    assert plan_chunk(16, 16, 100, 100, 5) == 5        # the time cap
    clock = ChunkClock(grace_s=8.0)
    assert clock.cap() == 1                            # nothing measured yet: one round
    clock.observe(10, 0.1)
    assert clock.cap() == 200                          # 8 s * 0.25 / 0.01 s per round


def test_worker_loss_classification() -> None:
    class ActorDiedError(RuntimeError):
        pass

    wrapped = RuntimeError("task failed")
    wrapped.cause = ActorDiedError("the actor died")  # how RayTaskError keeps its cause
    assert is_worker_loss(WorkerLostError("x")) and is_worker_loss(TimeoutError("hung"))
    assert is_worker_loss(ActorDiedError("gone")) and is_worker_loss(wrapped)
    assert not is_worker_loss(RuntimeError("size mismatch")) and not is_worker_loss(ValueError("bad"))


def test_snapshot_restore_replays_identically() -> None:
    engine = LocalEngine(small_config())
    keeper = SnapshotKeeper(every_rounds=5)
    engine.run(5)
    assert keeper.due(5) and not keeper.due(6)
    snap = keeper.take(engine, 5, 5 * 64)
    assert not keeper.due(5) and isinstance(snap.handle, dict)  # local: a plain state kept in the driver
    first = engine.run(6).metrics["loss/D"]
    keeper.restore(engine)
    assert engine.run(0).round_index == 5
    assert engine.run(6).metrics["loss/D"] == first


def test_chunks_end_at_snapshot_boundaries_and_change_nothing() -> None:
    box: list[Recording] = []
    cfg = small_config(tracking={"enabled": False}, fault={"snapshot_rounds": 7})
    result = Trainer(cfg, progress=False, engine_factory=_recording_factory(box)).run()
    chunks = box[0].chunks
    assert sum(res.rounds for _, res in chunks) == result.rounds == 63
    for start, res in chunks:  # never across a snapshot boundary: at most 7 rounds to redo
        assert res.rounds <= 7 and start // 7 == (res.round_index - 1) // 7
    reference = Trainer(small_config(tracking={"enabled": False}, fault={"snapshot_rounds": 1000}),
                        progress=False).run()
    assert result.history == reference.history


# ---------------------------------------------------------------------------------------------
# Divergence


def _poison_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: tuple[int, int], **fault: Any):
    (tmp_path / "poison_data.py").write_text(POISON_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("poison_data", None)
    spec = tmp_path / "poison.json"
    spec.write_text(json.dumps({"window": list(window)}))
    return small_config(data={"name": "poison_data:load", "path": str(spec)},
                        fault={"snapshot_rounds": 10, "max_nonfinite": 3, "lr_backoff": 0.5, **fault})


def test_nan_skips_steps_then_rolls_back_with_lower_lr(sqlite_store: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="ganray")
    cfg = _poison_config(sqlite_store, monkeypatch, window=(25, 30))  # NaN real batches in rounds 25-29
    box: list[Recording] = []
    result = Trainer(cfg, progress=False, engine_factory=_recording_factory(box)).run()

    # The poisoned rounds skipped their D step (non-finite loss and gradient norm) ...
    seen = [(start + i, res.metrics[SKIPPED][i], res.metrics["grad_norm/D"][i])
            for start, res in box[0].chunks for i in range(res.rounds)]
    skipped = [r for r, s, _ in seen if s]
    assert skipped == [25, 26, 27, 28, 29]
    assert all(math.isnan(g) for _, s, g in seen if s)
    # ... then the loop rolled back to the snapshot at round 20 and redid 20-29 cleanly.
    starts = [start for start, _ in box[0].chunks]
    assert starts.count(20) == 2
    assert result.rounds == 63 and result.images_seen == 63 * 64
    assert len(result.history["loss/D"]) == 63 and sum(result.history[SKIPPED]) == 0
    assert all(math.isfinite(v) for v in result.history["loss/D"] + result.history["loss/G"])
    state = box[0].state()
    assert state["opt_D"]["param_groups"][0]["lr"] == pytest.approx(cfg.schedule.d_lr * 0.5)
    assert state["opt_G"]["param_groups"][0]["lr"] == pytest.approx(cfg.schedule.g_lr * 0.5)
    assert all(torch.isfinite(t).all() for t in state["D"].values())

    client = MlflowClient(f"sqlite:///{sqlite_store / 'mlflow.db'}")
    value = {k: [m.value for m in client.get_metric_history(result.run_id, k)]
             for k in ("fault/rollbacks", "fault/rounds_redone", "fault/lr_scale")}
    assert value == {"fault/rollbacks": [1.0], "fault/rounds_redone": [10.0], "fault/lr_scale": [0.5]}
    run = client.get_run(result.run_id)
    assert run.data.tags["ganray.fault.last_event"].startswith("rollback")
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss/D")]
    assert steps == [1024 * k for k in range(1, 4)] + [4032]  # one point per sync interval, none twice
    assert any("rolling back 10 rounds" in r.getMessage() for r in caplog.records)


def test_persistent_nan_stops_with_a_resumable_checkpoint(sqlite_store: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.job.checkpoint import latest_checkpoint, list_checkpoints

    cfg = _poison_config(sqlite_store, monkeypatch, window=(25, 10**9), max_restarts=1)
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(FaultError) as err:
        trainer.run()
    message = str(err.value)
    assert "\n" not in message and "diverged 3 times" in message and "lower schedule.g_lr" in message
    client = MlflowClient(f"sqlite:///{sqlite_store / 'mlflow.db'}")
    assert list_checkpoints(client, trainer.run_id) == ["checkpoints/kimg-000001"]
    state, meta = latest_checkpoint(client, trainer.run_id, sqlite_store / "dl")
    assert meta["images_seen"] == 20 * 64 and state["progress"]["rounds"] == 20  # the last good snapshot
    assert client.get_run(trainer.run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(trainer.run_id, "fault/rollbacks")] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# The console script under SIGKILL, SIGTERM and a tracking outage


BASE_TREE = small_tree(schedule={"total_kimg": 12, "checkpoint_kimg": 4, "sample_kimg": 1000},
                       eval={"every_kimg": 1000}, fault={"grace_s": 20})
TOTAL_IMAGES = 188 * 64  # ceil(12000 / 64) rounds


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The config file, a store, and an uninterrupted in-process run of it (the reference)."""
    import shutil

    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("fault-driver")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), root / "mlflow.db")
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(HOOKS)
    cfg = config_from_dict(BASE_TREE)
    (root / "job.yaml").write_text(cfg.to_yaml())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = Trainer(cfg, tracking_uri=uri, progress=False).run()
    assert result.images_seen == TOTAL_IMAGES
    return {"root": root, "uri": uri, "config": root / "job.yaml", "client": MlflowClient(uri),
            "reference": result.run_id}


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANRAY_TEST_")}
    env.update({"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _start(job: dict[str, Any], args: list[str], hooks: Optional[dict[str, str]] = None,
           uri: Optional[str] = None, extra_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    env = _env({**(extra_env or {}), **(hooks or {})})
    if hooks:
        env["PYTHONPATH"] = os.pathsep.join([str(job["root"] / "hooks"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [str(GANRAY), "train", str(job["config"]), "--no-progress", "--tracking-uri", uri or job["uri"], *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=job["root"], env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"ganray exited with {proc.returncode} before the fault point: {err[-3000:]}")
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout_s: float = 300.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _lines(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _assert_same_losses(job: dict[str, Any], client: Any, run_id: str) -> None:
    for key in ("loss/D", "loss/G"):
        got, want = _history(client, run_id, key), _history(job["client"], job["reference"], key)
        assert [s for s, _ in got] == [s for s, _ in want], key  # every point once, none lost
        assert got == want, key                                 # and bit-identical values


@pytest.mark.slow
def test_driver_sigkilled_during_checkpoint_upload_resumes_exactly(job: dict[str, Any]) -> None:
    from ganray.orchestrator.job.checkpoint import list_checkpoints

    marker = job["root"] / "killed.marker"
    proc = _start(job, [], hooks={"GANRAY_TEST_MARKER": str(marker), "GANRAY_TEST_HOLD_MANIFEST": "kimg-000008",
                                  "GANRAY_TEST_PAUSE_AT": "10240"})
    _wait_for(marker, proc)
    time.sleep(1.0)  # let the sender thread deliver what was queued (a driver dies with data in flight)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    run_id = _lines(out)["run_id"]
    client = job["client"]

    half = [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoints/kimg-000008")]
    assert "G.pt" in half and "manifest.json" not in half  # the parts landed, the manifest never did
    assert list_checkpoints(client, run_id) == ["checkpoints/kimg-000004"]
    logged_before = max(s for s, _ in _history(client, run_id, "loss/D"))

    out, err = _finish(_start(job, ["--resume", run_id]))
    assert _lines(out)["images_seen"] == str(TOTAL_IMAGES) and "stopped=early" not in out
    assert f"resumed run {run_id} at 4.1 kimg" in err  # from the last complete checkpoint
    assert logged_before < TOTAL_IMAGES                # the resumed process logged the rest
    _assert_same_losses(job, client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_checkpoints_exits_within_grace_and_resumes(job: dict[str, Any]) -> None:
    from ganray.orchestrator.job.checkpoint import latest_checkpoint

    marker = job["root"] / "term.marker"
    proc = _start(job, [], hooks={"GANRAY_TEST_MARKER": str(marker), "GANRAY_TEST_PAUSE_AT": "6144",
                                  "GANRAY_TEST_PAUSE_S": "3"})
    _wait_for(marker, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, err[-3000:]
    assert elapsed < BASE_TREE["fault"]["grace_s"], f"exit took {elapsed:.1f} s"
    lines = _lines(out)
    assert lines["stopped"] == "early" and lines["images_seen"] == "6144"
    run_id = lines["run_id"]
    client = job["client"]
    state, meta = latest_checkpoint(client, run_id, job["root"] / "term-ckpt")
    assert meta["images_seen"] == 6144 and state["progress"]["images_seen"] == 6144

    out, _ = _finish(_start(job, ["--resume", run_id]))
    assert _lines(out)["images_seen"] == str(TOTAL_IMAGES) and "stopped=early" not in out
    _assert_same_losses(job, client, run_id)


@pytest.mark.slow
def test_tracking_server_outage_loses_no_metric_point(job: dict[str, Any], mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    marker = job["root"] / "outage.marker"
    proc = _start(job, [], uri=mlflow_server.uri,
                  hooks={"GANRAY_TEST_MARKER": str(marker), "GANRAY_TEST_PAUSE_AT": "2048", "GANRAY_TEST_PAUSE_S": "2"},
                  extra_env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    _wait_for(marker, proc)
    mlflow_server.stop()
    t_down = time.monotonic()
    time.sleep(30)
    assert proc.poll() is None  # training does not die with the tracking server
    mlflow_server.start()
    outage = time.monotonic() - t_down
    out, err = _finish(proc)
    assert _lines(out)["images_seen"] == str(TOTAL_IMAGES)
    assert "unreachable" in err and "reachable again" in err
    assert "dropping" not in err and "dropped" not in err  # the buffer bound was never hit
    client = MlflowClient(mlflow_server.uri)
    run_id = _lines(out)["run_id"]
    _assert_same_losses(job, client, run_id)
    reference = job["client"].get_run(job["reference"]).data.metrics
    for key in reference:
        if key.startswith(("loss/", "D/", "grad_norm/", "perf/", "time/", "kimg")):
            want = [s for s, _ in _history(job["client"], job["reference"], key)]
            assert [s for s, _ in _history(client, run_id, key)] == want, key
    assert outage >= 30
