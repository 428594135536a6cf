"""The benchmark cases: the networks, data and batch every suite times, as config trees.

The image cases train on `data.name: random_images` (uniform noise, built into ganray's data
readers): throughput does not depend on pixel values, and a data set every worker can load by
name keeps the bench out of the workers' imports.
"""

from __future__ import annotations

import copy
from typing import Any

MODELS = ("mlp", "dcgan32")

# R1 is off so the plain loop's phase table is exactly ganray's round (the lazy-R1 cost is the
# same in both and says nothing about orchestration).
_BASE: dict[str, Any] = {
    "seed": 0,
    "loss": {"kind": "nonsaturating", "r1_gamma": 0.0},
    "resources": {"threads_per_worker": 1, "cpus_per_worker": 1.0, "device": "cpu"},
    "tracking": {"enabled": False},
    "topology": {"kind": "local"},
}
CASES: dict[str, dict[str, Any]] = {
    # The tiny MLP of the 2D recipes at batch 512: orchestration overhead shows here.
    "mlp": {"data": {"name": "grid25", "size": 100_000},
            "model": {"generator": "mlp", "discriminator": "mlp", "z_dim": 16, "hidden": 128, "depth": 3},
            "schedule": {"batch_size": 512, "n_critic": 1, "ema_half_life_kimg": 20.0}},
    # DCGAN at 32x32 at batch 64: compute dominates.
    "dcgan32": {"data": {"name": "random_images", "size": 2048, "resolution": 32},
                "model": {"generator": "dcgan", "discriminator": "dcgan", "z_dim": 100, "base_width": 64},
                "schedule": {"batch_size": 64, "n_critic": 1, "ema_half_life_kimg": 10.0}},
    # DCGAN at 64x64 on a GPU (the `overhead` suite's GPU rows).
    "dcgan64": {"data": {"name": "random_images", "size": 2048, "resolution": 64},
                "model": {"generator": "dcgan", "discriminator": "dcgan", "z_dim": 100, "base_width": 64},
                "schedule": {"batch_size": 64, "n_critic": 1, "ema_half_life_kimg": 10.0},
                "resources": {"device": "cuda", "gpus_per_worker": 1.0}},
}
# Seconds one timed repetition should last (full, quick), per case: long enough to dwarf the
# timer and the Ray call, short enough to alternate several times.
REP_SECONDS = {"mlp": (2.0, 0.3), "dcgan32": (4.0, 0.5), "dcgan64": (3.0, 0.5)}
# --quick: a narrow DCGAN on a small set proves the harness without minutes of convolutions.
QUICK_SECTIONS: dict[str, dict[str, Any]] = {
    "mlp": {"data": {"size": 8192}},
    "dcgan32": {"model": {"base_width": 16, "z_dim": 32}, "data": {"size": 256}},
    "dcgan64": {"model": {"base_width": 16, "z_dim": 32}, "data": {"size": 256}},
}


def merge(tree: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `tree` with `extra` merged in, section by section."""
    out = copy.deepcopy(tree)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def case_tree(case: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The config tree of a benchmark case with per-section overrides merged in."""
    tree = merge(merge(_BASE, CASES[case]), sections)
    if tree["topology"]["kind"] != "replicated":
        tree["topology"].pop("num_workers", None)
    return tree


def case_config(case: str, **sections: dict[str, Any]) -> Any:
    """A validated `TrainConfig` of a benchmark case (see `case_tree`)."""
    from ganray.orchestrator.job.config import config_from_dict

    return config_from_dict(case_tree(case, **sections))


def main(argv: list[str] | None = None) -> int:
    """`python -m ganray.bench.cases CASE > CONFIG.json`: a case's resolved config as JSON, the
    input of `python -m ganray.bench.plain` and `python -m ganray.bench.cpu_scaling` on hosts
    without pydantic (scripts/dcgan64-gpu.json is `dcgan64`)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("case", choices=sorted(CASES))
    args = parser.parse_args(argv)
    print(json.dumps(case_config(args.case).model_dump(mode="json"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
