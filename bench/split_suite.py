"""The `split` suite: the `split` topology, 1 G + 1 D and 1 G + 2 D, with and without overlap,
against the tuned plain loop with as many threads as the job has processes (DCGAN-32).

A split job with K discriminators runs K + 1 single-thread processes, so its fair reference is
the tuned loop at K + 1 threads (BENCHMARKS.md); 1 G + 2 D is compared with 3 threads even on 2
cores, where neither gets 3 cores' worth.
"""

from __future__ import annotations

from typing import Any

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import close_all, compare

# BENCHMARKS.md: split 1 G + 1 D / the tuned loop with 2 threads; 1 G + 2 D has no target.
SPLIT_TARGETS = {(1, 1, False): 0.6, (1, 1, True): 0.8}
SPLIT_VARIANTS = ((1, 1, False), (1, 1, True), (1, 2, False), (1, 2, True))


def split(ctx: BenchContext) -> Report:
    """`split` 1 G + K D, with and without overlap, against the tuned loop with K + 1 threads (DCGAN-32)."""
    case = "dcgan32"
    if case not in ctx.models():
        return Report({"skipped": "split runs on dcgan32 only; include it in --models"}, ["model"], [])
    ctx.ensure_ray()
    base = ctx.config(case)
    plains: dict[str, Any] = {}
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    try:
        for g, d, overlap in SPLIT_VARIANTS:
            name = f"g{g}d{d}{'_overlap' if overlap else ''}"
            threads = g + d
            reference = f"tuned_{threads}t"
            if reference not in plains:
                plains[reference] = plain_contender(base, threads)
            engine = EngineContender(ctx.config(case, topology={"kind": "split", "num_generators": g,
                                                                "num_discriminators": d, "overlap": overlap}))
            contenders = {reference: plains[reference], "split": engine}
            try:
                # Sized on the job: a multi-thread loop on a loaded machine can stall its OpenMP
                # threads by an order of magnitude, which would shrink every repetition to a round.
                row = compare(base.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                              reference=reference, size_on="split")
                row["time_split"] = time_split(contenders)
            finally:
                engine.close()
            target = SPLIT_TARGETS.get((g, d, overlap))
            row.update(ratio=row["split_ratio"], ratio_range=row["split_ratio_range"], processes=threads,
                       reference_threads=threads, target=target)
            data[name] = row
            rows.append([f"{g} G + {d} D", overlap, threads, spread(row, "split"), spread(row, reference),
                         ratio_cell(row, "ratio"), f">= {target}" if target is not None else None])
    finally:
        close_all(plains)
    return Report(data, ["workers", "overlap", "processes = reference threads", "split", "tuned loop (reference)",
                         "split / tuned", "target"], rows,
                  ["DCGAN-32, batch 64, 1 thread per worker; the reference is the tuned plain loop with as many "
                   "threads as the job has processes; overlap trains D on fakes of the previous G (staleness 1)."])
