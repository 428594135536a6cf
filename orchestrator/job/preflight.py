"""What a job resolves before it starts: `ganray validate`, `train --dry-run` and `train` alike.

Loading the config validates every key and resolves the layout (config.py, layout.py);
`check_job` then resolves what the config only names, without reading the data or starting
Ray: the data name (a built-in, a local path that exists, torchvision:<Name>, an importable
loader), the model names, and the device of a job that trains in this process. The first
problem is one `GanrayError` line. `dry_run` goes further: it reads the data and builds both
models, as a worker would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.config import TrainConfig, load_config


def check_job(config: TrainConfig) -> None:
    """Raise the first thing `train` would refuse later; returns nothing when all resolve."""
    from ganray.models.registry import check_model_names
    from ganray.workers.data import check_data_config

    check_data_config(config.data.model_dump())
    check_model_names(config.model.model_dump())
    _check_local_device(config)


def _check_local_device(config: TrainConfig) -> None:
    # Ray topologies: a GPU per worker is checked with the layout; where it exists is the
    # cluster's business. `local` trains here, so this machine must have one.
    if config.layout.kind == "local" and config.resources.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("resources.device is 'cuda' but this machine sees no GPU; "
                              "use resources.device: auto or cpu")


def load_job(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> TrainConfig:
    """The config at `path` with `--set` overrides, validated and resolved (`check_job`)."""
    config = load_config(path, overrides)
    check_job(config)
    return config


def dry_run(config: TrainConfig) -> dict[str, Any]:
    """Read the training data and build G and D as the workers will; their sizes, for display."""
    from ganray.models.registry import build_discriminator, build_generator
    from ganray.workers.data import load_dataset

    source = load_dataset(config.data.model_dump(), config.seed, "train")
    shape = tuple(source.sample_shape)
    G = build_generator(config.model.model_dump(), shape)
    D = build_discriminator(config.model.model_dump(), shape)
    return {"data_size": len(source), "sample_shape": "x".join(map(str, shape)),
            "params_G": sum(p.numel() for p in G.parameters()),
            "params_D": sum(p.numel() for p in D.parameters())}
