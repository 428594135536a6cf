"""MLflow tracking: where the store is, what every run is tagged with, and how params/tags are cleaned.

The coordinator is the only MLflow client of a job; it writes through `RunLogger`
(`ganray.orchestrator.tracking.run_logger`, re-exported here), the buffered background writer. This
module keeps what does not need a run: resolving and probing the store (`resolve_tracking_uri`,
`prepare_store`), run metadata (`run_tags`, `git_commit`, `ganray_version`) and the text
clean-up every param and tag goes through (`param_value`, `redact`, `scrub`).

Credentials come only from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME /
PASSWORD / TOKEN), which may be loaded from the secret file named by GANRAY_MLFLOW_ENV_FILE
(`credentials.load_mlflow_env_file`, called when the URI is resolved); `redact` strips
`user:password@` from URIs before they are printed or tagged, and params/tags/warnings are
scrubbed of any credential text before they leave these modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.tracking.credentials import load_mlflow_env_file

if TYPE_CHECKING:  # MLflow costs seconds to import; only the functions that talk to it import it.
    from ganray.orchestrator.job.config import TrainConfig

log = logging.getLogger("ganray.tracking")

# Where a run keeps its resolved config (the trainer logs it; `released_model.load_release` reads it).
CONFIG_ARTIFACT = "config.yaml"
# Older tracking servers cap param values at 500 characters and tag values at 5000.
MAX_PARAM_CHARS = 500
MAX_TAG_CHARS = 5000
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")


# ---------------------------------------------------------------------------------------------
# URIs and secrets


def redact(uri: str) -> str:
    """`uri` without any `user:password@` part (safe to print, tag or log)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)


def scrub(text: str) -> str:
    """`text` with credentials in URIs (`user:password@`, secret-looking query values such as
    `client_secret=`) and the values of MLflow's secret env vars masked."""
    from ganray.workers.uri_secrets import mask_query_secrets

    text = mask_query_secrets(redact(text))
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def _absolute(uri: str) -> str:
    """Relative sqlite/file paths made absolute: Tune and Ray change the working directory."""
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).expanduser().resolve().as_uri()  # a bare path is a file store
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        path, sep, query = rest.partition("?")
        if path and not path.startswith("/") and path != ":memory:":
            path = str(Path(path).expanduser().resolve())
            return f"sqlite:///{path}{sep}{query}"
        return uri
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if not parts.netloc and not parts.path.startswith("/"):
            return Path(parts.path).expanduser().resolve().as_uri()
    return uri


def resolve_tracking_uri(cli_uri: str | None, config_uri: str | None) -> str:
    """`--tracking-uri` over `tracking.uri` over MLFLOW_TRACKING_URI over `sqlite:///<cwd>/mlflow.db`.

    Loads GANRAY_MLFLOW_ENV_FILE first: it may set MLFLOW_TRACKING_URI and the credentials.
    """
    load_mlflow_env_file()
    for candidate in (cli_uri, config_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and candidate.strip():
            return _absolute(candidate.strip())
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_artifact_root() -> str:
    """`<cwd>/mlartifacts`: artifacts of the embedded sqlite store (never MLflow's ./mlruns)."""
    return str(Path.cwd().resolve() / "mlartifacts")


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].partition("?")[0]
    return None if not path or path == ":memory:" else Path(path)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact folder of a new experiment in a local sqlite store: `mlartifacts/` beside the DB.

    For the embedded default (the DB in cwd) this is `default_artifact_root()`. Servers and
    remote databases keep their own artifact configuration (None).
    """
    db = _sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / "mlartifacts" / safe).as_uri()


@contextlib.contextmanager
def quick_http(retries: int = 0, timeout_s: int = 5) -> Iterator[None]:
    """MLflow's HTTP retry policy lowered for a probe, restored afterwards.

    MLflow reads these env vars on every request; its default (7 retries, up to ~4 minutes)
    suits the logging path but would make a start-up probe of a dead server hang for minutes.
    """
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = scrub(str(exc)).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def prepare_store(uri: str, experiment: str | None) -> str:
    """Create the store once (before any worker starts), get or create the experiment, return its id.

    Also the reachability probe: a store that cannot be used at start is a `TrackingError`
    within seconds, not a training job that silently logs nowhere. With `experiment=None` it
    only probes (readers such as `ganray sample`) and returns "".
    """
    from mlflow import MlflowClient
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException

    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the folder of the tracking database {db.parent} "
                                f"({exc.strerror}); pass --tracking-uri with a writable path") from None
    try:
        with quick_http():
            client = MlflowClient(uri)
            if experiment is None:
                client.search_experiments(max_results=1)
                return ""
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    return client.create_experiment(experiment, artifact_location=_artifact_location(uri, experiment))
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = client.get_experiment_by_name(experiment)  # created concurrently
                    assert exp is not None
    except MlflowException as exc:
        if exc.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED") or " 401" in str(exc):
            raise TrackingError(f"the MLflow tracking server {redact(uri)} refused the credentials; set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)") from None
        if uri.startswith(("http://", "https://")):
            raise TrackingError(f"cannot reach the MLflow tracking server {redact(uri)} ({_first_line(exc)}); "
                                "start the server or pass --tracking-uri (e.g. sqlite:///mlflow.db)") from None
        raise TrackingError(f"cannot use the MLflow tracking store {redact(uri)} ({_first_line(exc)}); "
                            "pass --tracking-uri (e.g. sqlite:///mlflow.db)") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/OS errors of a bad store all mean the same here
        raise TrackingError(f"cannot use the MLflow tracking store {redact(uri)} ({_first_line(exc)}); fix it "
                            "or pass --tracking-uri (e.g. sqlite:///mlflow.db)") from None
    if exp.lifecycle_stage == LifecycleStage.DELETED:
        raise TrackingError(f"experiment '{experiment}' is deleted in {redact(uri)}; restore it with "
                            f"`mlflow experiments restore --experiment-id {exp.experiment_id}` or set "
                            "tracking.experiment to another name")
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# Run metadata


def git_commit() -> str | None:
    """The commit of the ganray source tree when it is a git checkout (editable install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def ganray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ganray")
    except PackageNotFoundError:
        return "unknown"


def run_tags(config: "TrainConfig") -> dict[str, str]:
    """Tags every run carries; the caller adds the data fingerprint."""
    tags = {
        "ganray.version": ganray_version(),
        "ganray.topology": config.layout.describe(),
        "ganray.data": config.data.name,
        "ganray.config_hash": config.config_hash(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def param_value(value: Any) -> str:
    """A param value as MLflow stores it: text, at most MAX_PARAM_CHARS, credentials masked."""
    text = value if isinstance(value, str) else (
        json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list, tuple)) else str(value))
    text = scrub(text)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _tag_value(value: Any) -> str:
    text = scrub(str(value))
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."
