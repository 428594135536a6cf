"""`ganray compare`: train each learner on one config's data at the same budget, score them alike.

Per seed, the GAN trains first: with no `--budget-s`, its training seconds for the recipe's
`schedule.total_kimg` are every other learner's budget (`budget.BudgetEngine` stops a learner when
they are spent, or at `total_kimg`, whichever comes first). Each learner is a child MLflow run of
one parent run and trains through the very `Trainer` `ganray train` runs.

Two tables come out:
- `time`: every learner after the same wall-clock budget (scores of its final state, sampling
  cost, training seconds, images seen);
- `images`: every learner after the same number of real images seen: the largest point of a
  geometric ladder of image counts that every learner reached within its budget, each learner's
  state captured there during its one training run (`BudgetEngine.captures`: deterministic
  training makes it the state of a run stopped there).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ganray.models.errors import ConfigError
from ganray.orchestrator.compare.budget import BudgetEngine, budget_engine_factory
from ganray.orchestrator.compare.child_run import CompareChildHooks
from ganray.orchestrator.compare.figure import compare_figure, panel_title
from ganray.orchestrator.compare.learners import Recipe, learner_config
from ganray.orchestrator.compare.table import markdown_tables
from ganray.orchestrator.compare.measure import SAMPLES_FOR_COST, evals_per_sample, scores, summarise, timed_samples
from ganray.orchestrator.compare.stop_signals import CompareStopped, StopSignals
from ganray.orchestrator.job.config import TrainConfig
from ganray.orchestrator.job.engine import build_eval_generator
from ganray.orchestrator.job.evaluate import Evaluator

Say = Callable[[str], None]


LADDER_STEPS_PER_DOUBLING = 4   # image counts 2^(1/4) apart: the common point is within 19% of the slowest
LADDER_MIN_ROUNDS = 1  # every learner trains one round at least: the ladder always has a common point


def say_on_stderr(line: str) -> None:
    print(f"compare: {line}", file=sys.stderr, flush=True)


@dataclass
class LearnerRun:
    """One learner's training at one seed, as the runner keeps it until it is scored."""

    learner: str
    seed: int
    config: TrainConfig
    run_id: Optional[str]
    train_s: float
    images_seen: int
    eval: dict[str, float]
    generator: torch.nn.Module
    sample_shape: tuple[int, ...]
    captures: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)


def image_ladder(total_images: int, images_per_round: int) -> list[int]:
    """Image counts from the job's end down by 2^(1/4) steps to one round, on round boundaries."""
    points, k = {images_per_round}, 0
    floor = LADDER_MIN_ROUNDS * images_per_round
    while True:
        n = total_images * 2.0 ** (-k / LADDER_STEPS_PER_DOUBLING)
        if n < floor:
            break
        points.add(math.ceil(n / images_per_round - 1e-9) * images_per_round)  # the round that reaches n
        k += 1
    return sorted(points)


def open_parent_run(base: TrainConfig, tracking_uri: Optional[str], learners: list[str], seeds: list[int],
                    budget_s: Optional[float]) -> Any:
    from ganray.orchestrator.tracking import store as tracking
    from ganray.orchestrator.tracking.run_logger import RunLogger

    uri = tracking.resolve_tracking_uri(tracking_uri, base.tracking.uri)
    experiment_id = tracking.prepare_store(uri, base.tracking.experiment)
    parent = RunLogger(uri, experiment_id, run_name=f"compare-{base.data.name}",
                       tags={**tracking.run_tags(base), "ganray.compare": "parent"},
                       buffer_size=base.tracking.buffer_size)
    parent.log_params({"compare.learners": ",".join(learners), "compare.seeds": ",".join(map(str, seeds)),
                       "compare.budget_s": "gan total_kimg" if budget_s is None else budget_s})
    parent.log_text(base.to_yaml(), tracking.CONFIG_ARTIFACT)
    return parent


