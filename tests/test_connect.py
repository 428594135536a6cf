"""An unreachable Ray address ends `train`, `tune` and `retrain` in one line, bounded by
`resources.connect_timeout_s`, with nothing written to the tracking store.

Each command runs as the console script in a subprocess (the test session's own Ray instance
would make the commands skip the probe), all six at once so the suite pays for one start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import free_port
from ganray.orchestrator.job.placement import _host_port, explicit_address
from ganray.orchestrator.job.config import config_from_dict

GANRAY = Path(sys.executable).with_name("ganray")
CONNECT_TIMEOUT_S = 3


def test_explicit_addresses_and_their_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    resources = config_from_dict({}).resources
    assert explicit_address(resources) is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert explicit_address(resources) is None
    monkeypatch.setenv("RAY_ADDRESS", " 10.0.0.5:6379 ")
    assert explicit_address(resources) == ("10.0.0.5:6379", "RAY_ADDRESS")
    resources.ray_address = "ray://head"
    assert explicit_address(resources) == ("ray://head", "resources.ray_address")
    assert _host_port("ray://head") == ("head", 10001)
    assert _host_port("ray://head:2000") == ("head", 2000)
    assert _host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    assert _host_port("auto") is None  # Ray finds the local cluster itself
    assert _host_port("head:port") == ("head", -1)


@pytest.mark.slow
def test_an_unreachable_address_stops_every_command_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"topology": {"kind": "replicated", "num_workers": 1},
                                      "schedule": {"total_kimg": 1}, "eval": {"every_kimg": 1}}))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"name": "unreachable", "num_samples": 1, "metric": "eval/kl", "mode": "min",
                                      "storage_path": str(tmp_path / "ray_results"),
                                      "space": {"schedule.g_lr": {"choice": [0.001]}}}))
    store = tmp_path / "mlflow.db"
    port = free_port()
    timeout = ["--set", f"resources.connect_timeout_s={CONNECT_TIMEOUT_S}"]
    commands = {"train": ["train", str(config), "--no-progress", *timeout],
                "tune": ["tune", str(config), "--search", str(search), *timeout],
                "retrain": ["retrain", str(config), "--model-name", "unreachable", "--no-progress", *timeout]}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    procs = {}
    t0 = time.monotonic()
    for form in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        for name, argv in commands.items():
            procs[(name, form)] = subprocess.Popen([str(GANRAY), *argv], cwd=tmp_path, text=True,
                                                   env={**env, "RAY_ADDRESS": form},
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for (name, form), proc in procs.items():
        out, err = proc.communicate(timeout=300)  # an unbounded wait would outlast this and fail
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, (name, form, err)
        assert errors[0].startswith(f"error: cannot reach Ray at {form} (from RAY_ADDRESS) within "
                                    f"resources.connect_timeout_s={CONNECT_TIMEOUT_S} s"), (name, errors)
        assert "check the address" in errors[0] and "Traceback" not in err and "run_id=" not in out, (name, err)
        assert "connecting to Ray at" in err  # the wait is a line of ganray's, not Ray's warnings
    print(f"six refusals in {time.monotonic() - t0:.1f} s")
    # Nothing reached the store: not a run (deleted or not), not even the database file.
    assert not store.exists() and not (tmp_path / "mlruns").exists() and not (tmp_path / "ray_results").exists()
