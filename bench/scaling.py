"""The `scaling` suite: `replicated` with N workers x 1 thread against the tuned plain loop with N
threads, the global batch the same (each worker takes 1/N of it); the minimal loop at the top
thread count is an extra row.
"""

from __future__ import annotations

from typing import Any

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import add_ratio, close_all, compare

# BENCHMARKS.md: replicated 2w x 1t / the tuned loop with 2 threads.
SCALING_TARGET = {"mlp": 0.9, "dcgan32": 0.95}


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores (always 1 and 2: the 2-core figure is the target)."""
    counts = [1, 2]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return counts


def scaling(ctx: BenchContext) -> Report:
    """`replicated` with N workers x 1 thread against the tuned plain loop with N threads."""
    ctx.ensure_ray()
    counts = worker_counts(ctx.cores())
    top = counts[-1]
    data: dict[str, Any] = {"worker_counts": counts}
    rows: list[list[Any]] = []
    for case in ctx.models():
        base = ctx.config(case)
        contenders: dict[str, Any] = {}
        try:
            for n in counts:
                contenders[f"tuned_{n}t"] = plain_contender(base, n)
            contenders[f"minimal_{top}t"] = plain_contender(base, top, tuned=False)
            for n in counts:
                contenders[f"replicated_{n}w"] = EngineContender(
                    ctx.config(case, topology={"kind": "replicated", "num_workers": n}))
            row = compare(base.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                          reference="tuned_1t")
            row["time_split"] = time_split(contenders)
        finally:
            close_all(contenders)
        add_ratio(row, "ratio", f"replicated_{top}w", f"tuned_{top}t")
        for n in counts:
            add_ratio(row, f"replicated_{n}w_vs_tuned_ratio", f"replicated_{n}w", f"tuned_{n}t")
        add_ratio(row, "tuned_minimal_ratio", f"tuned_{top}t", f"minimal_{top}t")
        add_ratio(row, "speedup_ratio", f"replicated_{top}w", "replicated_1w")
        add_ratio(row, "plain_speedup_ratio", f"tuned_{top}t", "tuned_1t")
        row["target"] = SCALING_TARGET[case]
        data[case] = row
        for n in counts:
            rows.append([case, n, spread(row, f"tuned_{n}t"), spread(row, f"minimal_{n}t") if n == top else None,
                         spread(row, f"replicated_{n}w"), ratio_cell(row, f"replicated_{n}w_vs_tuned_ratio"),
                         f">= {SCALING_TARGET[case]}" if n == top == 2 else None])
    notes = [f"replicated N workers x 1 thread against the tuned plain loop with N threads; the global batch is "
             f"the same (each worker takes 1/N). The minimal loop runs at {top} threads only, an extra row. "
             f"Speed-up {top} workers over 1: " + ", ".join(f"{c} {data[c]['speedup_ratio']:.2f}" for c in ctx.models())
             + f"; tuned / minimal loop at {top} threads: "
             + ", ".join(f"{c} {data[c]['tuned_minimal_ratio']:.2f}" for c in ctx.models())]
    return Report(data, ["model", "workers / threads", "tuned loop (reference)", "minimal loop", "replicated",
                         "replicated / tuned", "target"], rows, notes)
