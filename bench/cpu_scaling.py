"""`replicated` scaling on a many-core host that has PyTorch but not Ray: N processes x 1 thread
running ganray's replica round (`build_replica` + `Collective`, the code every `ReplicaWorker`
runs) against the tuned plain loop with N threads (`PlainGAN`'s default, the reference of every
suite), in alternation, as `ganray bench scaling` does.

What it leaves out is Ray itself: the actors, the placement group and the driver's call per
chunk (one Ray call per many rounds; `ganray bench scaling` measures all of it on hosts with Ray).
What it keeps is what scales with the worker count: sharding, the per-phase all-reduces and their
overlap with compute.

Usage (CONFIG is a resolved job config as JSON, e.g. `TrainConfig.model_dump()` of a bench case):
    python -m ganray.bench.cpu_scaling CONFIG.json [CONFIG.json ...] --workers 1,2,4,8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ganray.bench.plain import PlainGAN, training_set
from ganray.bench.timing import close_all, compare
from ganray.workers.collective import Collective, free_port
from ganray.workers.stepper import build_replica


def _rank_main(cfg: dict[str, Any], rank: int, world: int, port: int, commands: Any, results: Any) -> None:
    """One replica: build, join the group, then run `n` rounds per command until told to stop."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = Collective(rank, world, torch.device("cpu"))
    stepper = build_replica(cfg, rank, world, start_sync=group.start_all_reduce_mean if world > 1 else None)
    group.join("127.0.0.1", port, timeout_s=120)
    results.put(("ready", rank))
    while True:
        n = commands.get()
        if n is None:
            break
        if world > 1:
            dist.barrier()  # every rank starts the window together, as one Ray call per chunk does
        t0 = time.perf_counter()
        out = stepper.run_rounds(n)
        results.put(("done", rank, time.perf_counter() - t0, out["time_comm_s"]))
    group.leave()


class ProcessReplicas:
    """N replica processes as a timing contender: `run(n)` returns the images the job consumed."""

    def __init__(self, cfg: dict[str, Any], world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.batch = int(cfg["schedule"]["batch_size"]) * int(cfg["schedule"]["n_critic"])
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(cfg, r, world, port, self.commands[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            msg = self.results.get(timeout=300)
            assert msg[0] == "ready", msg
        self.comm_s = 0.0
        self.settings = {"contender": f"ganray's replica round in {world} processes x 1 thread (no Ray)",
                         "workers": world, "threads_per_worker": 1, "adam": "fused", "ema": "foreach lerp"}

    def run(self, n_rounds: int) -> int:
        for q in self.commands:
            q.put(n_rounds)
        done = [self.results.get(timeout=600) for _ in range(self.world)]
        self.comm_s += max(d[3] for d in done)
        return n_rounds * self.batch

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", type=Path, nargs="+")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="target time of one timed repetition")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    counts = [int(n) for n in args.workers.split(",")]
    report: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__, "workers": counts,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for path in args.configs:
        cfg = json.loads(path.read_text())
        data = training_set(cfg)
        rows = {}
        for n in counts:
            contenders: dict[str, Any] = {"tuned": PlainGAN(cfg, data, n), "replicated": ProcessReplicas(cfg, n)}
            try:
                row = compare(cfg, contenders, args.reps, args.seconds, warmup_rounds=3, reference="tuned")
            finally:
                close_all(contenders)
            row["replicated_comm_s"] = contenders["replicated"].comm_s
            rows[str(n)] = row
            s = row["summary"]
            print(f"{path.stem} {n:>2} workers/threads: tuned loop {s['tuned']['median']:9.1f}/s  "
                  f"replicated {s['replicated']['median']:9.1f}/s  ratio {row['replicated_ratio']:.2f} "
                  f"({row['replicated_ratio_range'][0]:.2f}-{row['replicated_ratio_range'][1]:.2f})", flush=True)
            report[path.stem] = rows
            # Written after every row: a run cut short still leaves what it measured.
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "cpu_scaling.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
