"""`ganray bench`: the harness shared by every suite (options, machine record, Ray, reports).

A suite is a function `suite(ctx: BenchContext) -> Report`; `run_suites` runs the asked ones in
order, prints each report's Markdown table and writes `<suite>.json` (every raw figure, the
machine, the date) and `<suite>.md` into `--out`. Timings are only ever compared side by side in
one invocation (BENCHMARKS.md): every speed figure is a ratio of contenders measured in
alternation, and ratios live under keys ending in `ratio`.

One file per suite (`SUITES`); the cases they time in `cases.py`, the contenders in
`contenders.py`, the timer in `timing.py`, the plain reference loop in `plain.py`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ganray.bench.cases import MODELS, QUICK_SECTIONS, REP_SECONDS, case_config, merge
from ganray.models.errors import GanrayError

log = logging.getLogger("ganray")

# name -> "module:function"; imported when run, so `ganray bench quality` never imports Ray Train.
SUITES: dict[str, str] = {
    "overhead": "ganray.bench.overhead:overhead",
    "scaling": "ganray.bench.scaling:scaling",
    "split": "ganray.bench.split_suite:split",
    "peer": "ganray.bench.peer:peer",
    "tracking": "ganray.bench.tracking_suite:tracking",
    "startup": "ganray.bench.startup:startup",
    "compile": "ganray.bench.compile_suite:compile_suite",
    "quality": "ganray.bench.quality:quality",
}
DEFAULT_SUITES = [s for s in SUITES if s != "quality"]
WORKER_NICENESS = 0  # see BenchContext.ensure_ray
REPO = Path(__file__).resolve().parents[1]  # the shipped configs/ the suites train on


# ---------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; the load average says how shared the machine was."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "physical_cores": physical,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "ray": _version("ray"), "mlflow": _version("mlflow"),
        "ganray": _version("ganray"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# Context and reports


@dataclass
class BenchOptions:
    out: Path
    quick: bool = False
    reps: Optional[int] = None        # None: the suite's default (5, 2 with --quick)
    seeds: Optional[int] = None       # quality: None means 10 (2 with --quick)
    first_seed: Optional[int] = None  # quality: None means 1000 (held out from recipe choice)
    models: Optional[list[str]] = None
    datasets: Optional[list[str]] = None
    kimg: Optional[float] = None      # quality: total_kimg of each training run
    workers: Optional[list[int]] = None  # peer: only these worker counts (None: the suite's own)
    overrides: list[str] = field(default_factory=list)  # quality: `--set key=value` for every training run


@dataclass
class Report:
    """What a suite returns: its JSON body (raw figures) and its Markdown table."""

    data: dict[str, Any]
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + ([""] + self.notes if self.notes else []))


def fmt(value: Any) -> str:
    """Table cells: samples/s without decimals, ratios with two, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def spread(row: dict[str, Any], name: str) -> str:
    """'median (min-max)' of a contender's samples/s in a `timing.compare` row."""
    s = row["summary"][name]
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def ratio_cell(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_range"]
    return f"{row[key]:.2f} ({lo:.2f}-{hi:.2f})"


class BenchContext:
    """Options, the Ray instance (started once per invocation, on first need) and timing defaults."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.quick = options.quick
        self.out = options.out
        self._owns_ray = False
        # None: Ray was already running when the bench began (its own setting applies).
        self.ray_worker_niceness: Optional[int] = None

    @property
    def reps(self) -> int:
        return self.options.reps or (2 if self.quick else 5)

    def models(self, allowed: tuple[str, ...] = MODELS) -> list[str]:
        wanted = self.options.models or list(allowed)
        return [m for m in wanted if m in allowed]

    def worker_counts(self, default: tuple[int, ...]) -> list[int]:
        wanted = self.options.workers or list(default)
        return [n for n in default if n in wanted]

    def config(self, case: str, **sections: dict[str, Any]) -> Any:
        """`case_config`, shrunk under --quick (`QUICK_SECTIONS`)."""
        if self.quick:
            sections = merge(QUICK_SECTIONS[case], sections)
        return case_config(case, **sections)

    def rep_seconds(self, case: str) -> float:
        full, quick = REP_SECONDS[case]
        return quick if self.quick else full

    @property
    def warmup_rounds(self) -> int:
        return 1 if self.quick else 3

    @staticmethod
    def cores() -> int:
        return os.cpu_count() or 1

    def ensure_ray(self) -> None:
        """A local Ray instance (no dashboard, explicit CPUs) unless one is already initialised.

        Logical CPUs exceed the cores so that the largest row here (ganray's 2 replicas beside two
        Ray Train peers of 2 workers each) can be placed on a 2-core machine; contenders are all
        alive at once but never run at once.
        Ray starts its workers at niceness 15 by default, so on a machine shared with other work
        every Ray worker (ganray's and Ray Train's alike) would lose CPU to the plain loop running
        in this process at niceness 0: a scheduling policy, not orchestration overhead. The
        instance started here runs workers at niceness 0 (`ray_worker_niceness` in the JSON).
        """
        import ray

        if ray.is_initialized():
            return
        for attempt in range(3):
            try:
                ray.init(address="local", num_cpus=max(6, self.cores() + 4), include_dashboard=False,
                         log_to_driver=False, configure_logging=False,
                         _system_config={"worker_niceness": WORKER_NICENESS})
                break
            except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
                # On a loaded machine the raylet can give up waiting for its agents (30 s); a
                # second start usually succeeds, and a benchmark is not worth losing to it.
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(err):
                    raise
                log.warning("Ray did not start in time (%s); retrying", str(err).splitlines()[0])
        self._owns_ray = True
        self.ray_worker_niceness = WORKER_NICENESS

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False


# ---------------------------------------------------------------------------------------------
# Running suites


def _resolve(name: str) -> Callable[[BenchContext], Report]:
    module, _, func = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), func)


def run_suites(names: list[str], options: BenchOptions,
               echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the named suites in order; returns {suite: the JSON written to <out>/<suite>.json}."""
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise GanrayError(f"unknown benchmark suite '{unknown[0]}'; choose from {', '.join(SUITES)}")
    options.out.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(options)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            report = _resolve(name)(ctx)
            body = {"suite": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine_info(), "quick": options.quick,
                    "ray_worker_niceness": ctx.ray_worker_niceness,
                    "wall_s": round(time.perf_counter() - t0, 1), **report.data}
            (options.out / f"{name}.json").write_text(json.dumps(_finite(body), indent=2, default=_json_default,
                                                                 allow_nan=False))
            table = report.markdown()
            (options.out / f"{name}.md").write_text(table + "\n")
            echo(f"\n## {name}\n\n{table}\n")
            results[name] = body
    finally:
        ctx.close()
    return results


def _finite(obj: Any) -> Any:
    """Non-finite floats (a KL with no high-quality sample is inf) become null: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
