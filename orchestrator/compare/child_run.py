"""What makes one learner's `Trainer` a child of the comparison: its nested MLflow run, and the
final sampling module kept for the measurements that follow training.

The learner trains through the very Trainer `ganray train` runs; these hooks only choose where it
logs (a run tagged `mlflow.parentRunId`, as Tune's trials do) and keep the sampling module
after the final evaluation, before the engine (and its workers) closes.
"""

from __future__ import annotations

from typing import Any, Optional

from ganray.orchestrator.job.config import TrainConfig
from ganray.orchestrator.job.engine import build_eval_generator
from ganray.orchestrator.job.hooks import JobHooks

PARENT_TAG = "mlflow.parentRunId"
LEARNER_TAG = "ganray.compare.learner"
SEED_TAG = "ganray.compare.seed"


class CompareChildHooks(JobHooks):
    """A learner's child run under the comparison's parent run (None: tracking is off)."""

    release_model = False  # a comparison registers nothing

    def __init__(self, config: TrainConfig, parent: Optional[Any], learner: str, seed: int) -> None:
        self.config, self.parent, self.learner, self.seed = config, parent, learner, seed
        self.logger: Optional[Any] = None
        self.final_generator: Optional[Any] = None   # the sampling module after the final evaluation
        self.sample_shape: Optional[tuple[int, ...]] = None

    def open_run(self, config: TrainConfig) -> Optional[Any]:
        if self.parent is None or not config.tracking.enabled:
            return None  # the Trainer's own choice: no tracking, a NullRunLogger
        from ganray.orchestrator.tracking import store as tracking
        from ganray.orchestrator.tracking.run_logger import RunLogger

        tags = {**tracking.run_tags(config), PARENT_TAG: self.parent.run_id, LEARNER_TAG: self.learner,
                SEED_TAG: str(self.seed)}
        self.logger = RunLogger(self.parent.uri, self.parent.experiment_id, run_name=f"{self.learner}-seed{self.seed}",
                                tags=tags, buffer_size=config.tracking.buffer_size)
        self.logger.log_params(config.flat())
        self.logger.log_text(config.to_yaml(), tracking.CONFIG_ARTIFACT)
        return self.logger

    def on_start(self, engine: Any, start: Any, images_seen: int) -> None:
        if self.logger is not None:
            self.logger.set_tags({"ganray.data_hash": engine.data_fingerprint, "ganray.allreduce": engine.allreduce})

    def on_eval(self, engine: Any, images_seen: int, scores: dict[str, float]) -> None:
        # Periodic evaluations are off in a comparison, so this is the final one: keep the module.
        self.sample_shape = tuple(engine.sample_shape)
        self.final_generator = build_eval_generator(self.config, self.sample_shape, engine.generator_state())