def train_learner(config: TrainConfig, learner: str, seed: int, budget_s: Optional[float],
                  capture_at: list[int], parent: Any, tracking_uri: Optional[str], progress: bool = True,
                  stops: Optional[StopSignals] = None) -> LearnerRun:
    from ganray.orchestrator.job.trainer import Trainer

    kept: list[BudgetEngine] = []
    hooks = CompareChildHooks(config, parent, learner, seed)
    trainer = Trainer(config, tracking_uri=tracking_uri, progress=progress, hooks=hooks,
                      engine_factory=budget_engine_factory(budget_s, tuple(capture_at), kept.append))
    result = trainer.run()
    engine = kept[-1]
    if hooks.final_generator is None or hooks.sample_shape is None:
        # Only a stop signal ends a Trainer without its final evaluation (after a checkpoint).
        stops = stops or StopSignals()
        raise stops.stopped(f"while training {learner}, seed {seed}"
                            + (f"; its run {result.run_id} holds a checkpoint" if result.run_id else ""))
    return LearnerRun(learner, seed, config, result.run_id, engine.train_s, result.images_seen, dict(result.eval),
                      hooks.final_generator, hooks.sample_shape, engine.captures)


def run_compare(recipe: Recipe, learners: list[str], seeds: list[int], budget_s: Optional[float], out: Path,
                tracking_uri: Optional[str] = None, say: Say = say_on_stderr,
                on_parent_run_id: Optional[Callable[[str], None]] = None, progress: bool = True) -> dict[str, Any]:
    """Train, score and draw; writes OUT/compare.json and OUT/compare.png; returns the summary."""
    if budget_s is not None and not (budget_s > 0 and math.isfinite(budget_s)):
        raise ConfigError(f"--budget-s {budget_s:g}: give a positive number of seconds")
    if budget_s is None and "gan" not in learners:
        raise ConfigError("the default budget is the GAN recipe's schedule.total_kimg, timed on a GAN run: "
                          "add gan to --learners or give --budget-s")
    order = (["gan"] if "gan" in learners else []) + [n for n in learners if n != "gan"]
    recipe.check_overrides(order)
    configs = {(n, s): learner_config(recipe, n, s) for s in seeds for n in order}  # every refusal before any training
    base = configs[(order[0], seeds[0])]  # data, schedule, topology and tracking: the same for every learner
    out.mkdir(parents=True, exist_ok=True)
    parent = open_parent_run(base, tracking_uri, order, seeds, budget_s) if base.tracking.enabled else None
    if parent is not None and on_parent_run_id is not None:
        on_parent_run_id(parent.run_id)
    ray_owned = False
    stops = StopSignals()
    try:
        if base.topology.kind != "local":
            # One Ray instance for every learner (each Trainer would otherwise start and stop its own).
            from ganray.orchestrator.job.placement import connect

            ray_owned = connect(base.resources).owned
        with stops:  # after Ray's start-up, which installs its own SIGTERM handler
            try:
                summary = _compare(base, order, seeds, budget_s, configs, parent, tracking_uri, out, say, progress,
                                   stops)
            except KeyboardInterrupt:
                if stops.received is None:
                    raise
                raise stops.stopped("before the comparison finished") from None
    except BaseException as exc:
        if parent is not None:
            parent.close("KILLED" if isinstance(exc, (CompareStopped, KeyboardInterrupt)) else "FAILED", timeout=60.0)
        raise
    finally:
        if ray_owned:
            import ray

            ray.shutdown()
    summary["parent_run_id"] = parent.run_id if parent is not None else None
    summary = _json_safe(summary)
    for name, text in (("compare.json", json.dumps(summary, indent=1) + "\n"), ("compare.md", markdown_tables(summary))):
        tmp = out / (name + ".part")
        tmp.write_text(text)
        tmp.replace(out / name)
    if parent is not None:
        for name in ("compare.json", "compare.md", "compare.png"):
            parent.log_artifact(out / name)
        parent.close("FINISHED", timeout=120.0)
    return summary


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null (strict JSON), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _compare(base: TrainConfig, order: list[str], seeds: list[int], budget_s: Optional[float],
             configs: dict[tuple[str, int], TrainConfig], parent: Any, tracking_uri: Optional[str], out: Path,
             say: Say, progress: bool, stops: Optional[StopSignals] = None) -> dict[str, Any]:
    ipr = base.schedule.batch_size * base.schedule.n_critic
    ladder = image_ladder(int(round(base.schedule.total_kimg * 1000)), ipr)
    time_rows: dict[str, list[dict[str, Any]]] = {n: [] for n in order}
    image_rows: dict[str, list[dict[str, Any]]] = {n: [] for n in order}
    budgets: list[float] = []
    common_images: list[Optional[int]] = []
    drawn = False
    for seed in seeds:
        budget = budget_s
        runs: dict[str, LearnerRun] = {}
        for learner in order:
            reached = min((r.images_seen for r in runs.values()), default=None)
            capture_at = [n for n in ladder if reached is None or n <= reached]
            limit = "no time limit (schedule.total_kimg)" if budget is None else f"{budget:.1f} s"
            say(f"seed {seed}: training {learner} ({limit}, at most {base.schedule.total_kimg:g} kimg)")
            run = train_learner(configs[(learner, seed)], learner, seed, budget, capture_at, parent, tracking_uri,
                                progress, stops)
            runs[learner] = run
            say(f"seed {seed}: {learner} trained {run.train_s:.1f} s, {run.images_seen / 1000:.1f} kimg; "
                + ", ".join(f"{k} {v:.4g}" for k, v in run.eval.items()))
            if budget is None:
                budget = run.train_s  # the GAN's time for the recipe: every other learner's budget
        budgets.append(float(budget) if budget is not None else float("nan"))
        evaluator = Evaluator(configs[(order[0], seed)])
        common = min(r.images_seen for r in runs.values())
        point = max((n for n in ladder if n <= common), default=None)
        common_images.append(point)
        samples: dict[str, torch.Tensor] = {}
        for learner, run in runs.items():
            say(f"seed {seed}: scoring {learner}")
            row, samples[learner] = _time_row(run, evaluator)
            time_rows[learner].append(row)
            if point is not None and point in run.captures:
                images, state = run.captures[point]
                G = build_eval_generator(run.config, run.sample_shape, state)
                image_rows[learner].append({"seed": seed, "images_seen": images, "run_id": run.run_id,
                                            "metrics": scores(evaluator, G)})
            run.captures = {}  # the ladder's states are no longer needed
        if not drawn:  # the first seed's samples
            _draw(out / "compare.png", evaluator, samples, time_rows)
            drawn = True
        if parent is not None:
            for learner in order:
                row = time_rows[learner][-1]
                parent.log_metrics({f"time/{learner}/{k}": v for k, v in row["metrics"].items()}
                                   | {f"time/{learner}/train_s": row["train_s"],
                                      f"time/{learner}/sample_s_per_1000": row["sample_s_per_1000"]}, step=seed)
                if image_rows[learner] and image_rows[learner][-1]["seed"] == seed:
                    parent.log_metrics({f"images/{learner}/{k}": v
                                        for k, v in image_rows[learner][-1]["metrics"].items()}, step=seed)
    return _summary(base, order, seeds, budget_s, budgets, common_images, time_rows, image_rows)


