"""Scheduled retraining with a champion/challenger gate (promotion by hand: `promote.py`).

`retrain(config, ...)` is what `ganray retrain` runs, once per schedule tick:

1. A schedule key already decided for this model -> `skipped`, nothing trained (a scheduler that
   fires twice, or catches up missed ticks, must not retrain twice).
2. Take the model's retrain lock (`lock.RetrainLock`); a held lock is exit code 3.
3. Before anything is written: load the held-out split of the new data (a missing snapshot is a
   `DataError`), the `champion`'s released generator and its run's final checkpoint (digests
   checked, a tampered one is a `CheckpointError`), and check that its weights fit the config.
4. Train a challenger for `retrain.kimg`, warm-started from the champion's G, D and G_ema with
   fresh optimizers and progress at 0: Adam's moments belong to the champion's learning-rate
   schedule and data, a fresh state is valid for any topology and learning rate of the new run,
   and the few first steps that re-estimate the moments are a small price at retrain lengths.
5. Score challenger and champion with one `Evaluator` (same held-out split of the new data,
   metric, sample count and seed) and promote the challenger (`champion` alias) only when it is
   better by `retrain.min_improvement`; otherwise it gets the `challenger` alias and a reason.

No alias changes before step 5, so every failure before it leaves the registry's aliases as they
were. The decision is written to the model version last, its schedule-key tag after everything
else: the key marks a tick as done only when the whole decision is in the registry.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ganray.models.errors import CheckpointError, ConfigError, GanrayError

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.config import TrainConfig, config_from_dict
from ganray.orchestrator.job.learner_keys import require_gan
from ganray.orchestrator.job.engine import Engine, build_eval_generator, make_engine
from ganray.orchestrator.retrain.lock import RetrainLock, current_user

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from ganray.orchestrator.job.evaluate import Evaluator

log = logging.getLogger("ganray.retrain")

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "ganray.retrain."  # prefix of every retrain tag, on runs and on model versions
KEY_TAG = TAG + "schedule_key"
DECISION_TAG = TAG + "decision"
# Direction of each metric the evaluator can produce (lower FID/KID/KL is better, more modes better).
METRIC_MODES = {"kl": "min", "fid": "min", "kid": "min", "modes": "max", "hq": "max", "confidence": "max"}
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,249}")
_UNSAFE_NAME = re.compile(r"['\"`\\]")


@dataclass
class RetrainOutcome:
    """What one `retrain` call decided (and what `ganray retrain` prints)."""

    decision: str  # promoted | kept | skipped
    model_name: str
    run_id: Optional[str]
    version: Optional[str]
    metric: str
    mode: str
    champion_version: Optional[str]
    champion_score: Optional[float]
    challenger_score: Optional[float]
    reason: str
    schedule_key: Optional[str] = None
    previous_decision: Optional[str] = None  # set when skipped


# ---------------------------------------------------------------------------------------------
# The gate


def resolve_metric(config: TrainConfig, kind: str) -> tuple[str, str]:
    """(metric, mode): `retrain.metric`/`retrain.mode`, defaulting to kl/min (2D) or fid/min (images)."""
    from ganray.orchestrator.job.evaluate import default_metrics

    # What the evaluator computes for this data (stacked-digits: modes, kl, confidence).
    allowed = tuple(default_metrics(config.data.name, kind)) or (("modes", "hq", "kl") if kind == "2d" else ("fid", "kid"))
    metric = config.retrain.metric or ("kl" if "kl" in allowed else "fid")
    if metric not in allowed:
        raise ConfigError(f"retrain.metric '{metric}' is not computed for {kind} data '{config.data.name}'; "
                          f"use one of {', '.join(allowed)}")
    return metric, config.retrain.mode or METRIC_MODES[metric]


def decide(challenger: float, champion: Optional[float], mode: str, min_improvement: float) -> tuple[bool, str]:
    """(promote?, reason). A tie never promotes: a challenger must be strictly better."""
    if champion is None:
        return True, "no champion before"
    if not math.isfinite(challenger):
        return False, f"challenger score {challenger} is not finite"
    if not math.isfinite(champion):
        return True, f"champion score {champion} is not finite"
    gain = champion - challenger if mode == "min" else challenger - champion
    if gain > 0 and gain >= min_improvement:
        return True, f"better by {gain:.6g} (min_improvement {min_improvement:g}, mode {mode})"
    if gain <= 0:
        return False, f"not better: challenger {challenger:.6g} vs champion {champion:.6g} (mode {mode})"
    return False, f"better by only {gain:.6g} < min_improvement {min_improvement:g} (mode {mode})"


# ---------------------------------------------------------------------------------------------
# Registry reads


def check_names(model_name: str, schedule_key: Optional[str]) -> None:
    """Names go into MLflow filter strings: refuse quoting characters instead of escaping them."""
    if not model_name or _UNSAFE_NAME.search(model_name):
        raise ConfigError(f"model name {model_name!r} is empty or has quotes/backslashes; use letters, digits, . _ -")
    if schedule_key is not None and not _SAFE_KEY.fullmatch(schedule_key):
        raise ConfigError(f"--schedule-key {schedule_key!r} must be 1-250 characters of letters, digits and "
                          "._:@+/=- starting with a letter or digit, e.g. 2026-11-26T03:00")


def find_champion(client: "MlflowClient", model_name: str) -> Optional["ModelVersion"]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise TrackingError(f"cannot read registered model '{model_name}' ({first_line(exc)})") from None
    version = (model.aliases or {}).get(CHAMPION)
    return None if version is None else client.get_model_version(model_name, str(version))


def find_decided(client: "MlflowClient", model_name: str, schedule_key: str) -> Optional[RetrainOutcome]:
    """The earlier decision for `schedule_key`, read from the model version that carries it."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{model_name}' and tags.`{KEY_TAG}` = '{schedule_key}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise TrackingError(f"cannot search model versions of '{model_name}' ({first_line(exc)})") from None
    decided = [mv for mv in found if mv.tags.get(DECISION_TAG)]
    if not decided:
        return None
    mv = max(decided, key=lambda v: int(v.version))
    tags = mv.tags
    return RetrainOutcome(
        decision="skipped", model_name=model_name, run_id=mv.run_id, version=str(mv.version),
        metric=tags.get(TAG + "metric", ""), mode=tags.get(TAG + "mode", ""),
        champion_version=tags.get(TAG + "champion_version") or None,
        champion_score=_float(tags.get(TAG + "champion_score")),
        challenger_score=_float(tags.get(TAG + "challenger_score")),
        reason=f"schedule key '{schedule_key}' was decided before (version {mv.version})",
        schedule_key=schedule_key, previous_decision=tags.get(DECISION_TAG))


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return None if text in (None, "", "none") else float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Warm start


