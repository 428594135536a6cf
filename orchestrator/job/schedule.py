"""When the training loop's periodic duties are due, and the checkpoints of a run.

Each duty owns its schedule and its "disabled" state (as torchtitan's checkpointer does): the
loop asks `due(images_seen)` at every metric point and dispatches, never checking whether
tracking is on. Intervals are absolute (every `every_kimg` from image 0), so a resumed run is
due at the very points an uninterrupted one is. Evaluation and checkpoints skip the job's last
point: the final evaluation and the final checkpoint follow there anyway.

Sample plots live with their drawing code (`tracking/samples.py`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ganray.orchestrator.job.config import RESUME_ALLOWED, TrainConfig

if TYPE_CHECKING:
    from ganray.orchestrator.tracking.run_logger import RunLogger

log = logging.getLogger("ganray")

# How long the end of a job (or a fallback to the last checkpoint) waits for uploads in flight.
FINAL_UPLOAD_TIMEOUT_S = 300.0


class Interval:
    """Due each time images_seen crosses a multiple of `every_kimg` (before `stop_images`, when given)."""

    def __init__(self, every_kimg: float, images_seen: int, stop_images: Optional[int] = None) -> None:
        self.every = max(1, int(round(every_kimg * 1000)))
        self.next = (images_seen // self.every + 1) * self.every
        self.stop_images = stop_images

    def due(self, images_seen: int) -> bool:
        if images_seen < self.next:
            return False
        self.next = (images_seen // self.every + 1) * self.every
        return self.stop_images is None or images_seen < self.stop_images


def checkpoint_config_hash(config: TrainConfig, only: Optional[frozenset[str]] = None) -> str:
    """The config hash a checkpoint carries: the keys a resume may change are left out."""
    return config.config_hash(ignore=RESUME_ALLOWED, only=only)


class Checkpointer:
    """The run's MLflow checkpoints every `schedule.checkpoint_kimg` and at the end, uploaded off
    the training thread (`CheckpointManager`), the last `schedule.keep_checkpoints` kept."""

    def __init__(self, logger: "RunLogger", config: TrainConfig, images_seen: int, stop_images: int) -> None:
        from ganray.orchestrator.job.checkpoint import CheckpointManager

        self.logger = logger
        self.store = CheckpointManager(logger, config.schedule.keep_checkpoints,
                                       Path(tempfile.mkdtemp(prefix="ganray-ckpt-")))
        self.interval = Interval(config.schedule.checkpoint_kimg, images_seen, stop_images)
        self.config_hash = checkpoint_config_hash(config)
        self.saved_images = images_seen  # the newest progress a checkpoint (or the start) holds

    def due(self, images_seen: int) -> bool:
        return self.interval.due(images_seen)

    def behind(self, images_seen: int) -> bool:
        """True when a checkpoint at `images_seen` would hold more progress than any saved."""
        return images_seen > self.saved_images

    def checkpoint(self, engine: Any, images_seen: int) -> None:
        """Save the engine's current state."""
        self.save(engine.state(), images_seen, engine.sample_shape)

    def save(self, state: dict[str, Any], images_seen: int, sample_shape: tuple[int, ...]) -> None:
        # The sample shape lets `ganray sample --run` rebuild G without reading the data.
        meta = {"config_hash": self.config_hash, "images_seen": images_seen, "kimg": images_seen / 1000.0,
                "sample_shape": [int(s) for s in sample_shape]}
        self.store.save(state, meta, images_seen / 1000.0)
        self.saved_images = images_seen

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Every save uploaded (False when one is still running after `timeout`)."""
        return self.store.wait(timeout=timeout)

    def latest(self) -> Optional[tuple[dict[str, Any], dict]]:
        """The run's latest complete checkpoint (after the uploads in flight), digest-checked."""
        from ganray.orchestrator.job.checkpoint import latest_checkpoint

        self.wait(timeout=FINAL_UPLOAD_TIMEOUT_S)
        with tempfile.TemporaryDirectory() as tmp:
            return latest_checkpoint(self.logger.client, self.logger.run_id, Path(tmp))


class NullCheckpointer:
    """No MLflow checkpoints: tracking is off, or the caller keeps its own (Tune's)."""

    def due(self, images_seen: int) -> bool:
        return False

    def behind(self, images_seen: int) -> bool:
        return False

    def checkpoint(self, engine: Any, images_seen: int) -> None:
        pass

    def save(self, state: dict[str, Any], images_seen: int, sample_shape: tuple[int, ...]) -> None:
        pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        return True

    def latest(self) -> Optional[tuple[dict[str, Any], dict]]:
        return None
