"""What a caller that embeds the `Trainer` may change; the defaults are those of `ganray train`.

Tune trials run the very Trainer `ganray train` runs (the Ray `pbt_dcgan_mnist` pattern: the
trial is the training loop): `tune.trial.TrialHooks` opens the trial's nested MLflow run,
starts from `tune.get_checkpoint()`, and reports to Tune with a checkpoint at each evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ganray.orchestrator.job.config import TrainConfig
    from ganray.orchestrator.job.engine import Engine
    from ganray.orchestrator.job.resume import StartState


class JobHooks:
    """The Trainer's extension points, doing what `ganray train` does."""

    # MLflow checkpoints every schedule.checkpoint_kimg (a Tune trial reports its own to Tune).
    mlflow_checkpoints = True
    # Register tracking.model_name at the end (a Tune search registers only its winner).
    release_model = True

    def open_run(self, config: "TrainConfig") -> Optional[Any]:
        """The run logger to write to; None: the Trainer opens (or resumes) a top-level MLflow run.
        Called in a helper thread while Ray starts, for the Ray topologies."""
        return None

    def start_state(self, config: "TrainConfig") -> Optional["StartState"]:
        """A state to start from; None: `--resume`'s checkpoint, or the config's initial state."""
        return None

    def on_start(self, engine: "Engine", start: Optional["StartState"], images_seen: int) -> None:
        """After the engine holds the state training starts from (before the first round)."""

    def on_eval(self, engine: "Engine", images_seen: int, scores: dict[str, float]) -> None:
        """After each evaluation (periodic and final), once its scores are queued for MLflow.
        Raising SystemExit ends the job on purpose (Tune stopping a trial after a report)."""
