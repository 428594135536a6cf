"""The `ganray bench` command, found through the `ganray.commands` entry point (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganray.models.errors import GanrayError


def _csv(value: Optional[str], allowed: tuple[str, ...], option: str) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise GanrayError(f"{option} '{value}': use a comma-separated list of {', '.join(allowed)}")
    return items


QUALITY_SETS = ("ring8", "grid25", "digits", "stacked-digits", "digits-conditional")


def _overrides(sets: list[str]) -> list[str]:
    """`--set KEY=VALUE` items, checked against the config schema before anything trains."""
    from ganray.orchestrator.job.config import load_config

    for item in sets:
        if "=" not in item:
            raise GanrayError(f"--set '{item}': give KEY=VALUE, e.g. --set topology.num_workers=2")
    load_config(None, sets)  # a wrong key or value: the config's own one-line error
    return sets


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(suites: Optional[list[str]] = typer.Argument(
                  None, help="suites to run: overhead scaling split peer tracking startup compile quality "
                             "(default: all but quality)"),
              out: Path = typer.Option(Path("bench-results"), "--out", help="folder for <suite>.json and <suite>.md"),
              quick: bool = typer.Option(False, "--quick", help="a short pass that proves the harness (tiny sizes, 2 seeds)"),
              reps: Optional[int] = typer.Option(None, "--reps", min=1, help="timed repetitions per contender (default 5, 2 with --quick)"),
              seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="quality: seeds per set (default 10, 2 with --quick)"),
              first_seed: Optional[int] = typer.Option(None, "--first-seed", min=0,
                                                       help="quality: the first seed (default 1000: held out; the recipes were chosen below 100)"),
              models: Optional[str] = typer.Option(None, "--models", help="only these cases: mlp,dcgan32,dcgan64"),
              datasets: Optional[str] = typer.Option(None, "--datasets", help="quality: only these sets: "
                                                     "ring8,grid25,digits,stacked-digits,digits-conditional"),
              kimg: Optional[float] = typer.Option(None, "--kimg", min=0.001, help="quality: total_kimg of each training run"),
              workers: Optional[str] = typer.Option(None, "--workers", help="peer: only these worker counts: 1,2"),
              sets: Optional[list[str]] = typer.Option(None, "--set", help="quality: KEY=VALUE for every training run "
                                                       "(e.g. topology.num_workers=2); repeatable")) -> None:
        """Measure ganray against a plain PyTorch loop and Ray Train; print Markdown tables, write JSON."""
        from ganray.bench.harness import DEFAULT_SUITES, BenchOptions, run_suites

        options = BenchOptions(out=out, quick=quick, reps=reps, seeds=seeds, first_seed=first_seed,
                               models=_csv(models, ("mlp", "dcgan32", "dcgan64"), "--models"),
                               datasets=_csv(datasets, QUALITY_SETS, "--datasets"), kimg=kimg,
                               overrides=_overrides(sets or []),
                               workers=[int(n) for n in _csv(workers, ("1", "2"), "--workers") or []] or None)
        results = run_suites(list(suites or DEFAULT_SUITES), options)
        for name in results:
            print(f"json={out / (name + '.json')}", flush=True)
