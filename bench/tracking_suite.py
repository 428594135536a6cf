"""The `tracking` suite: a shipped recipe trained with MLflow logging and checkpointing on, and
with `tracking.enabled: false`, in alternating pairs; the figure is the ratio of their speeds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from ganray.bench.harness import REPO, BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import add_ratio, summary

TRACKING_TARGET = 0.98


class _TimedEngine:
    """An engine whose training-loop span (first chunk start to last chunk end) is recorded."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> Any:
        t0 = time.perf_counter()
        if n_rounds > 0 and self.first is None:
            self.first = t0
        res = self._engine.run(n_rounds, stop_at_images)
        if n_rounds > 0:
            self.last = time.perf_counter()
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _tracking_tree(quick: bool) -> dict[str, Any]:
    """The shipped ring8 recipe, with checkpoints and sample plots denser than shipped (harsher)."""
    tree = yaml.safe_load((REPO / "configs" / "ring8.yaml").read_text())
    # In-process (`local`): the MLflow thread then shares the process with the compute, the
    # harshest case for logging; Ray topologies log from a driver that is idle meanwhile.
    tree["topology"] = {"kind": "local"}
    kimg = 10.0 if quick else 200.0
    tree["schedule"].update(total_kimg=kimg, checkpoint_kimg=kimg / 4, sample_kimg=kimg / 2,
                            sync_kimg=2.0 if quick else tree["schedule"]["sync_kimg"])
    tree["eval"].update(every_kimg=kimg / 2, num_samples=500 if quick else 2500)
    return tree


def _train_timed(tree: dict[str, Any], enabled: bool, store: Path) -> dict[str, float]:
    from ganray.orchestrator.job.config import config_from_dict
    from ganray.orchestrator.job.engine import make_engine
    from ganray.orchestrator.job.trainer import Trainer

    cfg = config_from_dict({**tree, "tracking": {**tree.get("tracking", {}), "enabled": enabled,
                                                 "experiment": "bench-tracking"}})
    timed: list[_TimedEngine] = []

    def factory(config: Any) -> Any:
        timed.append(_TimedEngine(make_engine(config)))
        return timed[0]

    uri = f"sqlite:///{store / 'mlflow.db'}" if enabled else None
    t0 = time.perf_counter()
    result = Trainer(cfg, tracking_uri=uri, progress=False, engine_factory=factory).run()
    wall = time.perf_counter() - t0
    eng = timed[0]
    loop = max((eng.last or 0.0) - (eng.first or 0.0), 1e-9)
    return {"images": result.images_seen, "loop_s": loop, "wall_s": wall,
            "loop_samples_per_s": result.images_seen / loop, "wall_samples_per_s": result.images_seen / wall}


def tracking(ctx: BenchContext) -> Report:
    """MLflow logging and checkpointing on against tracking.enabled=false, same job, alternated."""
    tree = _tracking_tree(ctx.quick)
    # An even number of pairs, half of them in each order: the second run of a pair was
    # measurably slower than the first whichever mode it was (docs/performance.md), so an odd
    # number of pairs would bias the median ratio towards the mode that ran second more often.
    reps = ctx.reps + ctx.reps % 2
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="ganray-bench-mlflow-") as tmp:
        for rep in range(reps):
            for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                runs[mode].append(_train_timed(tree, mode == "on", Path(tmp)))
    data: dict[str, Any] = {"config": {k: tree[k] for k in ("schedule", "model", "eval")}, "runs": runs,
                            "settings": {"on": {"contender": "Trainer.run, local", "tracking.enabled": True,
                                                "store": "sqlite (a file in a temporary folder)"},
                                         "off": {"contender": "Trainer.run, local", "tracking.enabled": False}}}
    row: dict[str, Any] = {"samples_per_s": {f"{m}_{k}": [r[f"{k}_samples_per_s"] for r in runs[m]]
                                             for m in runs for k in ("loop", "wall")}}
    add_ratio(row, "ratio", "on_loop", "off_loop")
    add_ratio(row, "wall_ratio", "on_wall", "off_wall")
    row["summary"] = {k: summary(v) for k, v in row["samples_per_s"].items()}
    row["target"] = TRACKING_TARGET
    row["pairs"] = reps
    data["ring8"] = row
    rows = [[f"ring8 recipe (batch {tree['schedule']['batch_size']}), local", spread(row, "off_loop"), spread(row, "on_loop"), ratio_cell(row, "ratio"),
             ratio_cell(row, "wall_ratio"), f">= {TRACKING_TARGET}"]]
    notes = [f"{tree['schedule']['total_kimg']:g} kimg per run, a metric point every {tree['schedule']['sync_kimg']:g} kimg, "
             f"a checkpoint every {tree['schedule']['checkpoint_kimg']:g} kimg, sample plots every "
             f"{tree['schedule']['sample_kimg']:g} kimg, sqlite store. 'loop' spans the first to the last chunk; "
             "'wall' is all of Trainer.run (the MLflow run's creation, final checkpoint and close included). "
             f"{reps} pairs, half of them run off first and half on first: the second run of a pair tends to "
             "be the slower one."]
    return Report(data, ["job", "tracking off (loop)", "tracking on (loop)", "on / off (loop)", "on / off (wall)",
                         "target"], rows, notes)
