"""The `compile` suite: `resources.compile: true` against the tuned eager loop and eager ganray.

Three contenders take turns in one window: the tuned plain loop (eager, the reference), ganray
replicated with 1 worker as it ships (eager), and the same job with `resources.compile: true`
(torch.compile of G's and D's forward passes in the phases without a double backward). The
compile time is reported apart: the compiled worker's first chunk less the eager one's, both
before any timed repetition. Before timing, the suite checks that compiling changes no result:
the same rounds in process, eager and compiled, G, D and G_ema compared tensor by tensor
(`equality`); a check that fails stops the suite, since speed of a different computation means
nothing.

BENCHMARKS.md asks only for a report, aiming at >= 1.1 over the tuned eager loop on the MLP,
where the per-step overhead that a compiled graph removes is largest.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import add_ratio, close_all, compare
from ganray.models.errors import GanrayError

COMPILE_AIM = {"mlp": 1.1}      # BENCHMARKS.md: report; aim >= 1.1 on the MLP
EQUALITY_ROUNDS = (20, 3)       # rounds of the equality check (full, --quick)
# Compiled kernels may sum in another order than eager ones: over a few rounds of Adam the
# weights drift apart by rounding only. A real divergence (a term dropped, a graph stale)
# moves them by the learning rate's order, far above this.
EQUALITY_TOL = {"rtol": 1e-3, "atol": 1e-4}


def compile_suite(ctx: BenchContext) -> Report:
    """ganray compiled and eager (replicated, 1 worker) against the tuned eager loop, 1 thread."""
    ctx.ensure_ray()
    # --quick proves the harness: aot_eager traces the same graphs without inductor's C++ build
    # (tens of seconds per network on 2 cores); the JSON names the backend.
    backend = "aot_eager" if ctx.quick else "inductor"
    data: dict[str, Any] = {"backend": backend, "torch": torch.__version__}
    rows: list[list[Any]] = []
    for case in ctx.models():
        replicated = {"kind": "replicated", "num_workers": 1}
        eager_cfg = ctx.config(case, topology=replicated)
        compiled_cfg = ctx.config(case, topology=replicated,
                                  resources={"compile": True, "compile_backend": backend})
        equality = check_equality(ctx.config(case, resources={"compile": True, "compile_backend": backend}),
                                  EQUALITY_ROUNDS[1 if ctx.quick else 0])
        if not equality["equal"]:
            raise GanrayError(f"bench compile: {case} compiled differs from eager beyond {EQUALITY_TOL} after "
                              f"{equality['rounds']} rounds (largest difference {equality['max_abs_diff']:.3g} "
                              f"in {equality['worst']}); not timing it")
        contenders: dict[str, Any] = {}
        try:
            contenders["tuned"] = plain_contender(ctx.config(case), 1)
            contenders["eager"] = EngineContender(eager_cfg)
            contenders["compiled"] = EngineContender(compiled_cfg)
            first_chunk = {name: _timed_run(contenders[name], ctx.warmup_rounds) for name in ("eager", "compiled")}
            row = compare(eager_cfg.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                          reference="tuned", size_on="eager")
            row["time_split"] = time_split(contenders)
        finally:
            close_all(contenders)
        add_ratio(row, "compiled_vs_eager_ratio", "compiled", "eager")
        row.update(ratio=row["compiled_ratio"], ratio_range=row["compiled_ratio_range"], threads=1,
                   equality=equality, first_chunk_s=first_chunk,
                   compile_s=round(first_chunk["compiled"] - first_chunk["eager"], 2),
                   aim=COMPILE_AIM.get(case))
        data[case] = row
        aim = COMPILE_AIM.get(case)
        rows.append([case, row["batch"], spread(row, "tuned"), spread(row, "eager"), spread(row, "compiled"),
                     ratio_cell(row, "eager_ratio"), ratio_cell(row, "compiled_ratio"),
                     ratio_cell(row, "compiled_vs_eager_ratio"), f"{row['compile_s']:.1f}",
                     f"{equality['max_abs_diff']:.2g}", f"report; aim >= {aim}" if aim else "report"])
    notes = [f"torch.compile backend {backend}, torch {torch.__version__}, 1 thread; ganray replicated with 1 worker "
             "through Ray, eager and with resources.compile: true, against the tuned eager plain loop. compile s: "
             "the compiled worker's first chunk less the eager worker's (inductor's on-disk cache, if warm from an "
             "earlier run, shortens it). max |diff|: the largest difference of any weight of G, D or G_ema after "
             f"the equality check's rounds, compiled against eager in one process (tolerance {EQUALITY_TOL})."]
    return Report(data, ["model", "batch", "tuned eager loop (reference)", "ganray eager", "ganray compiled",
                         "eager / tuned", "compiled / tuned", "compiled / eager", "compile s", "max |diff|",
                         "target"], rows, notes)


def _timed_run(contender: EngineContender, rounds: int) -> float:
    t0 = time.perf_counter()
    contender.run(rounds)
    return time.perf_counter() - t0


def check_equality(compiled_cfg: Any, rounds: int) -> dict[str, Any]:
    """The same `rounds` rounds in process, eager and compiled (the `local` replica of
    `compiled_cfg`, whose `resources.compile` is on): the largest weight difference and whether
    every tensor of G, D and G_ema agrees within `EQUALITY_TOL`."""
    from ganray.workers.stepper import build_replica

    tree = compiled_cfg.model_dump()
    eager_tree = {**tree, "resources": {**tree["resources"], "compile": False}}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(tree["resources"]["threads_per_worker"]))
    try:
        replicas = [build_replica(t) for t in (eager_tree, tree)]
        for replica in replicas:
            replica.run_rounds(rounds)
    finally:
        torch.set_num_threads(threads)
    worst, max_diff, equal = "", 0.0, True
    for net, (mine, theirs) in zip(("G", "D", "G_ema"), zip(replicas[1].modules(), replicas[0].modules())):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            if not a.is_floating_point():
                equal &= bool(torch.equal(a, b))
                continue
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if diff > max_diff:
                worst, max_diff = f"{net}.{name}", diff
            equal &= bool(torch.allclose(a, b, **EQUALITY_TOL))
    return {"rounds": rounds, "equal": equal, "max_abs_diff": max_diff, "worst": worst, "tolerance": EQUALITY_TOL}
