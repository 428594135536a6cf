"""The run logger of a job without tracking (`tracking.enabled: false`): `RunLogger`'s calls, doing nothing.

The training loop logs unconditionally; with tracking off it logs here. Nothing is stored, so
there is nothing to resume from and no checkpoint to fall back to (the trainer then uses
`NullCheckpointer`).
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import Any, Optional


def _done() -> Future:
    future: Future = Future()
    future.set_result(True)
    return future


class NullRunLogger:
    """A run that is not recorded anywhere; `run_id` is None."""

    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    pending = 0
    dropped = 0

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def skip_steps_upto(self, step: Optional[int]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> Future:
        return _done()

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: Optional[str] = None) -> Future:
        return _done()

    def log_text(self, text: str, artifact_file: str) -> Future:
        return _done()

    def log_figure(self, fig: Any, artifact_file: str) -> Future:
        return _done()

    def log_image(self, image_array: Any, key: str, step: int) -> Future:
        return _done()

    def max_logged_step(self, metric_key: str) -> Optional[int]:
        return None

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: Optional[float] = 300.0) -> bool:
        return True
