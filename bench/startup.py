"""The `startup` suite: seconds from launching `ganray train` to its first metric in the
MLflow store, `local` and `replicated`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ganray.bench.harness import REPO, BenchContext, Report, fmt

STARTUP_TARGET_S = 20.0
# The two runs of each topology, in launch order: never reported without their label.
RUN_LABELS = ("cold: first run (a new process, a new store, OS caches as found; replicated starts a new local Ray)",
              "warm: second run in the same folder")


def _ganray_command() -> list[str]:
    script = Path(sys.executable).with_name("ganray")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "ganray.orchestrator.cli"]


def time_to_first_metric(config_path: Path, sets: list[str], store: Path, log_path: Path,
                         timeout_s: float = 300.0, metric: str = "loss/D") -> Optional[float]:
    """Seconds from launching `ganray train` to the first point of `metric` in the MLflow store."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    cmd = [*_ganray_command(), "train", str(config_path), "--no-progress", "--tracking-uri", uri]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    run_id: list[str] = []
    found: Optional[float] = None
    with open(log_path, "w") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, cwd=store)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                if line.startswith("run_id=") and not run_id:
                    run_id.append(line.strip().split("=", 1)[1])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        client = None
        try:
            while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
                if run_id:
                    client = client or MlflowClient(uri)
                    if client.get_metric_history(run_id[0], metric):
                        found = time.perf_counter() - t0
                        break
                time.sleep(0.1)
            if found is None and run_id and proc.poll() is not None:
                # The job ended between two polls: its first point still counts, found late.
                client = client or MlflowClient(uri)
                if client.get_metric_history(run_id[0], metric):
                    found = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the trainer checkpoints and exits cleanly
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            reader.join(timeout=5)
    return found


def startup(ctx: BenchContext) -> Report:
    """`ganray train configs/ring8.yaml` to its first logged metric, local and replicated, run
    twice each in the same folder: the cold first run (a new process, a new local Ray instance,
    a new store, OS caches as found) and the warm second one, each reported under its name."""
    config_path = REPO / "configs" / "ring8.yaml"
    topologies = {"local": ["topology.kind=local", "topology.num_workers=null"],
                  "replicated": ["topology.kind=replicated", "topology.num_workers=1"]}
    common = ["schedule.total_kimg=60", "schedule.checkpoint_kimg=1000", "schedule.sample_kimg=1000",
              "eval.every_kimg=1000"]
    data: dict[str, Any] = {"config": str(config_path.relative_to(REPO)), "overrides": common}
    rows: list[list[Any]] = []
    # The measured `ganray train` starts its own Ray, as a user's does: the bench's instance
    # (its raylet, GCS and idle workers) would otherwise compete with it for the two cores.
    ctx.close()
    with tempfile.TemporaryDirectory(prefix="ganray-bench-startup-") as tmp:
        for name, sets in topologies.items():
            times: list[Optional[float]] = []
            # One store (and cwd) for both runs: the first creates the sqlite schema, the second
            # finds it, as a user's next `ganray train` in the same folder does.
            store = Path(tmp) / name
            store.mkdir()
            for i in range(2):
                times.append(time_to_first_metric(config_path, sets + common, store, ctx.out / f"startup-{name}-{i}.log"))
            cold, warm = times

            def met(seconds: Optional[float]) -> bool:
                return seconds is not None and seconds <= STARTUP_TARGET_S

            data[name] = {"runs_s": times, "labels": list(RUN_LABELS), "cold_s": cold, "warm_s": warm,
                          "target_s": STARTUP_TARGET_S, "met_cold": met(cold), "met_warm": met(warm),
                          "settings": {"command": f"ganray train {data['config']} --no-progress "
                                                  + " ".join(f"--set {x}" for x in sets + common),
                                       "topology": name}}
            rows.append([name, fmt(cold), fmt(warm), f"<= {STARTUP_TARGET_S:g} s",
                         "yes" if met(cold) else "no (cold)" if met(warm) else "no"])
    return Report(data, ["topology", "cold first run (s)", "warm second run (s)", "target", "met (cold)"], rows,
                  ["From launching the `ganray` console script (a fresh process; replicated starts its own Ray) "
                   "to the first `loss/D` point readable from the sqlite store. Cold: the first run in a new "
                   "folder (it also creates the store's schema; OS caches as the machine left them); warm: the "
                   "second run in the same folder. The target is judged on the cold run."])
