"""The run logger's units of work and MLflow's limits: what the sender thread sends, in what batches,
and which MLflow errors are worth retrying (see `run_logger.RunLogger`)."""

from __future__ import annotations

import collections
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
# MLflow error codes worth retrying: the server is away, overloaded or briefly failing.
TRANSIENT_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR",
})


@dataclass
class MetricRun:
    """A run of consecutive metric points in the queue: (key, value, timestamp_ms, step)."""

    points: collections.deque = field(default_factory=collections.deque)


@dataclass
class QueuedCall:
    """Any other queued operation: `fn(client, run_id)`, resolved into `future` (True = done)."""

    fn: Callable[["MlflowClient", str], None]
    what: str
    future: Future = field(default_factory=Future)
    cleanup: Callable[[], None] | None = None


class Permanent(Exception):
    """A send the store rejects for good (retrying cannot help)."""


class Abandoned(Exception):
    """close() ran out of time: the send is given up without another try."""


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False  # a local file that vanished will not come back
    if isinstance(exc, (OSError, TimeoutError)):  # requests' errors are OSErrors too
        return True
    return type(exc).__module__.startswith("sqlalchemy")  # e.g. "database is locked"


def param_entities(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in params.items()]


def tag_entities(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
