"""A real S3-compatible server for tests: `moto_server` (moto in server mode) on 127.0.0.1 and a
free port, its state in memory, its log in a tmp folder.

The server runs in its own process group, so stopping it ends exactly the process it started
(by its group id, which is the server's pid) and nothing else on the machine. Use the
module-scoped `s3_server` fixture (one server per test module) or build an `S3Server` yourself.
Clients talk to it with dummy credentials (moto accepts any); `s3_env` gives the environment
variables an AWS client reads, pointed at this server and away from any real AWS config.
"""

from __future__ import annotations

import os
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


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("moto_server")  # the venv's console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moto.server"]


class S3Server:
    """One `moto_server` process; `endpoint` is its http:// URL."""

    def __init__(self, root: Path, port: int | None = None, start_timeout_s: float = 60.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, home: Path) -> dict[str, str]:
        """What an AWS client (boto3, pyarrow's S3FileSystem) needs to reach this server and no
        other: dummy keys, a region, the endpoint; config files under `home`, which do not exist,
        and no instance-metadata lookups (they wait for a timeout off a cloud machine)."""
        return {
            "AWS_ACCESS_KEY_ID": "ganray-test",
            "AWS_SECRET_ACCESS_KEY": "ganray-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken; cannot start the S3 test server there")
        cmd = [*_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_tail()}")
            try:  # moto's own API answers once the server routes requests
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server not answering after {self.start_timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        """End the server's process group (SIGTERM, then SIGKILL) and wait until the port is closed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group id is the pid of the server we started
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
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
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
