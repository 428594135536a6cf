"""Starting a job from a saved state: `ganray train --resume RUN_ID`, or a Tune trial's checkpoint.

Both go through `load_start`: the engine loads the state (weights, optimizers, progress, data
order, RNG) and then, for a Tune trial, takes the trial's own, possibly mutated,
hyperparameters over the checkpoint's (Ray issue 36660: a PBT donor's optimizers carry the
donor's learning rates). Where the state comes from, and which config changes it tolerates,
is the caller's: an MLflow resume accepts only `RESUME_ALLOWED` changes; a trial also the
searched keys (`tune.spec.MUTABLE_KEYS`, checked in `tune/trial.py`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ganray.models.errors import CheckpointError, ConfigError, GanrayError
from ganray.orchestrator.job.config import TrainConfig, config_differences, load_config
from ganray.orchestrator.job.fault import brief, is_worker_loss
from ganray.orchestrator.job.schedule import checkpoint_config_hash

if TYPE_CHECKING:
    from ganray.orchestrator.job.engine import Engine

log = logging.getLogger("ganray")


@dataclass
class StartState:
    """A job state to start from instead of the config's initial one."""

    state: dict[str, Any]
    meta: dict
    source: str                              # for messages: "run <id>", "trial <id>'s checkpoint"
    hyper: Optional[dict[str, Any]] = None   # applied after loading: a Tune trial's own values


@dataclass(frozen=True)
class ResumedRun:
    """What `--resume` learned of the run before any worker starts: its status now (put back if
    the resume fails before training) and the dotted keys of its stored config."""

    status: str
    stored_keys: frozenset[str]

    @property
    def status_to_restore(self) -> str:
        return self.status if self.status in ("FINISHED", "FAILED", "KILLED") else "KILLED"


def check_resume_config(tracking_uri: str, run_id: str, config: TrainConfig) -> ResumedRun:
    """Refuse `--resume` with a config other than the run's."""
    import yaml
    from mlflow import MlflowClient

    from ganray.orchestrator.job.config import flatten
    from ganray.orchestrator.tracking.store import redact

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise CheckpointError(f"--resume {run_id}: no such run in {redact(tracking_uri)}; "
                              "pass a run id printed by an earlier `ganray train`") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:
            raise CheckpointError(f"--resume {run_id}: the run has no config.yaml artifact; "
                                  "it was not made by ganray train") from None
        old = load_config(path)
        stored = yaml.safe_load(Path(path).read_text()) or {}
    diff = config_differences(old, config)
    if diff:
        raise ConfigError(f"--resume {run_id} refuses a changed config: {', '.join(diff)} differ "
                          "from the run's; resume with the run's config (only schedule.total_kimg "
                          "and logging intervals may change)")
    return ResumedRun(run.info.status, frozenset(flatten(stored)))


def run_checkpoint(client: Any, run_id: str, config: TrainConfig, resumed: Optional[ResumedRun] = None) -> StartState:
    """The run's latest complete checkpoint, digest-checked, before any worker is started.

    Its config hash must match this config's, over every key or over the keys the run's stored
    config had (`resumed.stored_keys`): a run started before a key was added to ganray resumes when the
    new key keeps its default (a changed value is refused by `check_resume_config`)."""
    from ganray.orchestrator.job.checkpoint import latest_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        found = latest_checkpoint(client, run_id, Path(tmp))
    if found is None:
        raise CheckpointError(f"--resume {run_id}: the run has no complete checkpoint; start a new run instead")
    state, meta = found
    accepted = {None, checkpoint_config_hash(config)}
    if resumed is not None and resumed.stored_keys:
        accepted.add(checkpoint_config_hash(config, only=resumed.stored_keys))
    if meta.get("config_hash") not in accepted:
        raise CheckpointError("the checkpoint was written with another config; resume with the run's config")
    return StartState(state, meta, f"run {run_id}")


def load_start(engine: "Engine", start: StartState) -> None:
    """Load `start` into every worker; a state that does not fit the config is a `CheckpointError`."""
    try:
        engine.load_state(start.state, keep_hyper=True)
        if start.hyper is not None:
            engine.set_hyper(start.hyper)
    except GanrayError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        if is_worker_loss(err):
            raise
        raise CheckpointError(f"the checkpoint of {start.source} at {start.meta.get('kimg', '?')} kimg does not fit "
                              f"this config ({brief(err)}); resume with the run's config and topology") from None
    log.info("resumed %s at %.1f kimg", start.source, start.meta.get("images_seen", 0) / 1000)


def logged_upto(logger: Any, images_seen: int) -> int:
    """The highest step the run already holds, at least `images_seen`: a run continued from a
    checkpoint (`train --resume`, a Tune trial going on in its own run) may hold points logged
    past it by a killed driver; they are not logged twice. Every training point carries `kimg`."""
    try:
        return max(images_seen, logger.max_logged_step("kimg") or 0)
    except GanrayError:  # a store that cannot say: log from the checkpoint on
        return images_seen
