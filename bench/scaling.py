"""The `scaling` suite: `replicated` with N workers x 1 thread against the plain loop with N
threads, the global batch the same (each worker takes 1/N of it).
"""

from __future__ import annotations

import statistics
from typing import Any

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, spread
from ganray.bench.timing import add_ratio, close_all, compare, paired_ratios

SCALING_TARGET = {"mlp": 0.9, "dcgan32": 1.0}


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores (always 1 and 2: the 2-core figure is the target)."""
    counts = [1, 2]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return counts


def scaling(ctx: BenchContext) -> Report:
    """`replicated` with N workers x 1 thread against the plain loop with N threads."""
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
                contenders[f"plain_{n}t"] = plain_contender(base, n)
            for n in counts:
                contenders[f"replicated_{n}w"] = EngineContender(
                    ctx.config(case, topology={"kind": "replicated", "num_workers": n}))
            row = compare(base.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                          reference="plain_1t")
            row["time_split"] = time_split(contenders)
        finally:
            close_all(contenders)
        add_ratio(row, "ratio", f"replicated_{top}w", f"plain_{top}t")
        add_ratio(row, "speedup_ratio", f"replicated_{top}w", "replicated_1w")
        add_ratio(row, "plain_speedup_ratio", f"plain_{top}t", "plain_1t")
        row["target"] = SCALING_TARGET[case]
        data[case] = row
        for n in counts:
            rows.append([case, n, spread(row, f"plain_{n}t"), spread(row, f"replicated_{n}w"),
                         f"{statistics.median(paired_ratios(row['samples_per_s'][f'replicated_{n}w'], row['samples_per_s'][f'plain_{n}t'])):.2f}",
                         f">= {SCALING_TARGET[case]}" if n == top == 2 else None])
    notes = [f"replicated N workers x 1 thread against the plain loop with N threads; the global batch is the "
             f"same (each worker takes 1/N). Speed-up {top} workers over 1: "
             + ", ".join(f"{c} {data[c]['speedup_ratio']:.2f}" for c in ctx.models())]
    return Report(data, ["model", "workers / threads", "plain loop", "replicated", "replicated / plain", "target"],
                  rows, notes)
