"""`ganray tune`'s driver: `search` runs (or resumes) a Ray Tune search over one base config.

MLflow: the driver makes the tracking URI absolute (Tune changes each trial's working
directory), creates the store and the parent run before any trial starts; each trial writes one
nested child run (see `trial.py`). At the end it picks the winner, registers its EMA generator
and settles the status of child runs whose trial process was gone before it could close them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ganray.models.errors import CheckpointError, ConfigError, GanrayError

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.config import RESUME_ALLOWED, TrainConfig, load_config
from ganray.orchestrator.job.learner_keys import require_gan
from ganray.orchestrator.tune.spec import (SearchSpec, absolute_paths, check_search, check_storage, load_search,
                                           make_scheduler, param_space, parse_search, plain, resolve_storage,
                                           trial_config)
from ganray.orchestrator.tune.trial import CONFIG_HASH_TAG, PARENT_TAG, SEARCH_TAG, TRIAL_TAG, make_trainable

log = logging.getLogger("ganray")


@dataclass
class SearchResult:
    parent_run_id: Optional[str]
    metric: str
    mode: str
    best_trial: Optional[str]
    best_score: Optional[float]
    best_run_id: Optional[str]
    best_config: dict[str, Any]
    model_version: Optional[str]
    experiment_path: str
    num_trials: int
    num_errors: int
    interrupted: bool = False
    results: Any = field(default=None, repr=False)  # Tune's ResultGrid


def _as_spec(search_spec: Union[SearchSpec, dict, str, Path]) -> SearchSpec:
    if isinstance(search_spec, SearchSpec):
        return search_spec if search_spec.name else search_spec.model_copy(update={"name": "ganray-search"})
    if isinstance(search_spec, dict):
        return parse_search(search_spec)
    return load_search(search_spec)


def _parent_run(uri: str, experiment_id: str, config: TrainConfig, spec: SearchSpec, experiment_path: str,
                resume: bool) -> Any:
    """The search's parent run: a new one, or (with resume) the one tagged with this Tune experiment."""
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking import store as tracking
    from ganray.orchestrator.tracking.run_logger import RunLogger

    config_hash = config.config_hash(ignore=RESUME_ALLOWED)
    if resume:
        found = MlflowClient(uri).search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{experiment_path}'",
                                              max_results=1, order_by=["attributes.start_time DESC"])
        if not found:
            raise TrackingError(f"--resume: no parent run of the search at {experiment_path} in {tracking.redact(uri)}; "
                                "pass the tracking URI the search was started with")
        old_hash = found[0].data.tags.get(CONFIG_HASH_TAG)
        if old_hash not in (None, config_hash):
            raise ConfigError("--resume refuses a changed config: the search was started with another base config; "
                              "resume with the same CONFIG and --set values")
        return RunLogger(uri, experiment_id, run_id=found[0].info.run_id)
    tags = {**tracking.run_tags(config), SEARCH_TAG: experiment_path, CONFIG_HASH_TAG: config_hash,
            "ganray.tune.scheduler": spec.scheduler.kind, "ganray.tune.metric": spec.metric}
    logger = RunLogger(uri, experiment_id, run_name=spec.name, tags=tags,
                       buffer_size=config.tracking.buffer_size)
    logger.log_params(config.flat())
    logger.log_params({"search.scheduler": spec.scheduler.kind, "search.metric": spec.metric,
                       "search.mode": spec.resolved_mode, "search.num_samples": spec.num_samples})
    logger.log_text(config.to_yaml(), tracking.CONFIG_ARTIFACT)
    logger.log_text(spec.model_dump_json(indent=1, exclude_none=True), "search.json")
    return logger


def search(config: Union[TrainConfig, str, Path], search_spec: Union[SearchSpec, dict, str, Path],
           tracking_uri: Optional[str] = None, resume: bool = False, overrides: Optional[list[str]] = None,
           on_parent_run_id: Optional[Callable[[str], None]] = None) -> SearchResult:
    """Run (or with `resume`, continue) a Tune search over `config`; the Python face of `ganray tune`.

    Every problem with the config, the search file, the storage or the tracking store is raised
    before any trial starts.
    """
    import ray
    from ray import tune

    from ganray.orchestrator.job.placement import connect

    cfg = absolute_paths(config if isinstance(config, TrainConfig) else load_config(config, overrides))
    require_gan(cfg, "tune")
    spec = _as_spec(search_spec)
    check_search(spec, cfg)
    storage = resolve_storage(spec.storage_path)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    owns_ray = connect(cfg.resources).owned
    parent = None
    try:
        check_storage(storage, len([n for n in ray.nodes() if n.get("Alive")]))
        exists = tune.Tuner.can_restore(experiment_path)
        if resume and not exists:
            raise CheckpointError(f"--resume: no Tune search at {experiment_path}; start it without --resume "
                                  "(or set the search file's storage_path/name to the interrupted one)")
        if not resume and exists:
            raise ConfigError(f"a search named '{spec.name}' already exists at {experiment_path}; continue it with "
                              "--resume, or set another `name` in the search file")
        uri = None
        if cfg.tracking.enabled:
            from ganray.orchestrator.tracking import store as tracking

            uri = tracking.resolve_tracking_uri(tracking_uri, cfg.tracking.uri)
            experiment_id = tracking.prepare_store(uri, cfg.tracking.experiment)  # once, before any trial
            parent = _parent_run(uri, experiment_id, cfg, spec, experiment_path, resume)
            if on_parent_run_id is not None:
                on_parent_run_id(parent.run_id)
        fn = make_trainable(cfg, uri, parent.run_id if parent is not None else None)
        if resume:
            tuner = tune.Tuner.restore(experiment_path, trainable=fn, resume_errored=True)
        else:
            tuner = tune.Tuner(fn, param_space=param_space(spec), tune_config=_tune_config(spec, cfg),
                               run_config=tune.RunConfig(
                                   name=spec.name, storage_path=storage,
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints)))
        # Tune prints its status tables on stdout; stdout carries ganray's key=value lines only.
        with contextlib.redirect_stdout(sys.stderr):
            grid = tuner.fit()
        result = _conclude(grid, spec, cfg, uri, parent, experiment_path)
        if parent is not None:
            parent.close("KILLED" if result.interrupted else "FINISHED")
        return result
    except BaseException:
        if parent is not None:
            parent.close("FAILED")
        raise
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def _tune_config(spec: SearchSpec, config: TrainConfig) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune's default searcher, made here to seed it; it then also enforces the concurrency limit
    # (TuneConfig's max_concurrent_trials is ignored when a search_alg instance is passed).
    searcher = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0)
    return tune.TuneConfig(
        metric=spec.metric, mode=spec.resolved_mode, scheduler=make_scheduler(spec, config),
        num_samples=spec.num_samples, search_alg=searcher,
        # Reusing a trial actor needs the old trial's thread gone within 2 s of a stop; closing its
        # MLflow run and worker actors can take longer, and Tune then fails the new trial.
        reuse_actors=False)


