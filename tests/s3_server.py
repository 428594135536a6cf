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
import sys
from pathlib import Path
from typing import Iterator

import pytest

from local_server import LocalServer


def _server_command() -> list[str]:
    script = Path(sys.executable).with_name("moto_server")  # the venv's console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moto.server"]


class S3Server(LocalServer):
    """One `moto_server` process; `endpoint` is its http:// URL."""

    name = "moto_server"
    log_name = "moto.log"

    @property
    def endpoint(self) -> str:
        return self.base_url

    def command(self) -> list[str]:
        return [*_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"  # moto's own API answers once the server routes requests

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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
