"""Where one MLP round's time goes: ganray's round (the `ReplicaStepper` every replica runs, from
`build_replica`) and the tuned plain loop (`PlainGAN`), one thread, under `torch.profiler`, and
timed without it at two batch sizes.

    python -m ganray.bench.micro_profile --out docs/bench/micro-2026-12-07/profile-a.json

Per batch size: both contenders are built side by side, timed without the profiler in
alternation (`timing.alternate`, ms per round from each repetition), then each runs
`--profile-rounds` rounds under the CPU profiler; the JSON keeps each contender's top ops by
self CPU time (every op by default; per round: calls, self and total ms, share of the profiled
self time), the ops per round (a count, which the machine's load does not change) and the
matrix products' share (`aten::mm`, `aten::addmm`, `aten::bmm`). The profiler's own overhead
inflates the many small ops of this model, so the profiled shares say where the time goes and the
unprofiled times say how long a round takes. The JSON keeps every repetition, the settings, the
machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ganray.bench.plain import PlainGAN, StepperContender, training_set
from ganray.bench.timing import Contender, alternate

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_rounds(contender: Contender, rounds: int, top: int, per_round_images: int) -> dict[str, Any]:
    """`rounds` rounds of `contender` under the CPU profiler: the top ops by self CPU time."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        images = contender.run(rounds)
    wall = time.perf_counter() - t0
    assert images == rounds * per_round_images, (images, rounds, per_round_images)
    events = list(prof.key_averages())
    self_total = sum(e.self_cpu_time_total for e in events)  # microseconds
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [{"name": e.key, "calls_per_round": e.count / rounds,
            "self_ms_per_round": e.self_cpu_time_total / 1000 / rounds,
            "total_ms_per_round": e.cpu_time_total / 1000 / rounds,
            "self_share": e.self_cpu_time_total / self_total if self_total else 0.0}
           for e in (ranked[:top] if top > 0 else ranked)]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return {"rounds": rounds, "profiled_wall_ms_per_round": wall * 1000 / rounds,
            "self_ms_per_round": self_total / 1000 / rounds,
            "matmul_self_ms_per_round": matmul / 1000 / rounds,
            "matmul_self_share": matmul / self_total if self_total else 0.0,
            "distinct_ops": len(events), "ops_per_round": sum(e.count for e in events) / rounds, "top_ops": ops}


def ms_per_round(samples_per_s: list[float], images_per_round: int) -> list[float]:
    return [images_per_round / s * 1000 for s in samples_per_s]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure_batch(batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from ganray.bench.cases import case_config

    cfg = case_config("mlp", schedule={"batch_size": batch}).model_dump()
    contenders: dict[str, Contender] = {"ganray": StepperContender(cfg, threads=1),
                                        "tuned": PlainGAN(cfg, training_set(cfg), threads=1)}
    images = batch * int(cfg["schedule"]["n_critic"])
    samples = alternate(contenders, args.reps, args.rounds, warmup_rounds=args.warmup_rounds)
    times = {name: ms_per_round(v, images) for name, v in samples.items()}
    ratios = [g / t for g, t in zip(times["ganray"], times["tuned"])]
    return {"batch": batch, "rounds_per_rep": args.rounds, "reps": args.reps,
            "settings": {name: dict(getattr(c, "settings", {})) for name, c in contenders.items()},
            "ms_per_round": times, "ms_per_round_summary": {k: spread(v) for k, v in times.items()},
            "ganray_over_tuned_time_ratio": statistics.median(ratios),
            "ganray_over_tuned_time_ratio_range": [min(ratios), max(ratios)],
            "profile": {name: profile_rounds(c, args.profile_rounds, args.top, images)
                        for name, c in contenders.items()}}


def with_extra_calls(row: dict[str, Any]) -> dict[str, Any]:
    row["ganray_extra_calls_per_round"] = extra_calls(row)
    return row


def extra_calls(row: dict[str, Any]) -> dict[str, float]:
    """Calls per round that ganray's round makes beyond the tuned loop's, by op (where it makes more)."""
    mine = {o["name"]: o["calls_per_round"] for o in row["profile"]["ganray"]["top_ops"]}
    theirs = {o["name"]: o["calls_per_round"] for o in row["profile"]["tuned"]["top_ops"]}
    diff = {k: v - theirs.get(k, 0.0) for k, v in mine.items()}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1]))


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| batch | contender | ms/round, no profiler: median (min-max) | profiled self ms/round | matmul share | "
           "top ops by self time (ms/round) |", "|---|---|---|---|---|---|"]
    for row in rows:
        for name, prof in row["profile"].items():
            s = row["ms_per_round_summary"][name]
            tops = ", ".join(f"{o['name']} {o['self_ms_per_round']:.2f}" for o in prof["top_ops"][:5])
            out.append(f"| {row['batch']} | {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                       f"{prof['self_ms_per_round']:.2f} | {prof['matmul_self_share']:.0%} | {tops} |")
    for row in rows:
        extra = ", ".join(f"{k} +{v:g}" for k, v in list(row["ganray_extra_calls_per_round"].items())[:12])
        out.append(f"\nbatch {row['batch']}: ops per round ganray {row['profile']['ganray']['ops_per_round']:,.0f}, "
                   f"tuned {row['profile']['tuned']['ops_per_round']:,.0f}; ganray's extra calls per round: {extra}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """Profile and time the MLP round, ganray's and the tuned loop's, one thread; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--batches", default="256,512")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=60, help="rounds per timed repetition")
    parser.add_argument("--warmup-rounds", type=int, default=20)
    parser.add_argument("--profile-rounds", type=int, default=60)
    parser.add_argument("--top", type=int, default=0, help="ops kept per profile, by self time (0: every op)")
    args = parser.parse_args(argv)
    from ganray.bench.harness import machine_info

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    rows = [with_extra_calls(measure_batch(int(b), args)) for b in args.batches.split(",")]
    report = {"command": "python -m ganray.bench.micro_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": started, "wall_s": time.perf_counter() - t0, "machine": machine_info(),
              "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "settings": {**vars(args), "out": str(args.out), "case": "mlp", "threads": 1,
                           "torch_threads": torch.get_num_threads()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(rows))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
