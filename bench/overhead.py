"""The `overhead` suite: `replicated` with 1 worker (and `local`) against the tuned plain loop, same
threads and batch, with the minimal loop as an extra row; on a machine with a GPU, the DCGAN-64
GPU rows too.

Targets are BENCHMARKS.md's; every figure is a median of per-repetition ratios with its range.
"""

from __future__ import annotations

from typing import Any

import torch

from ganray.bench.contenders import EngineContender, plain_contender, time_split
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.plain import gpu_rows
from ganray.bench.timing import close_all, compare

OVERHEAD_TARGET = 0.95


def overhead(ctx: BenchContext) -> Report:
    """`replicated` with 1 worker (and `local`) against the tuned plain loop, same threads and batch."""
    ctx.ensure_ray()
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for case in ctx.models():
        local_cfg = ctx.config(case)
        contenders: dict[str, Any] = {}
        try:
            contenders["tuned"] = plain_contender(local_cfg, 1)
            contenders["minimal"] = plain_contender(local_cfg, 1, tuned=False)
            contenders["replicated"] = EngineContender(ctx.config(case, topology={"kind": "replicated", "num_workers": 1}))
            contenders["local"] = EngineContender(local_cfg)
            row = compare(local_cfg.model_dump(), contenders, ctx.reps, ctx.rep_seconds(case), ctx.warmup_rounds,
                          reference="tuned")
            row["time_split"] = time_split(contenders)
        finally:
            close_all(contenders)
        row.update(ratio=row["replicated_ratio"], ratio_range=row["replicated_ratio_range"],
                   threads=1, target=OVERHEAD_TARGET)
        data[case] = row
        rows.append([case, row["batch"], 1, spread(row, "tuned"), spread(row, "minimal"), spread(row, "replicated"),
                     spread(row, "local"), ratio_cell(row, "ratio"), ratio_cell(row, "local_ratio"),
                     ratio_cell(row, "minimal_ratio"), f">= {OVERHEAD_TARGET}"])
    notes = ["samples/s: median (min-max) over the repetitions; ratios: median (min-max) of the per-repetition "
             "ratios to the tuned plain loop (fused Adam, foreach EMA, tensor-indexed batches, channels_last for "
             "conv nets on CPU) measured moments apart. The minimal loop (default Adam, a Python EMA loop) is an "
             "extra row, never the reference; each contender's settings are in the JSON."]
    if torch.cuda.is_available() and (ctx.options.models is None or "dcgan64" in ctx.options.models):
        gpu = _gpu_overhead(ctx)
        data.update(gpu)
        for name, row in gpu.items():
            rows.append([name, row["batch"], 1, spread(row, "tuned"), spread(row, "minimal"), spread(row, "ganray"),
                         None, ratio_cell(row, "ratio"), None, ratio_cell(row, "minimal_ratio"), f">= {OVERHEAD_TARGET}"])
        notes.append(f"GPU rows on {torch.cuda.get_device_name()}: {GPU_TIMED} (the 'replicated 1w' column).")
    else:
        data["gpu"] = None
    return Report(data, ["model", "batch", "threads", "tuned loop (reference)", "minimal loop", "replicated 1w",
                         "local", "replicated / tuned", "local / tuned", "minimal / tuned", "target"], rows, notes)


def gpu_engine_config(cfg: dict[str, Any]) -> Any:
    """The TrainConfig of ganray's contender in a GPU row: one replica holding one GPU, with the
    row's precision and memory format (`cfg` is a `plain.gpu_variant_cfg` dict)."""
    from ganray.orchestrator.job.config import config_from_dict

    tree = {**cfg, "topology": {"kind": "replicated", "num_workers": 1},
            "resources": {**cfg["resources"], "gpus_per_worker": 1.0}}
    return config_from_dict(tree)


GPU_TIMED = "ganray replicated, 1 worker holding the GPU, through Ray (one call per chunk)"


def _gpu_overhead(ctx: BenchContext) -> dict[str, Any]:
    base = ctx.config("dcgan64").model_dump(mode="json")
    return gpu_rows(base, ctx.reps, ctx.rep_seconds("dcgan64"), ctx.warmup_rounds,
                    engine_factory=lambda cfg: EngineContender(gpu_engine_config(cfg)), timed=GPU_TIMED)
