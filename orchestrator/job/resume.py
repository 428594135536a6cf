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


def check_resume_config(tracking_uri: str, run_id: str, config: TrainConfig) -> str:
    """Refuse `--resume` with a config other than the run's; returns the run's status now."""
    from mlflow import MlflowClient

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
    diff = config_differences(old, config)
    if diff:
        raise ConfigError(f"--resume {run_id} refuses a changed config: {', '.join(diff)} differ "
                          "from the run's; resume with the run's config (only schedule.total_kimg "
                          "and logging intervals may change)")
    return run.info.status


def run_checkpoint(client: Any, run_id: str, config: TrainConfig) -> StartState:
    """The run's latest complete checkpoint, digest-checked, before any worker is started."""
    from ganray.orchestrator.job.checkpoint import latest_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        found = latest_checkpoint(client, run_id, Path(tmp))
    if found is None:
        raise CheckpointError(f"--resume {run_id}: the run has no complete checkpoint; start a new run instead")
    state, meta = found
    if meta.get("config_hash") not in (None, checkpoint_config_hash(config)):
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
