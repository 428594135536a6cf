"""Micro-benchmarks of the replicas' gradient all-reduce between two processes on one host: what
a sum costs right after the previous one, and after each side has slept or computed (the cost of
waking a thread that sleeps in a blocking receive, which workers/shared_slots.py exists to avoid).

    python -m ganray.bench.micro_collective --out docs/bench/micro-2026-12-07/collective-a.json

Two spawned processes, one thread each, run two parts; every (condition, size) of a part is
taken once per repetition, in a rotating order, so a shared machine's drift hits them alike:

- `exchange`: a raw gloo `isend`/`irecv` swap of one float32 buffer (what recursive doubling does
  per round), back to back (after an untimed swap), after each side sleeps `--compute-ms`, after
  each side computes a fixed workload of about `--compute-ms`, and with the receive posted before
  that compute; beside them gloo's own `all_reduce` of the same buffer, back to back.
- `all_reduce`: ganray's own `Collective.start_all_reduce_mean(...).wait()` on a list of tensors
  shaped like a network's parameters (`mlp:G` is 35k floats, `dcgan32:G` and `dcgan32:D` the
  DCGAN-32 networks of the bench cases; an integer is one flat tensor of that many floats), by
  `collective: gloo` (pairwise exchange up to `EXCHANGE_MAX_NUMEL` elements, gloo's ring above)
  and by shared memory (`collective: auto` on one host), back to back and after the compute.

The fixed workload is `matmuls` products of two 128x128 matrices; rank 0 picks the count once, at
start, so that it lasts about `--compute-ms` on an uncontended core, and both ranks then run that
same count: what each repetition's compute actually took is recorded beside it (longer when the
machine is shared). Each op's start and end are recorded on both ranks (one
monotonic clock for the host); the headline figure of an op is the time from the later rank's
call until both have the result, so the other rank's lateness (a skew, large on a loaded machine)
is not counted, while the wait of a rank that slept in its receive is. The JSON keeps every
repetition of both ranks, each rank's own times, the skew, the settings, the machine and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ganray.workers.collective import EXCHANGE_MAX_NUMEL, Collective, free_port

# The last one is not a swap: gloo's own all_reduce of the same buffer, back to back, which the
# pairwise exchange replaced for small buffers (workers/collective.py).
EXCHANGE_CONDITIONS = ("back_to_back", "after_sleep", "after_compute", "recv_posted_before_compute",
                       "gloo_all_reduce_back_to_back")
ALL_REDUCE_CONDITIONS = ("back_to_back", "after_compute")
MODES = ("gloo", "shared")
# 1.4 KB, the MLP generator's gradient (140 KB) and 1.4 MB.
DEFAULT_EXCHANGE_SIZES = (352, 35_458, 352_000)
DEFAULT_BUFFERS = ("mlp:G", "dcgan32:G", "dcgan32:D")
SAMPLE_SHAPES = {"mlp": (2,), "dcgan32": (3, 32, 32)}  # the bench cases' data (bench/cases.py)
MATMUL_SIDE = 128


# -- what is reduced ----------------------------------------------------------------------------
def buffer_shapes(spec: str) -> list[list[int]]:
    """The tensor shapes of a buffer spec: "CASE:G" / "CASE:D" (that network's parameters in the
    bench case, the list a replica all-reduces) or an integer (one flat tensor)."""
    if spec.isdigit():
        return [[int(spec)]]
    case, _, net = spec.partition(":")
    if case not in SAMPLE_SHAPES or net not in ("G", "D"):
        raise SystemExit(f"--buffers: {spec!r} is neither an integer nor one of "
                         f"{', '.join(f'{c}:G, {c}:D' for c in SAMPLE_SHAPES)}")
    from ganray.bench.cases import case_tree
    from ganray.models.registry import build_discriminator, build_generator

    # The case's own tree, not its validated config: the registry fills the same defaults, and the
    # script then runs on a host with nothing but PyTorch (a GPU machine's many cores).
    model = case_tree(case)["model"]
    build = build_generator if net == "G" else build_discriminator
    return [list(p.shape) for p in build(model, SAMPLE_SHAPES[case]).parameters()]


def gloo_path(numel: int) -> str:
    """What `collective: gloo` runs for this many elements between two CPU ranks."""
    return "pairwise isend/irecv exchange" if numel <= EXCHANGE_MAX_NUMEL else "gloo ring all_reduce"


# -- the two ranks ------------------------------------------------------------------------------
def _compute(matmuls: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    for _ in range(matmuls):
        torch.mm(a, b, out=c)


def _calibrate(compute_ms: float, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> int:
    """Matmuls that take about `compute_ms` on a core this rank has to itself: the fastest of a
    few tries, since on a shared machine the slower ones measure the neighbours."""
    per = []
    for _ in range(10):
        t0 = time.perf_counter()
        _compute(20, a, b, c)
        per.append((time.perf_counter() - t0) / 20)
    return max(1, round(compute_ms / 1000 / min(per)))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _exchange(buf: torch.Tensor, other: torch.Tensor, peer: int) -> None:
    import torch.distributed as dist

    ops = (dist.isend(buf, peer), dist.irecv(other, peer))
    for op in ops:
        op.wait()


def _timed_exchange(condition: str, buf: torch.Tensor, other: torch.Tensor, peer: int,
                    prelude: Callable[[], None], sleep_s: float) -> list[float]:
    import torch.distributed as dist

    if condition == "recv_posted_before_compute":
        recv = dist.irecv(other, peer)
        prelude()
        t0 = time.perf_counter()
        dist.isend(buf, peer).wait()
        recv.wait()
        return [t0, time.perf_counter()]
    if condition == "gloo_all_reduce_back_to_back":
        other.zero_()  # summed in place every call: zeros stay finite however many repetitions
        dist.all_reduce(other)
        t0 = time.perf_counter()
        dist.all_reduce(other)
        return [t0, time.perf_counter()]
    if condition == "back_to_back":
        _exchange(buf, other, peer)
    elif condition == "after_sleep":
        time.sleep(sleep_s)
    else:
        prelude()
    t0 = time.perf_counter()
    _exchange(buf, other, peer)
    return [t0, time.perf_counter()]


def _rotation(items: list[Any], rep: int) -> list[Any]:
    k = rep % len(items)
    return items[k:] + items[:k]


def _rank_main(rank: int, ports: tuple[int, int], settings: dict[str, Any], results: Any) -> None:
    """One rank: join two groups, calibrate, run both parts, put this rank's figures on `results`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(rank)
    peer, cpu = 1 - rank, torch.device("cpu")
    shapes = {spec: settings["buffer_shapes"][spec] for spec in settings["buffers"]}
    largest = max([sum(_numel(s) for s in ss) for ss in shapes.values()] + [1])
    # `collective: gloo` first; the shared one's join then replaces the default process group with
    # a new gloo group among the same two processes, which the gloo Collective's calls use from
    # then on. So both live at once and alternate within each repetition.
    gloo = Collective(rank, 2, cpu)
    gloo.join("127.0.0.1", ports[0], timeout_s=settings["timeout_s"], collective="gloo")
    shared = Collective(rank, 2, cpu)
    shared.join("127.0.0.1", ports[1], timeout_s=settings["timeout_s"], shared_numel=largest, collective="auto")
    if shared.slots is None:
        results.put(("error", rank, "shared memory was not available to both ranks: " + shared.path()))
        return
    a = torch.rand(MATMUL_SIDE, MATMUL_SIDE)
    b, product = torch.rand(MATMUL_SIDE, MATMUL_SIDE), torch.empty(MATMUL_SIDE, MATMUL_SIDE)
    count = torch.tensor([_calibrate(settings["compute_ms"], a, b, product) if rank == 0 else 0])
    dist.broadcast(count, src=0)
    matmuls = int(count)
    compute_ms: list[float] = []

    def prelude() -> None:
        t0 = time.perf_counter()
        _compute(matmuls, a, b, product)
        compute_ms.append(_ms(t0))

    sleep_s = settings["compute_ms"] / 1000
    # Each op: [start, end] on this rank's perf_counter, which on Linux is CLOCK_MONOTONIC, one
    # clock for every process of the host: so the two ranks' times can be set against each other.
    exchange: dict[str, dict[str, list[list[float]]]] = {c: {str(n): [] for n in settings["exchange_sizes"]}
                                                   for c in EXCHANGE_CONDITIONS}
    pairs = {str(n): (torch.rand(n), torch.empty(n)) for n in settings["exchange_sizes"]}
    items = [(c, n) for c in EXCHANGE_CONDITIONS for n in pairs]
    for rep in range(settings["exchange_reps"]):
        for condition, n in _rotation(items, rep):
            buf, other = pairs[n]
            exchange[condition][n].append(_timed_exchange(condition, buf, other, peer, prelude, sleep_s))

    groups = {"gloo": gloo, "shared": shared}
    tensors = {spec: [torch.rand(s) for s in ss] for spec, ss in shapes.items()}
    all_reduce: dict[str, dict[str, dict[str, list[list[float]]]]] = {
        m: {spec: {c: [] for c in ALL_REDUCE_CONDITIONS} for spec in tensors} for m in MODES}
    items = [(m, spec, c) for m in MODES for spec in tensors for c in ALL_REDUCE_CONDITIONS]
    for rep in range(settings["all_reduce_reps"]):
        for mode, spec, condition in _rotation(items, rep):
            group, ts = groups[mode], tensors[spec]
            if condition == "back_to_back":
                group.start_all_reduce_mean(ts).wait()
            else:
                prelude()
            t0 = time.perf_counter()
            group.start_all_reduce_mean(ts).wait()
            all_reduce[mode][spec][condition].append([t0, time.perf_counter()])
    paths = {"gloo": gloo.path(), "shared": shared.path()}
    shared.leave()
    gloo.leave()
    results.put(("done", rank, {"matmuls": matmuls, "compute_ms": compute_ms, "exchange": exchange,
                                "all_reduce": all_reduce, "paths": paths}))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def run_ranks(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Both ranks in spawned processes; returns their figures, rank 0 first."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ports = (free_port(), free_port())
    procs = [ctx.Process(target=_rank_main, args=(r, ports, settings, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=settings["timeout_s"] * 4) for _ in range(2)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [g for g in got if g[0] != "done"]
    if errors:
        raise SystemExit(f"micro_collective: rank {errors[0][1]}: {errors[0][2]}")
    return [g[2] for g in sorted(got, key=lambda g: g[1])]


# -- summaries ----------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, min and max of repeated timings (ms)."""
    cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": cuts[0], "p90": cuts[-1],
            "min": min(values), "max": max(values), "n": len(values)}


def op_times(per_rank: list[list[list[float]]]) -> dict[str, list[float]]:
    """From each rank's [start, end] of the same ops: the time both ranks see from the moment
    the later one called until both have the result (`after_last_arrival_ms`: a wake-up shows
    here, the other rank's lateness does not), each rank's own time (`rank<r>_ms`), and how far
    apart the two calls were (`skew_ms`)."""
    out: dict[str, list[float]] = {"after_last_arrival_ms": [], "skew_ms": []}
    for r in range(len(per_rank)):
        out[f"rank{r}_ms"] = [(e - b) * 1000 for b, e in per_rank[r]]
    for ops in zip(*per_rank):
        starts, ends = [o[0] for o in ops], [o[1] for o in ops]
        out["after_last_arrival_ms"].append((max(ends) - max(starts)) * 1000)
        out["skew_ms"].append((max(starts) - min(starts)) * 1000)
    return out


def _ratio(num: list[float], den: list[float]) -> dict[str, float]:
    return spread([a / b for a, b in zip(num, den) if b > 0])


HEADLINE = "after_last_arrival_ms"


def summarise(ranks: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Per op: the spread of `op_times`; and the ratios that carry the point, per repetition."""
    out: dict[str, Any] = {"exchange": {}, "all_reduce": {}, "ratios": {}}
    times: dict[str, dict[str, list[float]]] = {}
    for c in EXCHANGE_CONDITIONS:
        for n in map(str, settings["exchange_sizes"]):
            times[f"exchange {c} {n}"] = t = op_times([r["exchange"][c][n] for r in ranks])
            out["exchange"][f"{c} {n}"] = {k: spread(v) for k, v in t.items()}
    for m in MODES:
        for spec in settings["buffers"]:
            for c in ALL_REDUCE_CONDITIONS:
                times[f"all_reduce {m} {spec} {c}"] = t = op_times([r["all_reduce"][m][spec][c] for r in ranks])
                out["all_reduce"][f"{m} {spec} {c}"] = {k: spread(v) for k, v in t.items()}
    for n in map(str, settings["exchange_sizes"]):
        b2b = times[f"exchange back_to_back {n}"][HEADLINE]
        for c in EXCHANGE_CONDITIONS[1:]:
            out["ratios"][f"exchange {n}: {c} / back_to_back"] = _ratio(times[f"exchange {c} {n}"][HEADLINE], b2b)
    for spec in settings["buffers"]:
        for c in ALL_REDUCE_CONDITIONS:
            g, s = (times[f"all_reduce {m} {spec} {c}"][HEADLINE] for m in MODES)
            out["ratios"][f"all_reduce {spec} {c}: gloo / shared"] = _ratio(g, s)
    out["compute_ms_per_rank"] = [spread(r["compute_ms"]) for r in ranks]
    return out


def markdown(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} ({s['p10']:.2f}-{s['p90']:.2f})"

    lines = ["exchange (ms from the later rank's call until both have the result; median (p10-p90)):", "",
             "| floats | " + " | ".join(EXCHANGE_CONDITIONS) + " |", "|---|" + "---|" * len(EXCHANGE_CONDITIONS)]
    for n in map(str, settings["exchange_sizes"]):
        lines.append(f"| {int(n):,} | " + " | ".join(cell(summary["exchange"][f"{c} {n}"][HEADLINE])
                                                     for c in EXCHANGE_CONDITIONS) + " |")
    lines += ["", "Collective all-reduce (ms, same):", "",
              "| buffer | floats | gloo path | gloo, back to back | shared, back to back | gloo, after compute "
              "| shared, after compute | gloo / shared after compute |", "|---|---|---|---|---|---|---|---|"]
    for spec in settings["buffers"]:
        numel = settings["buffer_numel"][spec]
        row = [spec, f"{numel:,}", gloo_path(numel)]
        for c in ALL_REDUCE_CONDITIONS:
            row += [cell(summary["all_reduce"][f"{m} {spec} {c}"][HEADLINE]) for m in MODES]
        row.append(cell(summary["ratios"][f"all_reduce {spec} after_compute: gloo / shared"]))
        lines.append("| " + " | ".join(row) + " |")
    skew = [summary["exchange"][f"after_compute {n}"]["skew_ms"]["median"] for n in map(str, settings["exchange_sizes"])]
    lines += ["", "compute before an op, ms (median (p10-p90)) per rank: "
              + "; ".join(cell(s) for s in summary["compute_ms_per_rank"])
              + "; median skew between the ranks' calls after it (exchange): " + ", ".join(f"{x:.2f}" for x in skew)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Time the exchange and the Collective all-reduce between two local processes; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--exchange-reps", type=int, default=100)
    parser.add_argument("--all-reduce-reps", type=int, default=50)
    parser.add_argument("--compute-ms", type=float, default=4.0,
                        help="the sleep, and the fixed compute's calibrated length, before a timed op")
    parser.add_argument("--exchange-sizes", default=",".join(map(str, DEFAULT_EXCHANGE_SIZES)))
    parser.add_argument("--buffers", default=",".join(DEFAULT_BUFFERS))
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    from ganray.bench.harness import machine_info

    buffers = [b.strip() for b in args.buffers.split(",") if b.strip()]
    shapes = {spec: buffer_shapes(spec) for spec in buffers}
    settings: dict[str, Any] = {
        "exchange_reps": args.exchange_reps, "all_reduce_reps": args.all_reduce_reps,
        "compute_ms": args.compute_ms, "compute": f"matmuls of two {MATMUL_SIDE}x{MATMUL_SIDE} float32 matrices",
        "exchange_sizes": [int(n) for n in args.exchange_sizes.split(",")], "buffers": buffers,
        "buffer_shapes": shapes, "buffer_numel": {s: sum(_numel(x) for x in ss) for s, ss in shapes.items()},
        "processes": 2, "threads_per_process": 1, "timeout_s": args.timeout_s,
        "exchange_max_numel": EXCHANGE_MAX_NUMEL,
    }
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    ranks = run_ranks(settings)
    wall = time.perf_counter() - t0
    summary = summarise(ranks, settings)
    report = {"command": "python -m ganray.bench.micro_collective " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:]),
              "date": started, "wall_s": wall, "machine": machine_info(),
              "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "settings": settings, "matmuls": ranks[0]["matmuls"], "paths": ranks[0]["paths"],
              "summary": summary, "ranks": ranks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(summary, settings))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; {wall:.0f} s; "
          f"{ranks[0]['matmuls']} matmuls of compute; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
