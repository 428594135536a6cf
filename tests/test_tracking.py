"""MLflow tracking: URI resolution, store preparation, and a run logger that survives outages."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from helpers import free_port, small_config
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.tracking.run_logger import RunLogger
from ganray.orchestrator.tracking.store import default_artifact_root, prepare_store, redact, resolve_tracking_uri, run_tags

from mlflow_server import mlflow_server, sqlite_store  # noqa: F401


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted(((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)))


# ---------------------------------------------------------------------------------------------
# URIs


def test_resolve_order_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri("http://cli:1", "http://cfg:2") == "http://cli:1"
    assert resolve_tracking_uri(None, "http://cfg:2") == "http://cfg:2"
    assert resolve_tracking_uri(None, None) == "http://env-host:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/x.db", None) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", None) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("file:store", None) == (tmp_path.resolve() / "store").as_uri()
    assert resolve_tracking_uri("./store", None) == (tmp_path.resolve() / "store").as_uri()
    assert default_artifact_root() == str(tmp_path.resolve() / "mlartifacts")


def test_redact_strips_credentials() -> None:
    assert redact("https://alice:s3cret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert redact("http://token@host/") == "http://host/"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert redact("see postgresql://u:p@db/mlflow and http://h") == "see postgresql://db/mlflow and http://h"


# ---------------------------------------------------------------------------------------------
# Store


def test_prepare_store_creates_the_database_once(mlflow_store: Path) -> None:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(None, None)
    db = mlflow_store / "mlflow.db"
    assert not db.exists()
    exp_id = prepare_store(uri, "ganray-test")
    assert db.is_file()
    client = MlflowClient(uri)
    run = client.create_run(exp_id)
    assert prepare_store(uri, "ganray-test") == exp_id  # reopened, not recreated
    assert client.get_run(run.info.run_id).info.experiment_id == exp_id
    location = client.get_experiment(exp_id).artifact_location
    assert location.startswith((mlflow_store.resolve() / "mlartifacts").as_uri())
    assert not (mlflow_store / "mlruns").exists()


def test_unreachable_server_fails_fast_with_one_line() -> None:
    port = free_port()  # nothing listens there
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        prepare_store(f"http://bob:pw123@127.0.0.1:{port}", "x")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"http://127.0.0.1:{port}" in message and "--tracking-uri" in message
    assert "pw123" not in message and "\n" not in message
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before  # the probe's setting did not leak


# ---------------------------------------------------------------------------------------------
# Run logger on the embedded store


def test_logger_logs_and_reopens_a_run(sqlite_store: Path) -> None:
    config = small_config()
    uri = resolve_tracking_uri(None, None)
    exp_id = prepare_store(uri, "logger")
    tags = run_tags(config)
    assert tags["ganray.topology"] == "local" and tags["ganray.data"] == "grid25"
    logger = RunLogger(uri, exp_id, run_name="first", tags=tags)
    logger.log_params({**config.flat(), "long": "x" * 900})
    logger.set_tags({"ganray.data_hash": "f00d"})
    for step in range(0, 500, 100):
        logger.log_metrics({"loss/D": step / 100, "loss/G": -step / 100}, step=step)
    assert logger.close() is True

    run = logger.client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["schedule.batch_size"] == "64"
    assert run.data.params["schedule.betas"] == "[0.5, 0.99]"
    assert len(run.data.params["long"]) == 500
    assert run.data.tags["ganray.data_hash"] == "f00d" and run.data.tags["ganray.config_hash"] == config.config_hash()
    assert [s for s, _, _ in _history(logger.client, logger.run_id, "loss/D")] == [0, 100, 200, 300, 400]

    # Resume: same run, stored steps not logged again, a changed param kept as a tag.
    again = RunLogger(uri, exp_id, run_id=logger.run_id)
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    assert again.max_logged_step("loss/D") == 400 and again.max_logged_step("nope") is None
    again.skip_steps_upto(again.max_logged_step("loss/D"))
    again.log_params({"schedule.batch_size": 64, "schedule.total_kimg": 99})
    for step in range(300, 700, 100):
        again.log_metrics({"loss/D": 1.0}, step=step)
    again.close("KILLED")
    run = again.client.get_run(again.run_id)
    assert run.info.status == "KILLED"
    assert [s for s, _, _ in _history(again.client, again.run_id, "loss/D")] == [0, 100, 200, 300, 400, 500, 600]
    assert run.data.params["schedule.total_kimg"] == "4.0"
    assert run.data.tags["ganray.resumed.schedule.total_kimg"] == "99"


def test_metrics_arrive_complete_and_in_order(sqlite_store: Path) -> None:
    uri = resolve_tracking_uri(None, None)
    logger = RunLogger(uri, prepare_store(uri, "order"))
    start = time.monotonic()
    for step in range(2500):
        logger.log_metrics({"a": float(step), "b": float(-step)}, step=step)
    assert time.monotonic() - start < 2.0  # enqueue only
    assert logger.flush(timeout=120)
    for key, sign in (("a", 1), ("b", -1)):
        points = _history(logger.client, logger.run_id, key)
        assert [s for s, _, _ in points] == list(range(2500))
        assert all(v == sign * s for s, v, _ in points)
        stamps = [t for _, _, t in points]
        assert stamps == sorted(stamps)  # taken at enqueue time, in call order
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.scatter([0, 1], [1, 0])
    figure = logger.log_figure(fig, "samples/scatter-000001.png")
    plt.close(fig)  # rendered at the call: closing it right away is fine
    image = logger.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="samples", step=7)
    text = logger.log_text("hello", "notes/a.txt")
    assert figure.result(timeout=30) and image.result(timeout=30) and text.result(timeout=30)
    client, run_id = logger.client, logger.run_id
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/scatter-000001.png"]
    assert any("samples" in a.path for a in client.list_artifacts(run_id, "images"))
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/a.txt"]
    logger.close()
    assert logger.sent_points == 5000 and logger.dropped == 0


def test_full_buffer_drops_oldest_and_counts(sqlite_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = resolve_tracking_uri(None, None)
    logger = RunLogger(uri, prepare_store(uri, "bounded"), buffer_size=10)
    entered, release = threading.Event(), threading.Event()
    real_log_batch = logger.client.log_batch

    def stalled_log_batch(*args, **kwargs):  # the store hangs until released
        entered.set()
        release.wait(30)
        return real_log_batch(*args, **kwargs)

    logger.client.log_batch = stalled_log_batch  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="ganray.tracking")
    logger.log_metrics({"m": 0.0}, step=0)
    assert entered.wait(10)  # step 0 is in flight; everything below queues
    for step in range(1, 26):
        logger.log_metrics({"m": float(step)}, step=step)
    assert logger.dropped == 15 and logger.pending == 10
    release.set()
    assert logger.flush(timeout=60)
    steps = [s for s, _, _ in _history(logger.client, logger.run_id, "m")]
    assert steps == [0] + list(range(16, 26))  # the oldest queued points went first
    drop_warnings = [r.getMessage() for r in caplog.records if "buffer full" in r.getMessage()]
    assert drop_warnings and "1 dropped" in drop_warnings[0] and "10 dropped" in drop_warnings[-1]
    logger.close()


# ---------------------------------------------------------------------------------------------
# A real server: outage and secrets


def test_logger_survives_server_restart(mlflow_server, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    # MLflow's own HTTP retries (7, over minutes) are turned off so the logger's backoff is what
    # rides out the outage, quickly enough for a test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.WARNING, logger="ganray.tracking")
    logger = RunLogger(mlflow_server.uri, prepare_store(mlflow_server.uri, "outage"), max_backoff_s=0.5)
    for step in range(50):
        logger.log_metrics({"loss/D": float(step)}, step=step)
    assert logger.flush(timeout=60)

    mlflow_server.stop()
    start = time.monotonic()
    for step in range(50, 150):
        logger.log_metrics({"loss/D": float(step)}, step=step)
        time.sleep(0.005)
    assert time.monotonic() - start < 5  # training went on
    deadline = time.monotonic() + 30
    while not any("unreachable" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert not logger.flush(timeout=0.5)

    mlflow_server.start()
    assert logger.flush(timeout=120)
    assert logger.close() is True
    steps = [s for s, _, _ in _history(logger.client, logger.run_id, "loss/D")]
    assert steps == list(range(150)) and logger.dropped == 0
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_credentials_never_reach_params_tags_or_logs(mlflow_server, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    env_secret, uri_secret = "envS3cretValue", "uriS3cretValue"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env_secret)
    uri = f"http://alice:{uri_secret}@127.0.0.1:{mlflow_server.port}"
    caplog.set_level(logging.DEBUG)
    config = small_config(tracking={"uri": uri, "run_name": f"run-{env_secret}"})

    logger = RunLogger(uri, prepare_store(uri, "secrets"), run_name="secrets", tags=run_tags(config))
    logger.log_params(config.flat())
    logger.set_tags({"note": f"password is {env_secret}", "where": uri})
    logger.log_text(config.to_yaml(), "config.yaml")
    logger.log_metrics({"x": 1.0}, step=1)
    assert logger.close() is True  # MLflow prints the run URL here

    with pytest.raises(TrackingError) as err:  # a dead server with credentials in its URI
        prepare_store(f"http://alice:{uri_secret}@127.0.0.1:{free_port()}", "x")

    run = MlflowClient(mlflow_server.uri).get_run(logger.run_id)
    assert run.data.params["tracking.uri"] == f"http://127.0.0.1:{mlflow_server.port}"
    text = MlflowClient(mlflow_server.uri).download_artifacts(logger.run_id, "config.yaml")
    out = capsys.readouterr()
    seen = " ".join([*run.data.params.values(), *run.data.tags.values(), Path(text).read_text(), str(err.value),
                     out.out, out.err, caplog.text])
    assert "127.0.0.1" in seen  # the checks below look at real text
    assert env_secret not in seen and uri_secret not in seen


# ---------------------------------------------------------------------------------------------
# System metrics


def _metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_short_run_logs_system_metrics_at_the_training_steps(sqlite_store: Path) -> None:
    from mlflow import MlflowClient

    from ganray.workers.system_metrics import NAMES
    from ganray.orchestrator.job.trainer import Trainer

    config = small_config(schedule={"total_kimg": 2})
    assert config.tracking.log_system_metrics is True  # on by default
    result = Trainer(config, progress=False).run()
    client = MlflowClient(resolve_tracking_uri(None, None))
    run = client.get_run(result.run_id)
    loss_steps = _metric_steps(client, result.run_id, "loss/D")
    assert loss_steps and loss_steps[-1] == result.images_seen
    for name in (f"system/{n}" for n in NAMES):  # the coordinator's machine: MLflow's single-node names
        assert name in run.data.metrics, name
        assert _metric_steps(client, result.run_id, name) == loss_steps, name
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_percentage",
                 "system/disk_usage_percentage"):
        assert 0.0 <= run.data.metrics[name] <= 100.0
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # `local` trains on that machine alone: no per-node series (`system/<node>/...`).
    assert not [k for k in run.data.metrics if k.startswith("system/") and k.count("/") > 1]


def test_system_metrics_off_logs_none(sqlite_store: Path) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.job.trainer import Trainer

    result = Trainer(small_config(schedule={"total_kimg": 1}, tracking={"log_system_metrics": False}),
                     progress=False).run()
    run = MlflowClient(resolve_tracking_uri(None, None)).get_run(result.run_id)
    assert "loss/D" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_system_metrics_without_psutil_are_empty(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import sys

    from ganray.workers.system_metrics import SystemMetrics

    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    caplog.set_level(logging.DEBUG, logger="ganray")
    sampler = SystemMetrics()
    assert not sampler.available and sampler.sample() == {}
    assert sum("psutil is not installed" in r.getMessage() for r in caplog.records) == 1
