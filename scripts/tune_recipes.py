"""Sweep and verify the shipped recipes (configs/grid25.yaml, ring8.yaml, digits.yaml).

Each variant is a shipped config plus `--set`-style overrides; it is trained by the real loop
(`ganray.orchestrator.job.trainer.Trainer`, `tracking.enabled=false`) and scored on G_ema by the
job's own `Evaluator` at every `eval.every_kimg` and at the end. One JSON line per evaluation and
a summary per variant (mean and spread over seeds) go to stdout, so a sweep can run under
`nohup` and be read while it runs. The wall time and the 1-minute load average are printed
beside every figure: these machines are shared, and a time means little without the load.

Examples:
    python scripts/tune_recipes.py configs/grid25.yaml                      # the shipped recipe
    python scripts/tune_recipes.py configs/grid25.yaml --seeds 0 1 2
    python scripts/tune_recipes.py configs/grid25.yaml \\
        --variant lr3e-4 schedule.g_lr=3e-4 schedule.d_lr=3e-4 \\
        --variant pack4 model.pack=4
    python scripts/tune_recipes.py configs/digits.yaml --set schedule.total_kimg=150
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

from ganray.orchestrator.job.config import load_config
from ganray.orchestrator.job.trainer import Trainer

# Figures summarised per variant; the first present decides the ordering of the summary.
SUMMARY_KEYS = ("modes", "hq", "kl", "fid", "fid_floor", "kid", "classifier_acc")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on every platform
        return float("nan")


def run_variant(config_path: str, overrides: list[str], seed: int, name: str) -> dict[str, Any]:
    """Train one (variant, seed) to the end; return its final scores, wall time and load."""
    cfg = load_config(config_path, [*overrides, f"seed={seed}", "tracking.enabled=false"])
    start = time.perf_counter()

    def report(images: int, scores: dict[str, float]) -> None:
        print(json.dumps({"variant": name, "seed": seed, "kimg": round(images / 1000, 1),
                          "wall_s": round(time.perf_counter() - start, 1), "load": round(_load(), 2),
                          **{k: round(v, 4) for k, v in scores.items()}}), flush=True)

    trainer = Trainer(cfg, progress=False, on_eval=report)
    result = trainer.run()
    return {"scores": dict(result.eval), "wall_s": result.wall_s, "load": _load()}


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (population std) of each figure over the seeds of one variant."""
    out: dict[str, Any] = {"variant": name, "seeds": len(runs)}
    for key in (*SUMMARY_KEYS, "wall_s", "load"):
        values = [r["scores"][key] if key in r["scores"] else r.get(key) for r in runs]
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if values:
            out[key] = round(statistics.fmean(values), 4)
            out[f"{key}_std"] = round(statistics.pstdev(values), 4)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a shipped config, e.g. configs/grid25.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every variant (repeatable)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a named variant: NAME followed by its overrides (repeatable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run each variant with")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    variants = [(v[0], v[1:]) for v in args.variant] or [("shipped", [])]
    summaries = []
    for name, overrides in variants:
        runs = []
        for seed in args.seeds:
            run = run_variant(args.config, [*args.overrides, *overrides], seed, name)
            print(json.dumps({"variant": name, "seed": seed, "final": True, "wall_s": round(run["wall_s"], 1),
                              "load": round(run["load"], 2),
                              **{k: round(v, 4) for k, v in run["scores"].items()}}), flush=True)
            runs.append(run)
        summaries.append(summarise(name, runs))
    for summary in summaries:
        print(json.dumps({"summary": True, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
