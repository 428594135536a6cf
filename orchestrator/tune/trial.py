"""The Tune trial: one ganray job per trial (`trainable`), with the resources it reserves.

A trial is one ganray job. It builds its config from the base config and the dotted keys Tune
sampled, runs the engine of any topology in chunks, and at every `eval.every_kimg` reports the
eval metrics with a `tune.Checkpoint` holding the full training state (the format of MLflow
checkpoints, digests included). Its placement group, reserved by Tune through
`tune.with_resources`, holds one bundle per worker actor (a `local` trial: the trial's own
threads); the coordinator finds that group and creates its actors inside it, so trials running
side by side never oversubscribe the cluster.

PBT exploits by restarting a trial from another trial's checkpoint with a mutated config. The
trial then applies its *own* hyperparameters to the restored optimizers (Ray issue 36660): the
checkpoint's are the donor's.

MLflow: the driver makes the tracking URI absolute (Tune changes each trial's working
directory), creates the store and the parent run before any trial starts, and each trial
writes one nested child run (tag `mlflow.parentRunId`), found again by its trial id when PBT or
`--resume` restarts it. A trial flushes its metrics before every report, so a trial that Tune
stops right after a report has lost nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ganray.models.errors import CheckpointError, ConfigError, GanrayError

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.config import RESUME_ALLOWED, TrainConfig, load_config
from ganray.orchestrator.tune.spec import (MUTABLE_KEYS, SearchSpec, absolute_paths, check_search, check_storage,
                                             hyper_of, load_search, make_scheduler, param_space, parse_search, plain,
                                             resolve_storage, trial_config)

log = logging.getLogger("ganray")

TRIAL_TAG = "ganray.trial_id"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_TAG = "ganray.search.path"
CONFIG_HASH_TAG = "ganray.search.config_hash"
# A checkpoint from another trial fits this one when everything but these keys agrees.
_FLEXIBLE_KEYS = tuple(MUTABLE_KEYS) + RESUME_ALLOWED


# ---------------------------------------------------------------------------------------------
# Resources


def worker_bundles(config: TrainConfig) -> list[dict[str, float]]:
    """One bundle per worker actor, in the coordinator's placement order (generators first)."""
    from ganray.orchestrator.job.placement import WorkerSpec

    topo, res = config.topology, config.resources
    if topo.kind == "split":
        g, d = res.role("generator"), res.role("discriminator")
        specs = ([WorkerSpec("generator", g.cpus, g.gpus)] * topo.generators
                 + [WorkerSpec("discriminator", d.cpus, d.gpus)] * topo.discriminators)
    else:
        specs = [WorkerSpec("replica", res.cpus_per_worker, res.gpus_per_worker)] * topo.workers
    return [s.bundle() for s in specs]


def placement_factory(config: TrainConfig) -> Any:
    """What one trial reserves: `local` trains in the trial itself (threads_per_worker CPUs);
    Ray topologies reserve one bundle per worker actor and nothing for the coordinator.

    The coordinator only drives the workers and evaluates. Tune runs a trial whose head bundle
    is empty inside the group with no resources of its own; even a sliver (0.01 CPU) would keep
    two 1-worker trials from sharing a 2-CPU machine."""
    from ray import tune

    res = config.resources
    if config.topology.kind == "local":
        bundle = {"CPU": float(res.threads_per_worker)}
        if res.gpus_per_worker > 0:
            bundle["GPU"] = float(res.gpus_per_worker)
        return tune.PlacementGroupFactory([bundle])
    return tune.PlacementGroupFactory([{}, *worker_bundles(config)], strategy=res.strategy)