def _trial_error(grid: Any) -> str:
    for err in grid.errors:
        cause = getattr(err, "cause", None)
        if isinstance(cause, GanrayError):
            return str(cause)
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()[:300]
    return "no trial reported it"


def _conclude(grid: Any, spec: SearchSpec, base: TrainConfig, uri: Optional[str], parent: Any,
              experiment_path: str) -> SearchResult:
    """Pick the winner, register its EMA generator, record it in the parent run, settle child runs."""
    metric, mode = spec.metric, spec.resolved_mode
    interrupted = grid.num_terminated + grid.num_errors < len(grid)
    scored = [r for r in grid if r.metrics and isinstance(r.metrics.get(metric), (int, float))
              and math.isfinite(r.metrics[metric])]
    if uri is not None and parent is not None:
        _settle_child_runs(uri, parent.run_id, grid)
    if not scored:
        if interrupted:
            return SearchResult(parent.run_id if parent else None, metric, mode, None, None, None, {}, None,
                                experiment_path, len(grid), grid.num_errors, True, grid)
        raise GanrayError(f"no trial reported a finite {metric} ({grid.num_errors} of {len(grid)} trials failed: "
                          f"{_trial_error(grid)})")
    best = grid.get_best_result(metric=metric, mode=mode, scope="last", filter_nan_and_inf=True)
    trial_id = str(best.metrics.get("trial_id"))
    score = float(best.metrics[metric])
    run_id = best.metrics.get("mlflow_run_id")
    version = None
    if parent is not None:
        parent.set_tags({"ganray.tune.best_trial": trial_id, "ganray.tune.best_run_id": str(run_id),
                         "ganray.tune.best_score": f"{score:.6g}"})
        parent.log_metrics({f"best/{metric}": score, "tune/num_trials": len(grid),
                            "tune/num_errors": grid.num_errors}, step=0)
        if base.tracking.model_name and run_id and best.checkpoint is not None and not interrupted:
            version = _register(best, base, uri, str(run_id), parent.run_id, trial_id, metric, score)
            parent.set_tags({"ganray.tune.model_version": version})
    return SearchResult(parent.run_id if parent else None, metric, mode, trial_id, score, run_id,
                        {k: plain(v) for k, v in best.config.items()}, version, experiment_path, len(grid),
                        grid.num_errors, interrupted, grid)


def _register(best: Any, base: TrainConfig, uri: Optional[str], run_id: str, parent_run_id: str, trial_id: str,
              metric: str, score: float) -> str:
    """The winner's EMA generator, from its last Tune checkpoint, as a new version of tracking.model_name."""
    from mlflow import MlflowClient

    from ganray.orchestrator.job.checkpoint import read_checkpoint
    from ganray.orchestrator.job.engine import build_eval_generator
    from ganray.orchestrator.tracking.release import log_released_generator

    with best.checkpoint.as_directory() as folder:
        state, meta = read_checkpoint(Path(folder))
    cfg = trial_config(base, best.config)
    G = build_eval_generator(cfg, tuple(meta["sample_shape"]), state["G_ema"])
    mv = log_released_generator(MlflowClient(uri), run_id, G, cfg, base.tracking.model_name,
                                images_seen=int(meta["images_seen"]),
                                extra_tags={"ganray.tune.trial_id": trial_id, "ganray.tune.parent_run_id": parent_run_id,
                                            "ganray.tune.metric": metric, "ganray.tune.score": f"{score:.6g}"})
    return str(getattr(mv, "version", mv))


def _settle_child_runs(uri: str, parent_run_id: str, grid: Any) -> None:
    """Child runs whose trial process was gone before it could close them (killed after a stop,
    or errored) get their final status; the trials are all over, so nothing else writes them."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    failed = {str(r.metrics.get("trial_id")) for r in grid if r.error is not None and r.metrics}
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                  "and attributes.status = 'RUNNING'")
        for run in runs:
            status = "FAILED" if run.data.tags.get(TRIAL_TAG) in failed else "FINISHED"
            client.set_terminated(run.info.run_id, status=status)
    except Exception as err:  # noqa: BLE001 - statuses are cosmetic; the search result stands
        log.warning("could not settle the status of the trials' MLflow runs: %s", str(err).splitlines()[0][:200])
