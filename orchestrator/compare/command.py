"""`ganray compare CONFIG [--learners ae,vae,energy,gan] [--budget-s S] [--seed N | --seeds N] --out DIR`.

stdout: `parent_run_id=<id>` (when tracking is on), then one `<learner>/<figure>=<value>` line per
figure of the time table (means over seeds), `out=DIR`. Progress goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def _emit(key: str, value: Any) -> None:
    print(f"{key}={value}", flush=True)


def compare_command(config: Path = typer.Argument(..., help="job config (YAML): the GAN recipe whose data, "
                                                  "networks and schedule every learner shares"),
                    learners: str = typer.Option("ae,vae,energy,gan", "--learners",
                                                 help="comma-separated: ae, vae, energy, gan"),
                    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="training seconds per learner "
                                                             "(default: the GAN's time for schedule.total_kimg)"),
                    seed: Optional[int] = typer.Option(None, "--seed", help="one training seed (default 1000, held out)"),
                    seeds: Optional[int] = typer.Option(None, "--seeds", help="N held-out seeds 1000..1000+N-1: "
                                                        "mean and spread"),
                    out: Path = typer.Option(..., "--out", help="folder for compare.json and compare.png"),
                    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: "
                                                             "--set dotted.key=value (repeatable)"),
                    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI "
                                                               "(over tracking.uri and MLFLOW_TRACKING_URI)"),
                    no_progress: bool = typer.Option(False, "--no-progress", help="no training progress bar "
                                                     "(the per-learner lines stay)")) -> None:
    """Train each learner on CONFIG's data at the same budget; compare.json and compare.png in --out."""
    from ganray.models.errors import ConfigError
    from ganray.orchestrator.compare.learners import Recipe, parse_learners, seeds_of
    from ganray.orchestrator.compare.runner import run_compare

    names = parse_learners(learners)
    seed_list = seeds_of(seed, seeds)
    if budget_s is not None and not budget_s > 0:
        raise ConfigError(f"--budget-s {budget_s:g}: give a positive number of seconds")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    recipe = Recipe.load(config, set_ or [])
    summary = run_compare(recipe, names, seed_list, budget_s, out, tracking_uri=tracking_uri,
                          on_parent_run_id=lambda rid: _emit("parent_run_id", rid), progress=not no_progress)
    for name, entry in summary["learners"].items():
        for key, value in entry["metrics"].items():
            _emit(f"{name}/{key}", f"{value:.6g}" if value is not None else "nan")
        for key in ("train_s", "images_seen", "sample_s_per_1000", "evals_per_sample"):
            value = entry.get(key)
            _emit(f"{name}/{key}", f"{value:.6g}" if value is not None else "nan")
    _emit("out", out)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
