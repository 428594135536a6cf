"""MLflow credentials from a secret file, loaded only into the process that talks to MLflow.

On a `ray up` cluster the credentials must not sit in every Ray process's environment (exported
before `ray start`, every worker and job inherits them) nor in a job's `runtime_env` (the dashboard
shows it). Instead `GANRAY_MLFLOW_ENV_FILE` names a file of `KEY=VALUE` lines (MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, ...), readable by its owner only; ganray loads it
into its own environment just before it resolves the tracking URI, in the job driver and in each
Tune trial, where MLflow reads its variables. Variables already set in the environment win.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ganray.orchestrator.errors import TrackingError

ENV_FILE_VAR = "GANRAY_MLFLOW_ENV_FILE"


def load_mlflow_env_file() -> list[str]:
    """Load the file named by GANRAY_MLFLOW_ENV_FILE (if set) into os.environ; return the names set.

    Refuses (TrackingError, one line) when the file is missing, unreadable, readable by group or
    others, or has a line that is not `KEY=VALUE`. Values are never part of a message.
    """
    name = os.environ.get(ENV_FILE_VAR, "").strip()
    if not name:
        return []
    path = Path(name).expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrackingError(f"{ENV_FILE_VAR}={path}: cannot read it ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TrackingError(f"{ENV_FILE_VAR}={path}: mode {stat.S_IMODE(mode):o} lets others read the "
                            f"credentials; run `chmod 600 {path}`")
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise TrackingError(f"{ENV_FILE_VAR}={path}: line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # shell-style quoting, as `set -a; . file` would read it
        values[key] = value
    loaded = [key for key in values if key not in os.environ]
    for key in loaded:
        os.environ[key] = values[key]
    return loaded