def _time_row(run: LearnerRun, evaluator: Evaluator) -> tuple[dict[str, Any], torch.Tensor]:
    G = run.generator
    seconds, samples = timed_samples(G, evaluator.seed, run.config.resources.threads_per_worker)
    row = {"seed": run.seed, "run_id": run.run_id, "train_s": run.train_s, "images_seen": run.images_seen,
           "metrics": scores(evaluator, G, run.eval), "sample_s_per_1000": seconds * 1000.0 / SAMPLES_FOR_COST,
           "evals_per_sample": evals_per_sample(G)}
    return row, samples


def _draw(path: Path, evaluator: Evaluator, samples: dict[str, torch.Tensor],
          rows: dict[str, list[dict[str, Any]]]) -> None:
    n = min(len(evaluator.source), SAMPLES_FOR_COST)
    targets = evaluator.source.get(np.arange(n))
    titles = {name: panel_title(name, rows[name][-1]["metrics"]) for name in samples}
    compare_figure(targets, samples, evaluator.config.data.name, titles, path)


def _summary(base: TrainConfig, order: list[str], seeds: list[int], budget_s: Optional[float], budgets: list[float],
             common_images: list[Optional[int]], time_rows: dict[str, list[dict[str, Any]]],
             image_rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    learners: dict[str, Any] = {}
    for name in order:
        rows = time_rows[name]
        entry = summarise(rows, ("sample_s_per_1000", "evals_per_sample", "train_s", "images_seen"))
        entry["run_id"] = rows[0]["run_id"]
        entry["per_seed"] = rows
        same = image_rows[name]
        entry["same_images"] = {**summarise(same, ("images_seen",)), "per_seed": same} if same else None
        learners[name] = entry
    return {"data": base.data.name, "seeds": seeds, "total_kimg": base.schedule.total_kimg,
            "budget": {"kind": "given" if budget_s is not None else "gan_total_kimg",
                       "seconds": budget_s if budget_s is not None else None,
                       "per_seed_s": budgets},
            "same_images": {"per_seed": common_images,
                            "rule": "the largest image count of a 2^(1/4) ladder that every learner reached"},
            "learners": learners}
