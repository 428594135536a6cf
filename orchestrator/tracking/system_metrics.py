"""System metrics of the coordinator's machine, sampled at each metric sync boundary.

The trainer adds these points to the same `log_metrics` call as the training metrics of a sync
interval, so they go through the job's one buffered MLflow writer (`RunLogger`) at the same step.
MLflow's own `SystemMetricsMonitor` is not used: its thread writes to the store directly, outside
the buffer, retries and ordering of the run logger. The names are the ones that monitor uses, so
MLflow's UI groups them the same way:

- `system/cpu_utilization_percentage`: CPU busy time over all cores since the previous sample
  (the sync interval), as `psutil.cpu_percent` computes it, 0-100.
- `system/system_memory_usage_megabytes`, `system/system_memory_usage_percentage`: used RAM.
- `system/disk_usage_percentage`: use of the file system holding `/`.

psutil is optional here: without it `SystemMetrics.sample()` returns `{}` (one debug line says
why). A metric psutil cannot read on this machine (a container hiding `/`) is left out; sampling
never raises into the training loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("ganray")

PREFIX = "system/"
NAMES = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
         "system/system_memory_usage_percentage", "system/disk_usage_percentage")


def _cpu_busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds as psutil.cpu_percent counts them (iowait idle, guest time in user)."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


class SystemMetrics:
    """Samples the `system/*` metrics; each instance keeps its own CPU baseline.

    `psutil.cpu_percent(interval=None)` shares one baseline per process, so a second caller
    would shorten our window; the busy/total CPU times are differenced here instead.
    """

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            log.debug("psutil is not installed: no system/* metrics are logged")
            self._psutil = None
            return
        self._psutil = psutil
        self._cpu_last = self._cpu_times()
        self._warned: set[str] = set()

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

    def sample(self) -> dict[str, float]:
        """The `system/*` figures now (rounded to 0.1 like MLflow's monitor); `{}` without psutil."""
        psutil = self._psutil
        if psutil is None:
            return {}
        out: dict[str, float] = {}
        now = self._cpu_times()
        if now is not None and self._cpu_last is not None:
            busy = now[0] - self._cpu_last[0]
            total = now[1] - self._cpu_last[1]
            if total > 0:
                out["system/cpu_utilization_percentage"] = round(min(100.0, max(0.0, 100.0 * busy / total)), 1)
        self._cpu_last = now
        try:
            memory = psutil.virtual_memory()
            out["system/system_memory_usage_megabytes"] = round(memory.used / 1e6, 1)
            out["system/system_memory_usage_percentage"] = round(memory.used / memory.total * 100.0, 1)
        except Exception as exc:  # noqa: BLE001
            self._skip("memory", exc)
        try:
            out["system/disk_usage_percentage"] = round(psutil.disk_usage(os.sep).percent, 1)
        except Exception as exc:  # noqa: BLE001
            self._skip("disk usage", exc)
        return out
