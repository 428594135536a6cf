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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from helpers import free_port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """One `mlflow server` process tree with its store under `root`."""

    def __init__(self, root: Path, port: int | None = None, start_timeout_s: float = 180.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_HTTP_REQUEST_MAX_RETRIES"}
        env.update({
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner process: faster start
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken; cannot start the MLflow test server there")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         env=self._env(), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.start_timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        """End the server's process group (SIGTERM, then SIGKILL) and wait until the port is closed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group id is the pid of the CLI we started
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=3)  # an outage needs no graceful drain; SIGKILL follows
            except subprocess.TimeoutExpired:
                pass
        try:  # the uvicorn worker may outlive the CLI; it is in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


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
