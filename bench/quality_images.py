"""The image rows of the `quality` suite: stacked digits (1,000 modes) and class-conditional digits.

The protocol of the 2D sets (bench/quality.py): the shipped recipe trained once per seed (held
out by default: 1000 and up), evaluated every `probe_kimg` through `ProbedTrainer`, the final
evaluation reported beside the best one, the training seconds to the target, misses counted
(a seed misses when its *final* evaluation falls short).

- `stacked-digits` (configs/stacked-digits.yaml): the Stacked MNIST protocol on the bundled
  digits. Target: all 1,000 modes and KL <= 0.1 against uniform, within 10 minutes of training.
  Published anchors (PacGAN, Table 3, Stacked MNIST): DCGAN 99 modes / KL 3.40, VEEGAN 150 / 2.95,
  PacDCGAN2 1000 / 0.06.
- `digits-conditional` (configs/digits-conditional.yaml): G(z, class) with a projection D. Target:
  >= 95% of the samples classified as the class asked for, in every class (`class_acc_min`, by a
  classifier that plays no part in training or FID).

`--set key=value` (the bench command's) applies to every run, e.g. the issue's other layouts:
`--set topology.num_workers=2`, or `--set topology.kind=split --set topology.num_discriminators=2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ganray.bench.harness import BenchContext
from ganray.bench.quality import ProbedTrainer, stats, trainer_config


@dataclass(frozen=True)
class ImageSet:
    config: str
    metrics: tuple[str, ...]   # reported per seed, final and best; the first decides "best"
    higher_is_better: tuple[bool, ...]
    target: Callable[[dict[str, Any]], bool]
    target_text: str
    budget_s: float            # the goal's training time
    published: dict[str, dict[str, float]]


IMAGE_SETS: dict[str, ImageSet] = {
    "stacked-digits": ImageSet(
        config="stacked-digits", metrics=("modes", "kl", "confidence"), higher_is_better=(True, False, True),
        target=lambda p: (p.get("modes") or 0) >= 1000 and _finite(p.get("kl")) <= 0.1,
        target_text="all 1,000 modes and KL <= 0.1", budget_s=600.0,
        published={"DCGAN (PacGAN T3)": {"modes": 99, "kl": 3.40}, "VEEGAN (PacGAN T3)": {"modes": 150, "kl": 2.95},
                   "PacDCGAN2 (PacGAN T3)": {"modes": 1000, "kl": 0.06}}),
    "digits-conditional": ImageSet(
        config="digits-conditional", metrics=("class_acc_min", "class_acc", "fid", "kid_class_mean", "confidence",
                                              "class_share_min", "near_copies"),
        higher_is_better=(True, True, False, False, True, True, False),
        target=lambda p: (p.get("class_acc_min") or 0.0) >= 0.95,
        target_text=">= 95% of samples classified as the class asked for, every class", budget_s=600.0,
        published={}),
}


def _finite(value: Optional[float]) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.inf


def first_met(timeline: list[dict[str, float]], image_set: ImageSet) -> Optional[float]:
    return next((float(p["wall_s"]) for p in timeline if image_set.target(p)), None)


def best_of(timeline: list[dict[str, float]], image_set: ImageSet) -> dict[str, Any]:
    """The seed's best evaluation, by its metrics in order (a tie on the first, e.g. every stacked-
    digits evaluation with all 1,000 modes, goes to the better second); reported beside the final
    one, never instead."""
    if not timeline:
        return {}

    def rank(point: dict[str, float]) -> tuple[float, ...]:
        signed = zip(image_set.metrics, image_set.higher_is_better)
        return tuple(_finite_or(point.get(key), up) for key, up in signed)

    best = max(timeline, key=rank)
    return {k: best.get(k) for k in ("kimg", "wall_s", *image_set.metrics)}


def _finite_or(value: Optional[float], higher_is_better: bool) -> float:
    """`value` signed so that larger ranks better; a missing or NaN value ranks last."""
    if value is None or math.isnan(value):
        return -math.inf
    return float(value) if higher_is_better else -float(value)


def quality_image_set(ctx: BenchContext, name: str, seeds: list[int], overrides: Sequence[str]) -> dict[str, Any]:
    """Train `configs/<name>.yaml` once per seed and report final and best evaluations, time to
    the target and misses (the JSON body of the set)."""
    image_set = IMAGE_SETS[name]
    kimg = ctx.options.kimg if ctx.options.kimg is not None else (2.0 if ctx.quick else None)
    # Without --kimg, the recipe's own evaluation cadence: an evaluation of stacked digits scores
    # 26,000 samples, so probing every 25 kimg of a 3,000-kimg run would cost more than training.
    probe = max((kimg or 100.0) / 2, 0.5) if ctx.quick or kimg is not None else None
    per_seed: list[dict[str, Any]] = []
    cfg = None
    for seed in seeds:
        cfg = trainer_config(image_set.config, seed, kimg, probe, overrides)
        if cfg.topology.kind != "local":
            ctx.ensure_ray()
        trainer = ProbedTrainer(cfg, progress=False)
        result = trainer.run()
        final = {k: result.eval.get(k) for k in image_set.metrics}
        per_seed.append({"seed": seed, "kimg": result.images_seen / 1000.0, "wall_s": result.wall_s, **final,
                         "final_meets_target": image_set.target(result.eval),
                         "time_to_target_s": first_met(trainer.timeline, image_set),
                         "best": best_of(trainer.timeline, image_set), "timeline": trainer.timeline})
    assert cfg is not None
    header = {"config": f"configs/{image_set.config}.yaml", "overrides": list(overrides),
              "topology": cfg.topology.model_dump(), "total_kimg": cfg.schedule.total_kimg,
              "probe_kimg": cfg.eval.every_kimg}
    return summarize(name, header, per_seed)


# What runs of one set must share for their seeds to be reported together (`quality_merge`).
HEADER_KEYS = ("config", "overrides", "topology", "total_kimg", "probe_kimg")


def summarize(name: str, header: dict[str, Any], per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON body of image set `name` from its per-seed records: the final and best figures
    over seeds, time to target and misses, beside the run settings in `header`."""
    image_set = IMAGE_SETS[name]
    return {**{k: header[k] for k in HEADER_KEYS},
            "target": image_set.target_text, "budget_s": image_set.budget_s, "seeds": per_seed,
            "ganray": {k: stats([s[k] for s in per_seed]) for k in (*image_set.metrics, "time_to_target_s", "wall_s")},
            "ganray_best": {k: stats([s["best"].get(k) for s in per_seed]) for k in image_set.metrics},
            "misses_final": sum(not s["final_meets_target"] for s in per_seed),
            "misses_within_budget": sum(s["time_to_target_s"] is None or s["time_to_target_s"] > image_set.budget_s
                                        for s in per_seed),
            "published": image_set.published}


def image_set_note(name: str, res: dict[str, Any], seed_label: str,
                   cell: Callable[..., str]) -> str:
    """One line of the report per image set: final figures, best ones, time to target, misses."""
    image_set = IMAGE_SETS[name]
    g, b = res["ganray"], res["ganray_best"]
    n = len(res["seeds"])
    finals = ", ".join(f"{k} {cell(g[k], digits=3)}" for k in image_set.metrics)
    bests = ", ".join(f"{k} {cell(b[k], digits=3)}" for k in image_set.metrics)
    anchors = "; ".join(f"{m}: " + " / ".join(f"{k} {v:g}" for k, v in fig.items())
                        for m, fig in image_set.published.items())
    layout = f" ({' '.join(res['overrides'])})" if res["overrides"] else ""
    return (f"{name}{layout}, {seed_label}, target {image_set.target_text} within {image_set.budget_s:g} s: final {finals}; "
            f"best evaluation {bests}; s to target {cell(g['time_to_target_s'], digits=0)}; misses (final) "
            f"{res['misses_final']}/{n}, misses within the budget {res['misses_within_budget']}/{n}"
            + (f". Published: {anchors}." if anchors else "."))