def _single_d(d_state: dict) -> dict:
    """A split job's checkpoint holds {d0: state, d1: ...}; the others one D state dict."""
    if d_state and all(isinstance(v, dict) for v in d_state.values()):
        return d_state.get("d0") or next(iter(d_state.values()))
    return d_state


def _d_for(fresh_d: dict, champion_d: dict) -> dict:
    """The champion's D in the layout of the new engine (broadcast to every critic of a split job)."""
    if fresh_d and all(isinstance(v, dict) for v in fresh_d.values()):
        if champion_d and set(champion_d) == set(fresh_d) and all(isinstance(v, dict) for v in champion_d.values()):
            return champion_d
        single = _single_d(champion_d)
        return {name: single for name in fresh_d}
    return _single_d(champion_d)


def warm_start_factory(weights: dict[str, Any]) -> Callable[[TrainConfig], Engine]:
    """An engine factory: `make_engine`, then the champion's G, D, G_ema over the fresh state.

    Optimizers, progress (0 images), sampler and RNG stay those of the new engine: the new run
    is a new schedule, not a resume (see the module docstring for why the optimizers are fresh).
    """
    def factory(config: TrainConfig) -> Engine:
        engine = make_engine(config)
        try:
            state = engine.state()
            state["G"], state["G_ema"] = weights["G"], weights["G_ema"]
            state["D"] = _d_for(state["D"], weights["D"])
            engine.load_state(state, keep_hyper=True)
        except RuntimeError as err:
            engine.close()
            raise CheckpointError(f"the champion's weights do not fit this config's model "
                                  f"({str(err).splitlines()[0]}); retrain with the champion's model section") from None
        except BaseException:
            engine.close()
            raise
        return engine

    return factory


def _check_fits(config: TrainConfig, shape: tuple[int, ...], weights: dict[str, Any], what: str) -> None:
    """Fail before a run exists when the champion's G/D/G_ema cannot load into this config's nets."""
    from ganray.models.registry import build_discriminator, build_generator

    model_cfg = config.model.model_dump()
    nets = (("G", build_generator), ("G_ema", build_generator), ("D", build_discriminator))
    for part, build in nets:
        if part not in weights:
            raise CheckpointError(f"{what} has no '{part}' part; it was not written by ganray train")
        try:
            build(model_cfg, shape).load_state_dict(_single_d(weights[part]) if part == "D" else weights[part])
        except RuntimeError as err:
            raise CheckpointError(f"{what}: its {part} does not fit this config's model section "
                                  f"({str(err).splitlines()[0]}); retrain with the champion's model section") from None


