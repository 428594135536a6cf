"""`ganray retrain` and `ganray promote`, registered on the main app by `cli._register_extensions`.

Both print `key=value` lines on stdout (a scheduler or a test parses them) and leave the logic
to `champion.py`. `retrain` prints `run_id=` as soon as the new run exists, then the decision;
`promoted`, `kept` and `skipped` all exit 0. A held lock exits 3, every other user error 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def _emit(key: str, value: Any) -> None:
    print(f"{key}={value}", flush=True)


def _score(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.6g}"


def retrain_command(config: Path = typer.Argument(..., help="job config (YAML) naming the new data snapshot"),
                    model_name: Optional[str] = typer.Option(None, "--model-name",
                                                             help="registered model to retrain (short for --set tracking.model_name=NAME)"),
                    schedule_key: Optional[str] = typer.Option(None, "--schedule-key",
                                                               help="idempotency key of this schedule tick: a key already decided trains nothing"),
                    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: --set dotted.key=value (repeatable)"),
                    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                                               help="MLflow tracking URI (over tracking.uri and MLFLOW_TRACKING_URI)"),
                    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")) -> None:
    """Retrain the champion of NAME on new data; promote the challenger only if it beats the champion."""
    from ganray.orchestrator.job.config import load_config
    from ganray.orchestrator.job.learner_keys import require_gan
    from ganray.orchestrator.retrain.champion import retrain

    overrides = list(set_ or [])
    if model_name:
        overrides.append(f"tracking.model_name={model_name}")
    cfg = load_config(config, overrides)
    require_gan(cfg, "retrain")
    printed: list[str] = []

    def on_run_id(run_id: str) -> None:
        printed.append(run_id)
        _emit("run_id", run_id)

    outcome = retrain(cfg, model_name=model_name, schedule_key=schedule_key, tracking_uri=tracking_uri,
                      progress=not no_progress, on_run_id=on_run_id)
    if not printed and outcome.run_id:  # skipped: the run that decided this key earlier
        _emit("run_id", outcome.run_id)
    _emit("decision", outcome.decision)
    if outcome.previous_decision:
        _emit("previous_decision", outcome.previous_decision)
    _emit("model", outcome.model_name)
    _emit("version", outcome.version or "none")
    _emit("champion_version", outcome.champion_version or "none")
    _emit("metric", outcome.metric)
    _emit("mode", outcome.mode)
    _emit("champion_score", _score(outcome.champion_score))
    _emit("challenger_score", _score(outcome.challenger_score))
    if outcome.schedule_key:
        _emit("schedule_key", outcome.schedule_key)
    _emit("reason", outcome.reason)


def promote_command(name: str = typer.Argument(..., help="registered model name"),
                    version: str = typer.Argument(..., help="model version to make the champion"),
                    reason: Optional[str] = typer.Option(None, "--reason", help="why (recorded on the version)"),
                    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                                               help="MLflow tracking URI (over MLFLOW_TRACKING_URI)"),
                    trust_code: bool = typer.Option(False, "--trust-code",
                                                    help="allow a champion whose config imports code (retrains will import it)")) -> None:
    """Move the `champion` alias of NAME to VERSION by hand (a rollback), recording who and why."""
    from ganray.orchestrator.retrain.promote import promote

    outcome = promote(name, version, reason=reason, tracking_uri=tracking_uri, trust_code=trust_code)
    _emit("model", outcome.model_name)
    _emit("champion", outcome.version)
    _emit("previous", outcome.previous or "none")
    _emit("promoted_by", outcome.user)


def register(app: typer.Typer) -> None:
    app.command(name="retrain")(retrain_command)
    app.command(name="promote")(promote_command)
