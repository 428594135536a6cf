"""The Tune trial: one ganray job per trial (`trainable`), with the resources it reserves.

A trial is one ganray job: it builds its config from the base config and the dotted keys Tune
sampled and runs the `Trainer` that `ganray train` runs (the trial IS the training loop, as in
Ray's `pbt_dcgan_mnist` example), with `TrialHooks`: at every evaluation it reports the eval
metrics with a `tune.Checkpoint` holding the full training state (the format of MLflow
checkpoints, digests included). Its placement group, reserved by Tune through
`tune.with_resources`, holds one bundle per worker actor (a `local` trial: the trial's own
threads); the coordinator finds that group and creates its actors inside it, so trials running
side by side never oversubscribe the cluster.

PBT exploits by restarting a trial from another trial's checkpoint with a mutated config. The
trial loads it through the Trainer's state-loading path (`job/resume.py`) and then applies its
*own* hyperparameters to the restored optimizers (Ray issue 36660): the checkpoint's are the
donor's. A donor's checkpoint fits when everything but the searched keys (`MUTABLE_KEYS`) and
the keys a resume may change agrees.

MLflow: the driver makes the tracking URI absolute (Tune changes each trial's working
directory), creates the store and the parent run before any trial starts, and each trial
writes one nested child run (tag `mlflow.parentRunId`), found again by its trial id when PBT or
`--resume` restarts it. A trial flushes its metrics before every report, so a trial that Tune
stops right after a report has lost nothing; a trial going on in its own run from its own
checkpoint does not log again the points that run already holds (a killed driver's trials log
past their last checkpoint).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ganray.models.errors import CheckpointError
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.config import RESUME_ALLOWED, TrainConfig
from ganray.orchestrator.job.hooks import JobHooks
from ganray.orchestrator.job.resume import StartState, logged_upto
from ganray.orchestrator.tracking.null_run_logger import NullRunLogger
from ganray.orchestrator.tune.spec import MUTABLE_KEYS, hyper_of, plain, trial_config

log = logging.getLogger("ganray")

TRIAL_TAG = "ganray.trial_id"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_TAG = "ganray.search.path"
CONFIG_HASH_TAG = "ganray.search.config_hash"
# A checkpoint from another trial fits this one when everything but these keys agrees.
_FLEXIBLE_KEYS = tuple(MUTABLE_KEYS) + RESUME_ALLOWED


# ---------------------------------------------------------------------------------------------
# Resources


def placement_factory(config: TrainConfig) -> Any:
    """What one trial reserves (`Layout.tune_resources`): `local` trains in the trial itself
    (threads_per_worker CPUs); Ray topologies reserve one bundle per worker actor and nothing
    for the coordinator."""
    return config.layout.tune_resources()


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


def trainable(config: dict[str, Any], base: dict[str, Any], tracking_uri: Optional[str] = None,
              parent_run_id: Optional[str] = None) -> None:
    """Tune function trainable: one ganray job whose config is `base` plus the sampled dotted keys.

    Bind `base` (and the MLflow parent) with `tune.with_parameters`, or use `make_trainable`.
    The job is `ganray train`'s `Trainer`, with `TrialHooks`.
    """
    from ganray.orchestrator.job.trainer import Trainer

    sampled = {str(k): plain(v) for k, v in config.items()}
    cfg = trial_config(base, sampled)
    Trainer(cfg, progress=False, hooks=TrialHooks(cfg, sampled, tracking_uri, parent_run_id)).run()


class TrialHooks(JobHooks):
    """What makes a `Trainer` a Tune trial: the trial's nested MLflow run, Tune's checkpoint to
    start from, and a report with a checkpoint at each evaluation.

    Tune may stop the trial right after any report (ASHA cuts it, PBT pauses it; the Trainer then
    closes the run as FINISHED), so each report comes after a flush: nothing logged is lost. The
    last report says `done`: a scheduler must not pause a trial there (PBT would restore it at
    the end of training and ask for more, over and over).
    """

    mlflow_checkpoints = False  # the trial's checkpoints go to Tune, with its reports
    release_model = False       # the search registers its winner only

    def __init__(self, config: TrainConfig, sampled: dict[str, Any], tracking_uri: Optional[str],
                 parent_run_id: Optional[str]) -> None:
        from ray import tune

        context = tune.get_context()
        self.config, self.sampled = config, sampled
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.trial_id = context.get_trial_id() or "trial"
        self.trial_name = context.get_trial_name() or self.trial_id
        self.hyper = hyper_of(config)
        self.structure_hash = _structure_hash(config)
        self.logger: Any = NullRunLogger()
        self.restored: dict[str, Any] = {}  # added to the first report after a restore
        self.run_existed = False  # the trial's child run was there before: a restart or `--resume`

    def open_run(self, config: TrainConfig) -> Any:
        if config.tracking.enabled and self.tracking_uri and self.parent_run_id:
            self.logger, self.run_existed = _open_child_run(config, self.tracking_uri, self.parent_run_id,
                                                            self.trial_id, self.trial_name)
        return self.logger

    def start_state(self, config: TrainConfig) -> Optional[StartState]:
        """Tune's checkpoint for this trial (its own, or a PBT donor's), with this trial's own
        (possibly mutated) hyperparameters applied over the checkpoint's (Ray issue 36660)."""
        from ray import tune

        from ganray.orchestrator.job.checkpoint import read_checkpoint

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state, meta = read_checkpoint(Path(folder))  # digests verified, weights-only
        if meta.get("structure_hash") != self.structure_hash:
            raise CheckpointError(f"the checkpoint of trial {meta.get('trial_id')} was written with another "
                                  "model/data config than this trial's; only the keys PBT may mutate "
                                  f"({', '.join(MUTABLE_KEYS)}) may differ")
        self.restored = {"restored_from": str(meta.get("trial_id")), "restored_kimg": float(meta.get("kimg", 0.0))}
        return StartState(state, meta, f"trial {meta.get('trial_id')}'s checkpoint", hyper=self.hyper)

    def on_start(self, engine: Any, start: Optional[StartState], images_seen: int) -> None:
        self.logger.set_tags({"ganray.data_hash": engine.data_fingerprint, "ganray.allreduce": engine.allreduce})
        if self.restored:
            self.logger.set_tags({"ganray.tune.restored_from": self.restored["restored_from"]})
            self.logger.log_metrics({"pbt/restored_kimg": self.restored["restored_kimg"]}, step=images_seen)
        if self.run_existed and self.restored.get("restored_from", self.trial_id) == self.trial_id:
            # The trial goes on from its own checkpoint (or from scratch) in its own run, which may
            # hold points past that state: those of a driver killed mid-interval (`--resume`).
            # Training is deterministic, so they are the points it would log again: not twice.
            self.logger.skip_steps_upto(logged_upto(self.logger, images_seen))

    def on_eval(self, engine: Any, images_seen: int, scores: dict[str, float]) -> None:
        from ray import tune

        from ganray.orchestrator.job.checkpoint import write_checkpoint

        done = images_seen >= int(round(self.config.schedule.total_kimg * 1000))
        metrics: dict[str, Any] = {f"eval/{k}": float(v) for k, v in scores.items()}
        metrics.update({"kimg": images_seen / 1000.0, "images_seen": images_seen, "done": done, **self.restored})
        if self.logger.run_id is not None:
            metrics["mlflow_run_id"] = self.logger.run_id
        meta = {"trial_id": self.trial_id, "trial_config": self.sampled, "hyper": self.hyper,
                "images_seen": images_seen, "kimg": images_seen / 1000.0,
                "sample_shape": [int(s) for s in engine.sample_shape], "structure_hash": self.structure_hash,
                "config_hash": self.config.config_hash(), "mlflow_run_id": self.logger.run_id}
        with tempfile.TemporaryDirectory(prefix="ganray-tune-ckpt-") as folder:
            write_checkpoint(engine.state(), Path(folder), meta)
            if done:
                self.logger.close("FINISHED", timeout=120.0)
            elif not self.logger.flush(timeout=120.0):
                log.warning("trial %s: MLflow did not take all metrics before the report", self.trial_id)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        self.restored = {}


