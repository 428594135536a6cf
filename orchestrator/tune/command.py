"""`ganray tune CONFIG --search SEARCH.yaml`: a Ray Tune search over a job config.

stdout: `parent_run_id=<id>` as soon as the parent MLflow run exists (before any trial), then
`best_trial=`, `best_<metric>=`, `best_run_id=`, `model_version=` (when registered) at the end.
Tune's own status tables go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def _emit(key: str, value: Any) -> None:
    print(f"{key}={value}", flush=True)


def tune_command(config: Path = typer.Argument(..., help="job config (YAML), the base of every trial"),
                 search: Path = typer.Option(..., "--search", help="search file (YAML): scheduler, metric, space, ..."),
                 set_: Optional[list[str]] = typer.Option(None, "--set", help="override a base config key: --set dotted.key=value (repeatable)"),
                 tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (over tracking.uri and MLFLOW_TRACKING_URI)"),
                 resume: bool = typer.Option(False, "--resume", help="continue the interrupted search from its Tune storage")) -> None:
    """Search hyperparameters of CONFIG with Ray Tune (PBT, ASHA or plain random/grid search)."""
    from ganray.orchestrator.job.config import load_config
    from ganray.orchestrator.job.learner_keys import require_gan
    from ganray.orchestrator.tune import search as run_search
    from ganray.orchestrator.tune.spec import load_search

    cfg = load_config(config, set_ or [])
    require_gan(cfg, "tune")  # before the search file is read: the config is what is wrong
    spec = load_search(search)
    result = run_search(cfg, spec, tracking_uri=tracking_uri, resume=resume,
                        on_parent_run_id=lambda rid: _emit("parent_run_id", rid))
    _emit("trials", result.num_trials)
    if result.num_errors:
        _emit("failed_trials", result.num_errors)
    if result.best_trial is not None:
        _emit("best_trial", result.best_trial)
        _emit(f"best_{result.metric}", f"{result.best_score:.6g}")
        for key, value in sorted(result.best_config.items()):
            _emit(f"best_config.{key}", value)
    if result.best_run_id:
        _emit("best_run_id", result.best_run_id)
    if result.model_version:
        _emit("model_version", result.model_version)
    _emit("experiment_path", result.experiment_path)
    if result.interrupted:
        _emit("stopped", "interrupted")
        import sys

        print(f"error: the search was interrupted; continue it with `ganray tune {config} --search {search} --resume`",
              file=sys.stderr, flush=True)
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)
