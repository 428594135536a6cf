"""A real `mlflow server` for tests: 127.0.0.1, a free port, a sqlite store in a tmp folder.

`MlflowServer.stop()` / `start()` take the server away and bring it back on the same port (an
outage as the client sees it: connections refused, then served again from the same store).
The server runs in its own process group, so stopping it ends exactly the processes it started
(the CLI, its uvicorn worker) by their group id and nothing else on the machine.

Use the module-scoped `mlflow_server` fixture (one server per test module: a start costs
10-40 s on 2 busy cores) or build an `MlflowServer` yourself.

`sqlite_store` is the embedded store without its set-up cost: MLflow's schema migrations take
5-20 s per fresh database here, so one empty migrated database is made per test process and
each test gets a copy of it as `<tmp_path>/mlflow.db`, with cwd at tmp_path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

from local_server import LocalServer


class MlflowServer(LocalServer):
    """One `mlflow server` process tree (the CLI, its uvicorn worker) with its store under `root`."""

    name = "mlflow server"
    stop_grace_s = 3.0  # an outage needs no graceful drain; SIGKILL follows

    def __init__(self, root: Path, port: int | None = None, start_timeout_s: float = 180.0) -> None:
        super().__init__(root, port, start_timeout_s)

    @property
    def uri(self) -> str:
        return self.base_url

    def ready_url(self) -> str:
        return f"{self.uri}/health"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_HTTP_REQUEST_MAX_RETRIES"}
        env.update({
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner process: faster start
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "PYTHONUNBUFFERED": "1",
        })
        return env


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_TEMPLATE_DB: Path | None = None  # per process: shared by every test module that imports this


def template_db(base: Path) -> Path:
    """An empty MLflow sqlite database with the schema migrated (made once per process)."""
    global _TEMPLATE_DB
    if _TEMPLATE_DB is None or not _TEMPLATE_DB.is_file():
        from mlflow import MlflowClient

        folder = Path(base) / "mlflow-template"
        folder.mkdir(parents=True, exist_ok=True)
        db = folder / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)  # creates and migrates
        _TEMPLATE_DB = db
    return _TEMPLATE_DB


@pytest.fixture()
def sqlite_store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path holding a ready `mlflow.db`, so the default tracking URI points at it."""
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
