"""What a job resolves before it starts: `ganray validate`, `train --dry-run` and `train` alike.

Loading the config validates every key and resolves the layout (config.py, layout.py);
`check_job` then resolves what the config only names, without reading the data or starting
Ray: the data name (a built-in, a local path that exists, torchvision:<Name>, an importable
loader), the model names, and the device of a job that trains in this process. The first
problem is one `GanrayError` line. `dry_run` goes further: it reads the data and builds both
models, as a worker would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.config import TrainConfig, load_config

log = logging.getLogger("ganray")


def check_job(config: TrainConfig) -> None:
    """Raise the first thing `train` would refuse later; returns nothing when all resolve."""
    from ganray.models.registry import check_model_names
    from ganray.workers.data import check_data_config

    check_data_config(config.data.model_dump())
    check_model_names(config.model.model_dump())
    _check_local_device(config)
    _note_elastic(config)
    _check_augment(config)


def _check_augment(config: TrainConfig) -> None:
    # The 2D mixtures are known without reading them; any other data's shape is checked by the
    # workers once they have read it (`DiscriminatorRole`), with the same one line.
    from ganray.workers.augment import AugmentSettings, refuse_unless_images

    if config.data.name in ("ring8", "grid25"):
        refuse_unless_images(AugmentSettings(kind=config.augment.kind), (2,), config.data.name)


def _note_elastic(config: TrainConfig) -> None:
    """An elastic layout is valid (every size was checked with it); say what shrinking changes."""
    layout = config.layout
    if layout.elastic_role is None:
        return
    sizes = layout.elastic_sizes()
    if layout.kind == "replicated":
        share = ", ".join(f"{layout.batch_size // n} at {n}" for n in reversed(sizes))
        log.warning("elastic replicated job (%d..%d replicas): the global batch stays %d, each replica's share "
                    "grows as replicas are lost (%s); mind a GPU's memory", sizes.start, sizes.stop - 1,
                    layout.batch_size, share)
        model = config.model
        uses_bn = (model.generator == "dcgan" and model.batchnorm) or (model.generator == "mlp" and model.mlp_batchnorm)
        if uses_bn:
            log.warning("the generator uses BatchNorm, whose batch statistics are per replica: after a resize the "
                        "numbers follow the new world size, not only the floating-point reduction order")


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
    """Read the training data and build G and D (or another learner's networks) as the workers
    will; their sizes, for display."""
    from ganray.models.registry import build_discriminator, build_generator
    from ganray.workers.data import load_dataset

    if config.model.learner != "gan":  # another learner: its own networks, built as a replica builds them
        from ganray.workers.stepper import build_replica

        stepper = build_replica(config.model_dump())
        return {"data_size": len(stepper.source), "sample_shape": "x".join(map(str, stepper.sample_shape)),
                **{f"params_{name}": sum(p.numel() for p in net.parameters())
                   for name, net in stepper.networks().items()}}
    source = load_dataset(config.data.model_dump(), config.seed, "train")
    shape = tuple(source.sample_shape)
    G = build_generator(config.model.model_dump(), shape)
    D = build_discriminator(config.model.model_dump(), shape)
    return {"data_size": len(source), "sample_shape": "x".join(map(str, shape)),
            "params_G": sum(p.numel() for p in G.parameters()),
            "params_D": sum(p.numel() for p in D.parameters())}
