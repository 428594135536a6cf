"""The `ganray` command line.

stdout carries machine-readable lines (`run_id=<id>`, `key=value`); progress and warnings go to
stderr. Every user error ends with one line `error: ...` on stderr and exit code 2 (3 when a
retrain lock is held), never a traceback. `main(argv)` is the entry function, callable
in-process (the fuzz tests do so) as well as by the console script.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ganray.models.errors import GanrayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train GANs across a Ray cluster, tracked in MLflow.")

SetOpt = typer.Option(None, "--set", help="override a config key: --set dotted.key=value (repeatable)")
UriOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (over tracking.uri and MLFLOW_TRACKING_URI)")


def _emit(key: str, value: Any) -> None:
    print(f"{key}={value}", flush=True)


def _load(config: Optional[Path], sets: Optional[list[str]]):
    from ganray.orchestrator.job.preflight import load_job

    return load_job(config, sets or [])


@app.command()
def validate(config: Path = typer.Argument(..., help="job config (YAML)"),
             set_: Optional[list[str]] = SetOpt) -> None:
    """Resolve CONFIG as `train` would (keys, layout, data name, model names) and print it."""
    cfg = _load(config, set_)
    print(cfg.to_yaml(), end="")


@app.command()
def train(config: Path = typer.Argument(..., help="job config (YAML)"),
          set_: Optional[list[str]] = SetOpt,
          dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config, build the models, do not train"),
          tracking_uri: Optional[str] = UriOpt,
          resume: Optional[str] = typer.Option(None, "--resume", help="continue this MLflow run from its latest checkpoint"),
          stop_at_kimg: Optional[float] = typer.Option(None, "--stop-at-kimg", help="stop cleanly at this kimg with a checkpoint"),
          no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar")) -> None:
    """Train a GAN as CONFIG describes; prints run_id=<id> first, then the final figures."""
    cfg = _load(config, set_)
    if dry_run:
        from ganray.orchestrator.job.preflight import dry_run as resolve_fully

        sizes = resolve_fully(cfg)  # everything resolved before anything is printed
        print(cfg.to_yaml(), end="")
        for key, value in sizes.items():
            _emit(key, value)
        return
    from ganray.orchestrator.job.trainer import Trainer

    trainer = Trainer(cfg, tracking_uri=tracking_uri, resume=resume, stop_at_kimg=stop_at_kimg,
                      progress=not no_progress, on_run_id=lambda rid: _emit("run_id", rid))
    result = trainer.run()
    _emit("images_seen", result.images_seen)
    _emit("kimg", f"{result.images_seen / 1000:.1f}")
    _emit("wall_s", f"{result.wall_s:.1f}")
    for key, value in result.eval.items():
        _emit(f"eval/{key}", f"{value:.6g}")
    if result.model_version:
        _emit("model_version", result.model_version)
    if result.stopped_early:
        _emit("stopped", "early")


TrustOpt = typer.Option(False, "--trust-code", help="allow the stored config to import the code it names "
                        "(model.generator/discriminator, data.name as pkg.mod:Name); see README, trust model")


def _generator_from(run: Optional[str], model: Optional[str], tracking_uri: Optional[str], trust_code: bool):
    from ganray.orchestrator.tracking.released_model import load_generator

    if bool(run) == bool(model):
        raise GanrayError("give exactly one of --run RUN_ID or --model models:/NAME/VERSION (or models:/NAME@ALIAS)")
    return load_generator(model or run, tracking_uri, trust_code=trust_code)


@app.command()
def sample(run: Optional[str] = typer.Option(None, "--run", help="MLflow run id"),
           model: Optional[str] = typer.Option(None, "--model", help="models:/NAME/VERSION or models:/NAME@ALIAS"),
           n: int = typer.Option(64, "-n", min=1, help="number of samples"),
           out: Path = typer.Option(..., "--out", help=".npy for raw samples, .png for a grid or scatter"),
           seed: int = typer.Option(0, "--seed"),
           class_: Optional[str] = typer.Option(None, "--class", help=(
               "conditional models: a class K (N samples of it) or 'all' (a grid with one row per class)")),
           tracking_uri: Optional[str] = UriOpt,
           trust_code: bool = TrustOpt) -> None:
    """Draw N samples from a run's (or a registered model's) EMA generator."""
    import numpy as np

    from ganray.orchestrator.job.evaluate import sample_generator
    from ganray.orchestrator.tracking.samples import class_request

    if out.suffix not in (".npy", ".png"):
        raise GanrayError(f"--out {out}: use a .npy (raw samples) or .png (grid) path")
    G, cfg = _generator_from(run, model, tracking_uri, trust_code)
    classes, per_row = class_request(G, class_, n)
    samples = sample_generator(G, n if classes is None else len(classes), seed, classes=classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part" + out.suffix)
    if out.suffix == ".npy":
        np.save(tmp, samples.numpy())
    elif samples.dim() == 2:
        from ganray.orchestrator.tracking.samples import scatter_figure

        scatter_figure(samples.numpy(), cfg.data.name).savefig(tmp)
    else:
        from torchvision.utils import save_image

        save_image(samples.clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=per_row)
    os.replace(tmp, out)  # never leave a half-written file under the asked name
    _emit("out", out)
    _emit("shape", "x".join(map(str, samples.shape)))


@app.command()
def evaluate(run: Optional[str] = typer.Option(None, "--run", help="MLflow run id"),
             model: Optional[str] = typer.Option(None, "--model", help="models:/NAME/VERSION or models:/NAME@ALIAS"),
             num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1,
                                                       help="samples for the 2D protocol (FID/KID compare as many as "
                                                       "the held-out split holds)"),
             tracking_uri: Optional[str] = UriOpt,
             trust_code: bool = TrustOpt) -> None:
    """Score a run's (or a registered model's) EMA generator; one key=value line per figure."""
    from ganray.orchestrator.job.evaluate import Evaluator

    G, cfg = _generator_from(run, model, tracking_uri, trust_code)
    if num_samples:
        cfg.eval.num_samples = num_samples
    evaluator = Evaluator(cfg)
    if num_samples and evaluator.kind != "2d":
        logging.getLogger("ganray").warning("--num-samples applies to 2D data; FID/KID compare as many samples "
                                            "as the held-out split holds (%d)", len(evaluator.source))
    for key, value in evaluator.evaluate(G).items():
        _emit(key, f"{value:.6g}")


_extensions_registered = False


def _register_extensions() -> None:
    """The `tune`, `retrain` and `compare` commands, then commands other distributions declare under the
    `ganray.commands` entry point (ganray's own `bench`): the control plane never imports them."""
    from importlib.metadata import entry_points

    from ganray.orchestrator.compare import command as compare_command
    from ganray.orchestrator.retrain import command as retrain_command
    from ganray.orchestrator.tune import command as tune_command

    global _extensions_registered
    if _extensions_registered:
        return
    _extensions_registered = True
    tune_command.register(app)
    retrain_command.register(app)
    compare_command.register(app)
    for entry in entry_points(group="ganray.commands"):
        entry.load()(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry function: returns the exit code (the console script exits with it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ganray").setLevel(logging.INFO)
    # MLflow retries a failed request ~7 times over minutes inside each call; the RunLogger has
    # its own bounded retry/backoff, so keep MLflow's short unless the user chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    _register_extensions()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="ganray", standalone_mode=False)
        return 0
    except GanrayError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume RUN_ID", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - click/typer control flow, matched by shape
        # Recent typer vendors click, so its Exit/UsageError are not `click`'s classes: match
        # them by their attributes instead of by type.
        name = type(err).__name__
        if name == "Exit":
            return int(getattr(err, "exit_code", 0) or 0)
        if name == "Abort":
            print("error: aborted", file=sys.stderr)
            return 130
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            print(f"error: {err.format_message()}", file=sys.stderr, flush=True)
            return int(err.exit_code)
        raise


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
