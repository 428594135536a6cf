"""ganray's control plane: config, coordinator, schedule, tracking (MLflow), tune, retrain, CLI.

The Python API mirrors the CLI::

    from ganray.orchestrator import train

    from ganray.orchestrator import TrainConfig
    result = train("configs/grid25.yaml", ["topology.num_workers=2"])
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "TrainConfig", "load_config", "TrainResult"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import ganray.orchestrator` stays cheap for tools that only need the config.
    if name in ("TrainConfig", "load_config"):
        from ganray.orchestrator.job import config

        return getattr(config, name)
    if name in ("train", "TrainResult"):
        from ganray.orchestrator.job import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