# ---------------------------------------------------------------------------------------------
# The command


def _evaluator(config: TrainConfig, metric: str, test_source: Any) -> "Evaluator":
    """One evaluator for both sides: the same held-out split, metric, sample count and seed."""
    from ganray.orchestrator.job.evaluate import Evaluator

    eval_cfg = config.model_copy(deep=True)
    eval_cfg.eval.metrics = [metric]
    return Evaluator(eval_cfg, test_source=test_source)


def _score(evaluator: "Evaluator", config: TrainConfig, state: dict, shape: tuple[int, ...],
           metric: str, what: str) -> float:
    scores = evaluator.evaluate(build_eval_generator(config, shape, state))
    if metric not in scores:
        raise ConfigError(f"retrain.metric '{metric}' cannot be computed for data '{evaluator.config.data.name}' "
                          f"({what}); for RGB images set eval.inception_weights to a local Inception weights file")
    return float(scores[metric])


def _check_image_metric(config: TrainConfig, kind: str) -> None:
    """FID/KID need a feature network; fail before training, not after it (see evaluate.py)."""
    if kind == "image" and config.data.name not in ("digits", "stacked-digits") and not config.eval.inception_weights:
        raise ConfigError(f"retrain on '{config.data.name}' images needs a feature network for its metric: set "
                          "eval.inception_weights to a local Inception weights file")


def retrain(config: TrainConfig, model_name: Optional[str] = None, schedule_key: Optional[str] = None,
            tracking_uri: Optional[str] = None, progress: bool = False,
            on_run_id: Optional[Callable[[str], None]] = None) -> RetrainOutcome:
    """One champion/challenger retrain of `model_name` on the data `config` names (see the module doc)."""
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking import store as tracking

    require_gan(config, "retrain")
    name = model_name or config.tracking.model_name
    if not name:
        raise ConfigError("retrain needs a model name: pass --model-name NAME (or set tracking.model_name)")
    if not config.tracking.enabled:
        raise ConfigError("retrain needs MLflow: tracking.enabled must be true")
    check_names(name, schedule_key)
    if config.topology.kind != "local":  # an unreachable cluster stops before the store is touched
        from ganray.orchestrator.job.placement import probe

        probe(config.resources)
    uri = tracking.resolve_tracking_uri(tracking_uri, config.tracking.uri)
    tracking.prepare_store(uri, config.tracking.experiment)
    client = MlflowClient(uri)
    if schedule_key is not None:
        earlier = find_decided(client, name, schedule_key)
        if earlier is not None:
            return earlier
    with RetrainLock(client, name, config.retrain.lock_ttl_s) as lock:
        if schedule_key is not None:  # a concurrent call may have decided it while we waited for the store
            earlier = find_decided(client, name, schedule_key)
            if earlier is not None:
                return earlier
        return _retrain_locked(client, lock, config, name, schedule_key, uri, progress, on_run_id)


