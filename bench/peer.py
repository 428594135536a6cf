"""The `peer` suite: ganray `replicated` against the same GAN hand-written on Ray Train's
TorchTrainer (DDP), 1 and 2 workers, MLP and DCGAN-32.

Five contenders per row, all alive at once and taking turns window by window (the Ray Train
peers wait on a baton actor between their windows), so a shared machine's drift hits all alike:

- `ganray`: the `replicated` engine with the row's workers, 1 thread each, the global batch;
- `peer_fair`: the Ray Train peer written as well as ganray (`peer_train.PEER_STYLES["fair"]`),
  the row's target;
- `peer_example`: the peer as in Ray Train's examples (DataLoader, default Adam), a second row;
- `tuned`: the tuned plain loop with as many threads as there are workers (the zero-overhead
  ceiling: its ratio to a peer is the most any engine could show here);
- `minimal`: the minimal plain loop, an extra row (what fused Adam and the foreach EMA buy).

The peers time inside their train loop (rank 0), the others in the driver around `run` (for
ganray, the Ray call included).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from ganray.bench.contenders import EngineContender, plain_contender
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.peer_train import PeerRun
from ganray.bench.timing import add_ratio, close_all, rounds_for, settings_of, summary

# BENCHMARKS.md: ganray replicated / the fair Ray Train peer, same GAN and workers.
PEER_TARGETS = {("mlp", 1): 1.0, ("mlp", 2): 1.1, ("dcgan32", 1): 1.0, ("dcgan32", 2): 1.0}
PEER_STYLES_RUN = ("fair", "example")
ORDER = ("ganray", "peer_fair", "tuned", "peer_example", "minimal")


def _row(ctx: BenchContext, case: str, workers: int, storage: str) -> dict[str, Any]:
    """One (model, workers) row: every contender alive, timed in rotating order, `ctx.reps` windows."""
    windows = ctx.reps
    cfg = ctx.config(case, topology={"kind": "replicated", "num_workers": workers})
    local = {"ganray": EngineContender(cfg), "tuned": plain_contender(ctx.config(case), workers),
             "minimal": plain_contender(ctx.config(case), workers, tuned=False)}
    rates: dict[str, list[float]] = {name: [] for name in ORDER}
    reports: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    try:
        for c in local.values():
            c.run(ctx.warmup_rounds)
        # Windows sized on ganray (whose per-chunk Ray call they must amortise), not on the N-thread
        # plain loop: on a loaded machine its OpenMP threads can stall by an order of magnitude,
        # which would shrink every window to a few rounds.
        rounds = rounds_for(local["ganray"], ctx.rep_seconds(case), max(1, ctx.warmup_rounds), 10_000)
        # Both peers start at once (their start-up is minutes of imports on a loaded 2-core machine).
        peers = {f"peer_{style}": PeerRun(cfg.model_dump(), style, workers, rounds, windows, ctx.warmup_rounds,
                                          storage) for style in PEER_STYLES_RUN}
        for run in peers.values():
            run.ready()
        for i in range(windows):
            for name in ORDER[i % len(ORDER):] + ORDER[:i % len(ORDER)]:
                if name in peers:
                    rates[name].append(peers[name].run_window(i))
                else:
                    t0 = time.perf_counter()
                    rates[name].append(local[name].run(rounds) / (time.perf_counter() - t0))
        reports = {name: run.finish() for name, run in peers.items()}
        settings = {**settings_of(local), **{name: run.settings for name, run in peers.items()}}
    finally:
        close_all(local)
    for name, report in reports.items():  # what the workers themselves ran with
        settings[name]["worker_report"] = {k: v for k, v in report.items() if k != "samples_per_s"}
    row: dict[str, Any] = {"workers": workers, "threads_per_worker": 1, "batch": cfg.schedule.batch_size,
                           "rounds_per_window": rounds, "sized_on": "ganray", "windows": windows, "order": list(ORDER),
                           "reference": "peer_fair", "settings": settings, "samples_per_s": rates,
                           "summary": {k: summary(v) for k, v in rates.items()},
                           "target": PEER_TARGETS[(case, workers)]}
    add_ratio(row, "ratio", "ganray", "peer_fair")
    add_ratio(row, "example_ratio", "ganray", "peer_example")
    add_ratio(row, "ganray_tuned_ratio", "ganray", "tuned")
    add_ratio(row, "fair_tuned_ratio", "peer_fair", "tuned")
    add_ratio(row, "example_tuned_ratio", "peer_example", "tuned")
    add_ratio(row, "tuned_fair_ratio", "tuned", "peer_fair")  # the zero-overhead ceiling
    add_ratio(row, "tuned_minimal_ratio", "tuned", "minimal")
    return row


def peer(ctx: BenchContext) -> Report:
    """ganray `replicated` against the fair and the example Ray Train peers, 1 and 2 workers."""
    ctx.ensure_ray()
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="ganray-bench-peer-") as storage:
        for case in ctx.models():
            for workers in ctx.worker_counts((1, 2)):
                row = data[f"{case}_{workers}w"] = _row(ctx, case, workers, storage)
                rows.append([case, workers, spread(row, "peer_fair"), spread(row, "peer_example"),
                             spread(row, "ganray"), spread(row, "tuned"), spread(row, "minimal"),
                             ratio_cell(row, "ratio"), ratio_cell(row, "example_ratio"),
                             ratio_cell(row, "tuned_fair_ratio"), f">= {row['target']}"])
    return Report(data, ["model", "workers", "Ray Train, fair", "Ray Train, as in Ray's example", "ganray replicated",
                         "tuned loop (N threads)", "minimal loop (N threads)", "ganray / fair peer",
                         "ganray / example peer", "tuned loop / fair peer", "target (vs fair)"], rows,
                  ["samples/s: median (min-max) of timed windows after warm-up, the five contenders taking turns "
                   "in one window. The fair peer is written as well as ganray (fused Adam, foreach EMA, "
                   "channels_last for conv nets on CPU, batches indexed from a tensor on the worker, one "
                   "prepare_model DDP per network); the example peer as in Ray Train's examples (DataLoader, "
                   "default Adam, a Python EMA loop). The peers time inside their train loop (rank 0), ganray in "
                   "the driver around engine.run (the Ray call included). 1 thread per worker; the plain loops "
                   "run with as many threads as there are workers. Settings of each contender are in the JSON."])
