"""A server process a test starts and stops itself: 127.0.0.1, a free port, its own process group.

Stopping ends exactly the processes it started (by their group id, which is the pid of the
command it ran: a CLI and any worker it forks) and nothing else on the machine, then waits until
the port is closed. `MlflowServer` (mlflow_server.py) and `S3Server` (s3_server.py) are the two
kinds; a subclass says what to run (`command`, `environment`) and how to tell it is ready
(`ready_url`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import free_port


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalServer:
    """One server process tree with its files under `root`; `base_url` is its http:// URL."""

    name = "server"
    log_name = "server.log"
    stop_grace_s = 5.0

    def __init__(self, root: Path, port: int | None = None, start_timeout_s: float = 60.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / self.log_name

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready_url(self) -> str:
        return self.base_url

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken; cannot start the {self.name} there")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         env=self.environment(), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url(), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not answering after {self.start_timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        """End the process group (SIGTERM, then SIGKILL for whatever is left) and wait until the
        port is closed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # a forked worker may outlive the command; it is in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
