"""`make demo`: train the default job and say where to look at the results."""

from __future__ import annotations

import sys
from pathlib import Path

from ganray.orchestrator.cli import main as cli_main


def main(argv: list[str]) -> int:
    config = argv[0] if argv else "configs/grid25.yaml"
    print(f"ganray demo: training {config} (a local Ray instance, MLflow store in ./mlflow.db)", flush=True)
    code = cli_main(["train", config, *argv[1:]])
    if code == 0:
        store = Path.cwd() / "mlflow.db"
        print()
        print("Results are in the MLflow store:")
        print(f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000")
        print("  then open http://127.0.0.1:5000 (experiment 'ganray': metrics, sample images by step, checkpoints)")
        print("  .venv/bin/ganray sample --run <run_id> -n 2500 --out samples.png")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
