"""Per-node system metrics: the sampler's MLflow names, the coordinator's one sample per node,
and a replicated run that logs `system/<node>/...` beside its training metrics."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from helpers import small_config
from ganray.workers.system_metrics import NAMES, NodeMetricsSource, SystemMetrics, metric_names

from mlflow_server import sqlite_store  # noqa: F401


def _mlflow_published(sample: dict[str, float], node_id: str | None) -> set[str]:
    """The names MLflow's own `SystemMetricsMonitor.publish_metrics` gives `sample`."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    recorded: dict[str, float] = {}
    monitor = SystemMetricsMonitor.__new__(SystemMetricsMonitor)  # no run, no thread: only its naming
    monitor._metrics_prefix, monitor.node_id, monitor._logging_step, monitor.monitors = "system/", node_id, 0, []
    monitor.mlflow_logger = types.SimpleNamespace(record_metrics=lambda metrics, step: recorded.update(metrics))
    monitor.publish_metrics(dict(sample))
    return set(recorded)


def test_sampler_uses_mlflows_names_with_and_without_a_node_id() -> None:
    sampler = SystemMetrics()
    time.sleep(0.1)  # CPU counters tick every 10 ms: the first figure needs an interval to cover
    sample = sampler.sample()
    assert set(sample) == set(NAMES)  # this CPU machine: no GPU in use, so no gpu_* figures
    assert 0.0 <= sample["cpu_utilization_percentage"] <= 100.0 and sample["system_memory_usage_megabytes"] > 0
    for node_id in (None, "3f2a9c1b07de"):
        assert set(metric_names(sample, node_id)) == _mlflow_published(sample, node_id)
    assert "system/3f2a9c1b07de/cpu_utilization_percentage" in metric_names(sample, "3f2a9c1b07de")


def _fake_torch(utilization: Any) -> Any:
    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 1,
                                 mem_get_info=lambda i: (6e9, 8e9), utilization=utilization)
    return types.SimpleNamespace(cuda=cuda)


def test_gpu_figures_name_the_machines_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pynvml(i: int) -> float:
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # Ray gave this worker the machine's GPU 5
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(no_pynvml))
    sampler = SystemMetrics()
    assert sampler.sample(host=False) == {"gpu_5_memory_usage_megabytes": 2000.0,
                                          "gpu_5_memory_usage_percentage": 25.0}  # utilisation needs pynvml
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(lambda i: 42))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1b2c")  # a UUID: the local index stays
    assert sampler.gpus()["gpu_0_utilization_percentage"] == 42.0


def test_one_worker_per_node_answers_and_a_silent_one_is_skipped(ray_session) -> None:
    import ray

    from ganray.orchestrator.job.node_metrics import NodeMetrics, short_node_id

    class _Probe(NodeMetricsSource):  # defined here: Ray pickles it by value
        """A worker as the coordinator sees it for node metrics, counting what it is asked."""

        def __init__(self) -> None:
            self.asked: list[bool] = []

        def node_metrics(self, host: bool = True) -> dict[str, Any]:
            self.asked.append(host)
            return super().node_metrics(host)

        def asks(self) -> list[bool]:
            return self.asked

        def busy(self, seconds: float) -> None:
            time.sleep(seconds)

    probe = ray.remote(num_cpus=0)(_Probe)
    a, b = probe.remote(), probe.remote()
    try:
        ray.get([a.asks.remote(), b.asks.remote()])  # started, as a job's workers are before the first point
        node = short_node_id(ray.get_runtime_context().get_node_id())  # one local node hosts both
        sampler = NodeMetrics(timeout_s=1.0)

        def point() -> set[str]:
            time.sleep(0.1)  # a chunk between points: CPU counters tick every 10 ms
            return set(sampler.sample([a, b]))

        expected = {f"system/{node}/{n}" for n in NAMES}
        assert point() == expected  # nodes unknown yet: both are asked
        assert point() == expected  # now only the node's first worker
        assert ray.get(a.asks.remote()) == [True, True] and ray.get(b.asks.remote()) == [True]
        a.busy.remote(60)  # the node's worker does not answer: the point goes on without it
        assert point() == set()
        assert point() == expected  # b speaks for the node now
        ray.kill(a)
        assert point() == expected  # a lost worker never fails a point
    finally:
        ray.kill(a)
        ray.kill(b)


def test_replicated_run_logs_the_workers_node_at_the_training_steps(ray_session, sqlite_store: Path) -> None:
    import ray
    from mlflow import MlflowClient

    from ganray.orchestrator.job.node_metrics import short_node_id
    from ganray.orchestrator.job.trainer import Trainer
    from ganray.orchestrator.tracking.store import resolve_tracking_uri

    config = small_config(topology={"kind": "replicated", "num_workers": 2},
                          schedule={"total_kimg": 0.64, "batch_size": 64, "sync_kimg": 0.16})
    result = Trainer(config, progress=False).run()
    client = MlflowClient(resolve_tracking_uri(None, None))
    metrics = client.get_run(result.run_id).data.metrics
    node = short_node_id(ray.get_runtime_context().get_node_id())
    per_node = {k for k in metrics if k.startswith("system/") and k.count("/") == 2}
    assert per_node == {f"system/{node}/{n}" for n in NAMES}  # one series per node that hosted a worker
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "loss/D"))
    assert len(steps) > 1 and steps[-1] == result.images_seen
    for name in per_node:
        assert sorted(m.step for m in client.get_metric_history(result.run_id, name)) == steps, name
    assert 0.0 <= metrics[f"system/{node}/cpu_utilization_percentage"] <= 100.0
    assert metrics[f"system/{node}/system_memory_usage_megabytes"] > 0
    assert "system/cpu_utilization_percentage" in metrics  # the coordinator's machine, as before