def make_trainable(base: TrainConfig, tracking_uri: Optional[str] = None,
                   parent_run_id: Optional[str] = None) -> Any:
    """`trainable` bound to a base config (and MLflow parent), with per-trial resources.

    For a user's own Tune script: `tune.Tuner(make_trainable(cfg), param_space={"schedule.g_lr": ...})`.
    """
    from ray import tune

    tree = base.model_dump(mode="json")
    bound = tune.with_parameters(trainable, base=tree, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    return tune.with_resources(bound, lambda sampled: placement_factory(trial_config(tree, sampled)))


# ---------------------------------------------------------------------------------------------
# The trial


class _ChildRun:
    """The trial's nested MLflow run: created once, continued when the trial restarts."""

    def __init__(self, config: TrainConfig, uri: str, parent_run_id: str, trial_id: str, trial_name: str) -> None:
        from mlflow import MlflowClient

        from ganray.orchestrator.tracking import store as tracking
        from ganray.orchestrator.tracking.run_logger import RunLogger

        client = MlflowClient(uri)
        experiment_id = _retrying(lambda: client.get_run(parent_run_id).info.experiment_id, "reading the parent run")
        found = _retrying(lambda: client.search_runs(
            [experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1), "looking up the trial's run")
        tags = {**tracking.run_tags(config), PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id}
        existing = found[0].info.run_id if found else None
        self.logger = _retrying(lambda: RunLogger(uri, experiment_id, run_id=existing, run_name=trial_name,
                                                  tags=tags, buffer_size=config.tracking.buffer_size),
                                "opening the trial's run")
        self.run_id = self.logger.run_id
        self.logger.log_params(config.flat())  # a mutated value becomes a ganray.resumed.<key> tag
        self.logger.log_text(config.to_yaml(), tracking.CONFIG_ARTIFACT)


def _retrying(fn: Callable[[], Any], what: str, tries: int = 5) -> Any:
    """Start-up calls of concurrent trials may meet a locked sqlite store: retry a few times."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - MLflow/sqlalchemy raise many types for "busy"
            if attempt == tries - 1:
                raise TrackingError(f"{what} in the MLflow store failed ({str(err).splitlines()[0][:200]})") from None
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _chunk_point(res: Any, dt: float, images_per_round: int) -> dict[str, float]:
    from ganray.orchestrator.job.trainer import METRIC_NAMES

    point = {METRIC_NAMES[k]: sum(v) / len(v) for k, v in res.metrics.items() if k in METRIC_NAMES and v}
    point["perf/samples_per_s"] = res.rounds * images_per_round / max(dt, 1e-9)
    point["kimg"] = res.images_seen / 1000.0
    return point


def _structure_hash(config: TrainConfig) -> str:
    return config.config_hash(ignore=_FLEXIBLE_KEYS)


def _restore(engine: Any, config: TrainConfig, trial_id: str) -> dict[str, Any]:
    """Load Tune's checkpoint for this trial (its own, or a PBT donor's); the report fields to add."""
    from ray import tune

    from ganray.orchestrator.job.checkpoint import read_checkpoint

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        state, meta = read_checkpoint(Path(folder))  # digests verified, weights-only
    if meta.get("structure_hash") != _structure_hash(config):
        raise CheckpointError(f"the checkpoint of trial {meta.get('trial_id')} was written with another model/data "
                              "config than this trial's; only schedule.g_lr/d_lr/betas/n_critic and loss.r1_gamma "
                              "may differ")
    engine.load_state(state, keep_hyper=True)
    return {"restored_from": str(meta.get("trial_id")), "restored_kimg": float(meta.get("kimg", 0.0))}


def trainable(config: dict[str, Any], base: dict[str, Any], tracking_uri: Optional[str] = None,
              parent_run_id: Optional[str] = None) -> None:
    """Tune function trainable: one ganray job whose config is `base` plus the sampled dotted keys.

    Bind `base` (and the MLflow parent) with `tune.with_parameters`, or use `make_trainable`.
    """
    from ray import tune

    from ganray.orchestrator.job.engine import make_engine

    sampled = {str(k): plain(v) for k, v in config.items()}
    cfg = trial_config(base, sampled)
    context = tune.get_context()
    trial_id = context.get_trial_id() or "trial"
    run = None
    if cfg.tracking.enabled and tracking_uri and parent_run_id:
        run = _ChildRun(cfg, tracking_uri, parent_run_id, trial_id, context.get_trial_name() or trial_id)
    engine = None
    status = "FAILED"
    try:
        engine = make_engine(cfg)
        if run is not None:
            run.logger.set_tags({"ganray.data_hash": engine.data_fingerprint, "ganray.allreduce": engine.allreduce})
        _train(cfg, sampled, engine, run, trial_id)
        status = "FINISHED"
    except SystemExit:
        # Tune stopped the trial after a report (ASHA cut it, PBT paused it): everything reported
        # was already flushed; the run is reopened if the trial continues.
        status = "FINISHED"
        raise
    finally:
        if run is not None:
            run.logger.close(status, timeout=30.0)
        if engine is not None:
            engine.close()


def _train(cfg: TrainConfig, sampled: dict[str, Any], engine: Any, run: Optional[_ChildRun], trial_id: str) -> None:
    from ray import tune

    from ganray.orchestrator.job.checkpoint import write_checkpoint
    from ganray.orchestrator.job.engine import build_eval_generator
    from ganray.orchestrator.job.evaluate import Evaluator
    from ganray.orchestrator.tracking.system_metrics import SystemMetrics

    evaluator = Evaluator(cfg)
    extra = _restore(engine, cfg, trial_id)
    hyper = hyper_of(cfg)
    engine.set_hyper(hyper)  # this trial's (possibly mutated) values, never the checkpoint's
    logger = run.logger if run is not None else None
    if logger is not None and extra:
        logger.set_tags({"ganray.tune.restored_from": extra["restored_from"]})
    images_seen = engine.run(0).images_seen
    if logger is not None and extra:
        logger.log_metrics({"pbt/restored_kimg": extra["restored_kimg"]}, step=images_seen)
    # The trial's coordinator is its run's one writer: system/* rides on its training points too.
    system = SystemMetrics() if logger is not None and cfg.tracking.log_system_metrics else None
    images_per_round = cfg.schedule.n_critic * cfg.schedule.batch_size
    total = int(round(cfg.schedule.total_kimg * 1000))
    every = max(1, int(round(cfg.eval.every_kimg * 1000)))
    chunk_rounds = max(1, int(round(cfg.schedule.sync_kimg * 1000 / images_per_round)))
    # A trial restored from a finished donor has nothing left to train but must still report
    # once: otherwise Tune repeats the donor's last result (its trial id, its run) as this trial's.
    must_report = bool(extra)
    while images_seen < total or must_report:
        must_report = False
        # One Tune iteration per eval interval, ending on its boundary (as a fresh run's would).
        target = min(total, (images_seen // every + 1) * every)
        while images_seen < target:
            todo = min(chunk_rounds, math.ceil((target - images_seen) / images_per_round))
            t0 = time.perf_counter()
            res = engine.run(todo, target)
            if res.rounds == 0:
                raise RuntimeError(f"the engine made no progress at {images_seen} images (target {target})")
            images_seen = res.images_seen
            if logger is not None and res.metrics:
                point = _chunk_point(res, time.perf_counter() - t0, images_per_round)
                if system is not None:
                    point.update(system.sample())
                logger.log_metrics(point, step=images_seen)
        scores = evaluator.evaluate(build_eval_generator(cfg, engine.sample_shape, engine.generator_state()))
        metrics: dict[str, Any] = {f"eval/{k}": float(v) for k, v in scores.items()}
        if logger is not None:
            logger.log_metrics(metrics, step=images_seen)
        # done=True ends the trial on its last report: a scheduler must not pause it there (PBT would
        # restore it at the end of training and ask for more, over and over).
        metrics.update({"kimg": images_seen / 1000.0, "images_seen": images_seen, "done": images_seen >= total,
                        **extra})
        if run is not None:
            metrics["mlflow_run_id"] = run.run_id
        meta = {"trial_id": trial_id, "trial_config": sampled, "hyper": hyper, "images_seen": images_seen,
                "kimg": images_seen / 1000.0, "sample_shape": [int(s) for s in engine.sample_shape],
                "structure_hash": _structure_hash(cfg), "config_hash": cfg.config_hash(),
                "mlflow_run_id": run.run_id if run is not None else None}
        with tempfile.TemporaryDirectory(prefix="ganray-tune-ckpt-") as folder:
            write_checkpoint(engine.state(), Path(folder), meta)
            if logger is not None:
                # Tune may stop this trial right after the report: nothing may be left queued.
                if images_seen >= total:
                    logger.close("FINISHED", timeout=120.0)
                elif not logger.flush(timeout=120.0):
                    log.warning("trial %s: MLflow did not take all metrics before the report", trial_id)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        extra = {}
