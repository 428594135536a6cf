"""Configs are code: which import paths a config makes ganray import, and when that is allowed.

A job config may name Python code by import path (`model.generator` / `model.discriminator`:
'pkg.mod:Class', `data.name`: 'pkg.mod:loader'); building the job imports those modules, which
runs their top-level code. A config the user passes on the command line is theirs and is
trusted. A config read back from the tracking store (a run's `config.yaml`, a release's
`release/config.yaml`) was written by whoever could write that run's artifacts, so before
ganray builds anything from it, `check_imports` refuses every import path the user has not
vouched for: by `--trust-code` / `trust_code=True`, by the environment variable
`GANRAY_TRUST_CODE=1`, by `retrain.trust_code: true` in their own job config, or by naming the
same path in their own config (a retrain of a custom model imports what its job config names).
The built-in names (`mlp`, `dcgan`, the data sets, `torchvision:<Name>`) import nothing new.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from ganray.models.errors import ConfigError

TRUST_ENV = "GANRAY_TRUST_CODE"
_TRUE = ("1", "true", "yes", "on")


class UntrustedCodeError(ConfigError):
    """A config read from the store names code the user has not agreed to import."""


def import_paths(config: Any) -> list[str]:
    """`key=pkg.mod:Name` for every import path `config` (a TrainConfig) makes ganray import."""
    named = {"model.generator": config.model.generator, "model.discriminator": config.model.discriminator}
    if not config.data.name.startswith("torchvision:"):  # a torchvision class name, not an import path
        named["data.name"] = config.data.name
    return [f"{key}={value}" for key, value in named.items() if ":" in str(value)]


def trust_from_env() -> bool:
    """Whether `GANRAY_TRUST_CODE` is set to a true value (for unattended commands)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


def check_imports(config: Any, source: str, trust_code: bool = False, trusted_config: Any = None) -> None:
    """Refuse, in one line, a config read from `source` that names code nobody vouched for.

    `trusted_config` is the user's own config (e.g. a retrain job's): import paths it names are
    already theirs. `trust_code` or `GANRAY_TRUST_CODE=1` accepts every path.
    """
    if trust_code or trust_from_env():
        return
    allowed: Iterable[str] = import_paths(trusted_config) if trusted_config is not None else ()
    foreign = [path for path in import_paths(config) if path not in set(allowed)]
    if foreign:
        raise UntrustedCodeError(
            f"the config of {source} would import code: {', '.join(foreign)}; a config read from the tracking store "
            "is only as trusted as whoever can write that run: check the path, then pass --trust-code (trust_code=True "
            f"in Python, {TRUST_ENV}=1 or retrain.trust_code: true for unattended retrains) to allow it")
