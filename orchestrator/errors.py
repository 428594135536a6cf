"""Errors only the control plane raises: the tracking store, Ray placement, the retrain lock.

Like every `GanrayError` (`ganray.models.errors`), each is one line naming what is wrong and how
to fix it; the CLI prints it as `error: ...` and exits with its `exit_code`.
"""

from ganray.models.errors import GanrayError


class TrackingError(GanrayError):
    """The MLflow tracking store or registry cannot be used as asked."""


class PlacementError(GanrayError):
    """The Ray cluster cannot place the resources the job asks for."""


class LockHeldError(GanrayError):
    """Another process holds the retrain lock of this model."""

    exit_code = 3
