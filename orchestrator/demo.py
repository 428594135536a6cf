"""`make demo`: train the default job and say where to look at the results.

    python -m ganray.orchestrator.demo [CONFIG] [train options...]

CONFIG defaults to configs/grid25.yaml; every further argument goes to `ganray train` as is, so a
short demo is `... demo configs/grid25.yaml --set schedule.total_kimg=20` (the tests run it so).
The results are printed for the store `train` wrote to (`--tracking-uri`, MLFLOW_TRACKING_URI,
or ./mlflow.db), with the run's own id in the `ganray sample` command.
"""

from __future__ import annotations

import sys
from typing import Optional

from ganray.orchestrator.cli import main as cli_main


def _option(argv: list[str], name: str) -> Optional[str]:
    """The value of `name VALUE` or `name=VALUE` in argv (the last one wins, as in typer)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _latest_run_id(uri: str) -> Optional[str]:
    """The run the demo just finished: the newest run in the store (a demo store is not shared)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def main(argv: list[str]) -> int:
    from ganray.orchestrator.tracking.store import resolve_tracking_uri

    config = argv[0] if argv else "configs/grid25.yaml"
    uri = resolve_tracking_uri(_option(argv[1:], "--tracking-uri"), None)
    print(f"ganray demo: training {config} (a local Ray instance, MLflow store {uri})", flush=True)
    code = cli_main(["train", config, *argv[1:]])
    if code == 0:
        run_id = _latest_run_id(uri) or "<run_id>"
        print()
        print(f"Results are in the MLflow store {uri}:")
        if uri.startswith("sqlite:"):
            print(f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
            print("  then open http://127.0.0.1:5000 (experiment 'ganray': metrics, sample images by step, checkpoints)")
        else:
            print(f"  open {uri} (experiment 'ganray': metrics, sample images by step, checkpoints)")
        print(f"  .venv/bin/ganray sample --run {run_id} -n 2500 --out samples.png --tracking-uri {uri}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