def _open_child_run(config: TrainConfig, uri: str, parent_run_id: str, trial_id: str,
                    trial_name: str) -> tuple[Any, bool]:
    """The trial's nested MLflow run, and whether it existed: created once, found again by trial
    id when the trial restarts."""
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking import store as tracking
    from ganray.orchestrator.tracking.credentials import load_mlflow_env_file
    from ganray.orchestrator.tracking.run_logger import RunLogger

    load_mlflow_env_file()  # the trial process writes to MLflow itself; the URI came resolved from the driver
    client = MlflowClient(uri)
    experiment_id = _retrying(lambda: client.get_run(parent_run_id).info.experiment_id, "reading the parent run")
    found = _retrying(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
        max_results=1), "looking up the trial's run")
    tags = {**tracking.run_tags(config), PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id}
    existing = found[0].info.run_id if found else None
    logger = _retrying(lambda: RunLogger(uri, experiment_id, run_id=existing, run_name=trial_name, tags=tags,
                                         buffer_size=config.tracking.buffer_size), "opening the trial's run")
    logger.log_params(config.flat())  # a mutated value becomes a ganray.resumed.<key> tag
    logger.log_text(config.to_yaml(), tracking.CONFIG_ARTIFACT)
    return logger, existing is not None


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


def _structure_hash(config: TrainConfig) -> str:
    return config.config_hash(ignore=_FLEXIBLE_KEYS)
