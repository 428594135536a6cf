"""System metrics of one machine, sampled at each metric sync point, with MLflow's names.

`SystemMetrics().sample()` returns the figures under the keys MLflow's `SystemMetricsMonitor`
gives them before it adds its prefix; `metric_names` adds that prefix exactly as the monitor's
`publish_metrics` does: `system/<name>` without a node id, `system/<node_id>/<name>` with one
(MLflow's naming for several nodes, e.g. `system/node_0/cpu_utilization_percentage`).

- `cpu_utilization_percentage`: CPU busy time over all cores since the previous sample (the
  sync interval), as `psutil.cpu_percent` computes it, 0-100.
- `system_memory_usage_megabytes`, `system_memory_usage_percentage`: used RAM.
- `disk_usage_percentage`: use of the file system holding `/`.
- `gpu_<i>_memory_usage_megabytes`, `gpu_<i>_memory_usage_percentage` and, where `pynvml` is
  installed, `gpu_<i>_utilization_percentage`: each GPU this process already uses (CUDA
  initialised), `<i>` its index on the machine (MLflow's monitor numbers GPUs as NVML does, which
  ignores `CUDA_VISIBLE_DEVICES`; Ray gives each worker its GPUs through that variable).

The coordinator's process samples its own machine (`system/<name>`, see the trainer); every
training actor samples its node through `NodeMetricsSource.node_metrics`, and the coordinator
writes those as `system/<node>/<name>` (orchestrator/job/node_metrics.py). Workers never talk to
MLflow: they return numbers, the coordinator's one buffered writer logs them.

psutil is optional: without it `sample()` has no host figures (one debug line says why). A metric
this machine cannot read (a container hiding `/`) is left out; sampling never raises.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

log = logging.getLogger("ganray")

PREFIX = "system/"
NAMES = ("cpu_utilization_percentage", "system_memory_usage_megabytes",
         "system_memory_usage_percentage", "disk_usage_percentage")


def metric_names(sample: dict[str, float], node_id: Optional[str] = None) -> dict[str, float]:
    """MLflow's names for a sample: `system/<name>`, or `system/<node_id>/<name>` for one of
    several nodes (the prefix `SystemMetricsMonitor.publish_metrics` builds)."""
    prefix = PREFIX + (f"{node_id}/" if node_id else "")
    return {prefix + name: value for name, value in sample.items()}


def _cpu_busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds as psutil.cpu_percent counts them (iowait idle, guest time in user)."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


def _machine_gpu_index(local: int) -> int:
    """The machine-wide index of this process's CUDA device `local` (NVML's numbering, which
    MLflow's names use): `CUDA_VISIBLE_DEVICES` maps it when it lists indices (Ray sets it for
    each worker); GPU UUIDs there, or no variable, leave the local index."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if local < len(visible) and visible[local].isdigit():
        return int(visible[local])
    return local


class SystemMetrics:
    """Samples one machine; each instance keeps its own CPU baseline.

    `psutil.cpu_percent(interval=None)` shares one baseline per process, so a second caller
    would shorten our window; the busy/total CPU times are differenced here instead.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()
        try:
            import psutil
        except ImportError:
            log.debug("psutil is not installed: no system/* metrics are logged")
            self._psutil = None
            return
        self._psutil = psutil
        self._cpu_last = self._cpu_times()

    @property
    def available(self) -> bool:
        return self._psutil is not None

    def _cpu_times(self) -> tuple[float, float] | None:
        try:
            return _cpu_busy_total(self._psutil.cpu_times())
        except Exception:  # noqa: BLE001 - a machine without the counters logs no CPU figure
            return None

    def _skip(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.debug("system metrics: cannot read %s (%s); it is left out", what, exc)

    def sample(self, host: bool = True, gpus: bool = True) -> dict[str, float]:
        """The figures now, un-prefixed (rounded to 0.1 like MLflow's monitor): the machine's CPU,
        memory and disk when `host`, the GPUs this process uses when `gpus`."""
        out = self._host() if host else {}
        if gpus:
            out.update(self.gpus())
        return out

    def _host(self) -> dict[str, float]:
        psutil = self._psutil
        if psutil is None:
            return {}
        out: dict[str, float] = {}
        now = self._cpu_times()
        if now is not None and self._cpu_last is not None:
            busy = now[0] - self._cpu_last[0]
            total = now[1] - self._cpu_last[1]
            if total > 0:
                out["cpu_utilization_percentage"] = round(min(100.0, max(0.0, 100.0 * busy / total)), 1)
        self._cpu_last = now
        try:
            memory = psutil.virtual_memory()
            out["system_memory_usage_megabytes"] = round(memory.used / 1e6, 1)
            out["system_memory_usage_percentage"] = round(memory.used / memory.total * 100.0, 1)
        except Exception as exc:  # noqa: BLE001
            self._skip("memory", exc)
        try:
            out["disk_usage_percentage"] = round(psutil.disk_usage(os.sep).percent, 1)
        except Exception as exc:  # noqa: BLE001
            self._skip("disk usage", exc)
        return out

    def gpus(self) -> dict[str, float]:
        """The GPUs this process already uses; `{}` when it uses none.

        Only a process that initialised CUDA is asked: querying would otherwise create a CUDA
        context (hundreds of MB of GPU memory) in a process that trains on the CPU. torch is not
        imported here for the same reason: a process that uses CUDA has imported it."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        out: dict[str, float] = {}
        for local in range(torch.cuda.device_count()):
            name = f"gpu_{_machine_gpu_index(local)}_"
            try:
                free, total = torch.cuda.mem_get_info(local)  # the whole device, as NVML reports it
                out[name + "memory_usage_megabytes"] = round((total - free) / 1e6, 1)
                out[name + "memory_usage_percentage"] = round((total - free) / total * 100.0, 1)
            except Exception as exc:  # noqa: BLE001
                self._skip("GPU memory", exc)
            try:
                out[name + "utilization_percentage"] = float(torch.cuda.utilization(local))  # needs pynvml
            except Exception as exc:  # noqa: BLE001 - ModuleNotFoundError without pynvml, NVML errors
                self._skip("GPU utilisation", exc)
        return out


# One sampler per worker process, made when the process imports the worker classes: the CPU
# figure of a worker's first sample covers the time since it started.
_PROCESS_SAMPLER = SystemMetrics()


class NodeMetricsSource:
    """Mixed into every training actor: the coordinator asks one worker per node for the node's
    figures (`host=True`) and every other worker that uses a GPU for its GPU only."""

    def node_metrics(self, host: bool = True) -> dict[str, Any]:
        """{"node_id": Ray node id, "address": node IP, "gpu": whether this worker uses a GPU,
        "metrics": un-prefixed figures}; the coordinator names and logs them."""
        import ray

        metrics = _PROCESS_SAMPLER.sample(host=host)
        return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
                "gpu": any(name.startswith("gpu_") for name in metrics), "metrics": metrics}
