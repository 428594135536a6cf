"""The `split` suite: the `split` topology, 1 G + 1 D and 1 G + 2 D, with and without overlap,
against the plain loop with 1 and 2 threads (DCGAN-32).
"""

from __future__ import annotations

from typing import Any

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import add_ratio, close_all, compare

SPLIT_TARGET = 0.8
SPLIT_VARIANTS = ((1, 1, False), (1, 1, True), (1, 2, False), (1, 2, True))


def split(ctx: BenchContext) -> Report:
    """`split` 1 G + 1 D and 1 G + 2 D, with and without overlap, against the plain loop (DCGAN-32)."""
    case = "dcgan32"
    if case not in ctx.models():
        return Report({"skipped": "split runs on dcgan32 only; include it in --models"}, ["model"], [])
    ctx.ensure_ray()
    base = ctx.config(case)
    plains = {"plain_1t": plain_contender(base, 1), "plain_2t": plain_contender(base, 2)}
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for g, d, overlap in SPLIT_VARIANTS:
        name = f"g{g}d{d}{'_overlap' if overlap else ''}"
        engine = EngineContender(ctx.config(case, topology={"kind": "split", "num_generators": g,
                                                            "num_discriminators": d, "overlap": overlap}))
        contenders = {**plains, "split": engine}
        try:
            row = compare(base.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                          reference="plain_1t")
            row["time_split"] = time_split(contenders)
        finally:
            engine.close()
        add_ratio(row, "plain1t_ratio", "split", "plain_1t")
        add_ratio(row, "plain2t_ratio", "split", "plain_2t")
        # BENCHMARKS.md: G and D taking turns compare with 1 thread; overlapped (or more workers
        # than one core's worth) compare with the 2-thread loop.
        against = "plain1t" if (d == 1 and not overlap) else "plain2t"
        row.update(ratio=row[f"{against}_ratio"], ratio_range=row[f"{against}_ratio_range"], against=against,
                   target=SPLIT_TARGET if d == 1 else None)
        data[name] = row
        rows.append([f"{g} G + {d} D", overlap, spread(row, "split"), spread(row, "plain_1t"), spread(row, "plain_2t"),
                     ratio_cell(row, "plain1t_ratio"), ratio_cell(row, "plain2t_ratio"),
                     f">= {SPLIT_TARGET} vs {against}" if d == 1 else None])
    close_all(plains)
    return Report(data, ["workers", "overlap", "split", "plain 1 thread", "plain 2 threads", "split / plain 1t",
                         "split / plain 2t", "target"], rows,
                  ["DCGAN-32, batch 64, 1 thread per worker; overlap trains D on fakes of the previous G (staleness 1)."])
