"""User-facing errors of input every layer reads (configs, data, checkpoints): one line naming what
is wrong and how to fix it, exit code 2. They live in the bottom layer so data readers in
`workers/` and checks in `models/` can raise them; errors only the control plane raises (tracking,
placement, the retrain lock) live in `ganray.orchestrator.errors`.

Every bad input (config, data, checkpoint, model URI) raises a subclass of `GanrayError`;
the CLI catches it, prints `error: <message>` on stderr and exits with `exit_code`,
never with a traceback.
"""

from __future__ import annotations


class GanrayError(Exception):
    """An error caused by the user's input; the message says what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it as is, so collapse newlines from wrapped library errors.
        super().__init__(" ".join(str(message).split()))


class ConfigError(GanrayError):
    """The job config is invalid (unknown key, wrong type, out of range, bad YAML)."""


class DataError(GanrayError):
    """The data cannot be read (missing path, corrupt file, wrong schema, empty)."""


class CheckpointError(GanrayError):
    """A checkpoint is missing, incomplete, tampered with or does not fit the config."""
