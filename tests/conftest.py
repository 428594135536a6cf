"""Shared fixtures: one Ray instance per test session, an isolated MLflow store per test.

Helpers (the small config, free ports, REPO) live in helpers.py: `from helpers import ...`."""

from __future__ import annotations

import os

import pytest

from helpers import REPO

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GANRAY_CACHE", str(REPO / ".ganray_cache"))
# Keep torch in tests to one thread: the machine has 2 cores and Ray workers share them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (ray.init costs ~6 s on 2 cores).

    Logical CPUs exceed the 2 physical cores so tests can place a few small actors at once.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False,
                 object_store_memory=200 * 1024 * 1024, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh embedded store: cwd is tmp_path, so sqlite:///<tmp>/mlflow.db is the default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path