def _retrain_locked(client: "MlflowClient", lock: RetrainLock, config: TrainConfig, name: str,
                    schedule_key: Optional[str], uri: str, progress: bool,
                    on_run_id: Optional[Callable[[str], None]]) -> RetrainOutcome:
    from ganray.orchestrator.job.checkpoint import latest_checkpoint
    from ganray.orchestrator.tracking.released_model import load_release
    from ganray.orchestrator.job.trainer import Trainer
    from ganray.workers.data import load_dataset

    # The new run: retrain.kimg from 0 images, registered under `name` at its end. Set in the
    # tree, not through `--set` text, so a schedule key is never re-parsed as YAML.
    tree = config.model_dump(mode="json")
    tree["schedule"]["total_kimg"] = config.retrain.kimg
    tree["tracking"]["model_name"] = name
    if not config.tracking.run_name:
        stamp = schedule_key or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        tree["tracking"]["run_name"] = f"retrain-{stamp}"
    run_cfg = config_from_dict(tree)

    # Everything that can fail on bad input happens before a run or an alias is written.
    source = load_dataset(run_cfg.data.model_dump(), run_cfg.seed, "test")  # a missing snapshot fails here
    kind, shape = source.kind, tuple(source.sample_shape)
    metric, mode = resolve_metric(run_cfg, kind)
    _check_image_metric(run_cfg, kind)
    evaluator = _evaluator(run_cfg, metric, source)

    champion = find_champion(client, name)
    champion_version = str(champion.version) if champion is not None else None
    champion_score: Optional[float] = None
    factory: Callable[[TrainConfig], Engine] = make_engine
    if champion is not None:
        what = f"champion '{name}' version {champion_version} (run {champion.run_id})"
        with tempfile.TemporaryDirectory(prefix="ganray-champion-") as tmp:
            try:
                found = latest_checkpoint(client, champion.run_id, Path(tmp))
            except CheckpointError as err:
                raise CheckpointError(f"{what}: {err}") from None
        if found is None:
            raise CheckpointError(f"{what} has no complete checkpoint to warm-start from; promote another "
                                  f"version with `ganray promote {name} VERSION`")
        weights = {k: found[0][k] for k in ("G", "D", "G_ema") if k in found[0]}
        _check_fits(run_cfg, shape, weights, what)
        try:
            champ = load_release(client, f"models:/{name}/{champion_version}", run_cfg.retrain.trust_code, run_cfg)
        except GanrayError as err:
            raise type(err)(f"{what}: {err}") from None
        champion_score = _score(evaluator, champ.config, champ.state, shape, metric, what)
        factory = warm_start_factory(weights)
        del found

    start_tags = {TAG + "model": name, TAG + "warm_start": champion_version or "none",
                  TAG + "user": current_user()}
    if schedule_key is not None:
        start_tags[TAG + "run_schedule_key"] = schedule_key

    def started(run_id: str) -> None:
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in start_tags.items()])
        if on_run_id is not None:
            on_run_id(run_id)

    result = Trainer(run_cfg, tracking_uri=uri, progress=progress, on_run_id=started,
                     engine_factory=factory).run()
    if result.stopped_early or not result.model_version or not result.run_id:
        raise GanrayError(f"retrain run {result.run_id} stopped at {result.images_seen / 1000:.1f} kimg before "
                          f"retrain.kimg {run_cfg.retrain.kimg} and registered nothing; nothing was promoted; "
                          "run it again (with the same --schedule-key)")
    version = str(result.model_version)
    chall = load_release(client, f"models:/{name}/{version}", run_cfg.retrain.trust_code, run_cfg)
    challenger_score = _score(evaluator, chall.config, chall.state, shape, metric, f"challenger version {version}")
    promote_it, reason = decide(challenger_score, champion_score, mode, run_cfg.retrain.min_improvement)
    outcome = RetrainOutcome(
        decision="promoted" if promote_it else "kept", model_name=name, run_id=result.run_id, version=version,
        metric=metric, mode=mode, champion_version=champion_version,
        champion_score=champion_score, challenger_score=challenger_score, reason=reason,
        schedule_key=schedule_key)
    lock.verify()  # never move an alias under a lock that someone else now holds
    _record(client, outcome, result.images_seen)
    return outcome


def _record(client: "MlflowClient", o: RetrainOutcome, images_seen: int) -> None:
    """Scores and decision on the run and the version, the alias, then the schedule key (last)."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    assert o.run_id is not None and o.version is not None
    fmt = lambda v: "none" if v is None else f"{v:.6g}"  # noqa: E731
    tags = {TAG + "decision": o.decision, TAG + "reason": o.reason, TAG + "metric": o.metric,
            TAG + "mode": o.mode, TAG + "champion_version": o.champion_version or "",
            TAG + "champion_score": fmt(o.champion_score), TAG + "challenger_score": fmt(o.challenger_score),
            TAG + "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    now_ms = int(time.time() * 1000)
    scores = (("retrain/challenger_score", o.challenger_score), ("retrain/champion_score", o.champion_score))
    client.log_batch(
        o.run_id,
        metrics=[Metric(k, v, now_ms, images_seen) for k, v in scores if v is not None and math.isfinite(v)],
        params=[Param("retrain/metric_used", o.metric), Param("retrain/mode_used", o.mode),
                Param("retrain/champion_version", o.champion_version or "none")],
        tags=[RunTag(k, v) for k, v in {**tags, TAG + "version": o.version}.items()])
    for key, value in tags.items():
        client.set_model_version_tag(o.model_name, o.version, key, value)
    client.set_registered_model_alias(o.model_name, CHAMPION if o.decision == "promoted" else CHALLENGER, o.version)
    if o.schedule_key is not None:
        client.set_tag(o.run_id, KEY_TAG, o.schedule_key)
        client.set_model_version_tag(o.model_name, o.version, KEY_TAG, o.schedule_key)
    log.info("retrain of '%s': version %s %s (%s)", o.model_name, o.version, o.decision, o.reason)


def first_line(exc: BaseException) -> str:
    from ganray.orchestrator.tracking.store import scrub

    lines = scrub(str(exc)).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
