"""Shared fixtures: one Ray instance per test session, an isolated MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GANRAY_CACHE", str(Path(__file__).resolve().parents[1] / ".ganray_cache"))
# Keep torch in tests to one thread: the machine has 2 cores and Ray workers share them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


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


def small_config(**sections):
    """A tiny job config for tests, overridable per section."""
    from ganray.orchestrator.job.config import config_from_dict

    tree = {
        "seed": 0,
        "data": {"name": "grid25", "size": 4096},
        "model": {"z_dim": 4, "hidden": 32, "depth": 2},
        "schedule": {"total_kimg": 4, "batch_size": 64, "sync_kimg": 1, "checkpoint_kimg": 2,
                     "sample_kimg": 100, "ema_half_life_kimg": 1},
        "topology": {"kind": "local"},
        "eval": {"every_kimg": 100, "num_samples": 500},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return config_from_dict(tree)
