"""Re-export of the user-facing errors, which live in the bottom layer (`ganray.models.errors`)
so that data readers in `workers/` and checks in `models/` can raise them too."""

from ganray.models.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DataError,
    GanrayError,
    LockHeldError,
    PlacementError,
    TrackingError,
)
