"""Which config keys each learner reads (issue 17), and the checks built on that table.

`model.learner` picks what trains; a key the learner does not read, set away from its default,
is refused by the config in one line (`unread_keys`, called by `TrainConfig`'s validator).
`for_learner` turns one recipe into another learner's config; `require_gan` is `tune`'s and
`retrain`'s refusal of the others. Nothing here imports the config module at import time: it
imports this one.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ganray.models.errors import ConfigError

if TYPE_CHECKING:
    from ganray.orchestrator.job.config import TrainConfig

# Keys a learner does not read: a dotted key, or a prefix ending in '.' or '_' (a section, or a
# family such as the energy learner's `model.energy_*`). Set away from its default, such a key is
# refused in one line: a setting that silently does nothing is a mistake waiting to be made.
# docs/architecture.md ("Learners") lists the same in words.
_GAN_MODEL_KEYS = ("model.generator", "model.discriminator", "model.latent", "model.base_width",
                   "model.spectral_norm", "model.batchnorm", "model.mlp_batchnorm", "model.mlp_skip",
                   "model.pack", "model.kwargs", "model.conditional", "model.num_classes")
# torch.compile wraps the GAN's phase steps only (workers/steps.py).
_COMPILE_KEYS = ("resources.compile", "resources.compile_")
_AUTOENCODER_IGNORES = ("loss.", "augment.", *_GAN_MODEL_KEYS, *_COMPILE_KEYS, "schedule.n_critic", "schedule.d_lr",
                        "model.energy_")
LEARNER_IGNORES: dict[str, tuple[str, ...]] = {
    "gan": ("model.ae_noise", "model.energy_"),
    "ae": _AUTOENCODER_IGNORES,
    "vae": (*_AUTOENCODER_IGNORES, "model.ae_noise", "schedule.ema_half_life_kimg"),
    # energy: D searches its own input space, so no z; a packed D (pack > 1) would mix the
    # samples of one search, whose steps must each move one sample alone.
    "energy": ("loss.", "augment.", *_COMPILE_KEYS, "model.generator", "model.latent", "model.z_dim",
               "model.pack", "model.conditional", "model.num_classes",
               "model.batchnorm", "model.mlp_batchnorm", "model.mlp_skip", "model.ae_noise", "schedule.n_critic",
               "schedule.g_lr"),
}


def ignored(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether dotted `key` is one of `patterns` (a key, or a prefix ending in '.' or '_')."""
    return any(key == p or (p[-1] in "._" and key.startswith(p)) for p in patterns)


def unread_keys(learner: str, flat: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The keys of a flattened config, set away from their defaults, that `learner` does not read."""
    patterns = LEARNER_IGNORES[learner]
    return [k for k, v in flat.items() if ignored(k, patterns) and v != defaults.get(k)]


def for_learner(config: "TrainConfig", learner: str) -> "TrainConfig":
    """`config` with `model.learner: learner` and every key that learner does not read back at its
    default (e.g. a GAN recipe's `loss.*` for the `ae`), so one recipe's data, schedule and
    topology can train every learner (what `ganray compare` needs)."""
    from ganray.orchestrator.job.config import TrainConfig, config_from_dict, flatten

    if learner not in LEARNER_IGNORES:
        raise ConfigError(f"unknown learner '{learner}': use one of {', '.join(LEARNER_IGNORES)}")
    if config.topology.kind == "split" and learner != "gan":
        raise ConfigError(f"topology.kind 'split' trains a GAN only; model.learner '{learner}' runs in "
                          "topology.kind local or replicated")
    tree = config.model_dump(mode="json")
    tree["model"]["learner"] = learner
    defaults = TrainConfig.model_construct().model_dump(mode="json")
    for key in flatten(tree):
        if ignored(key, LEARNER_IGNORES[learner]):
            section, _, name = key.partition(".")
            tree[section][name] = copy.deepcopy(defaults[section][name])
    return config_from_dict(tree)


def require_gan(config: "TrainConfig", command: str) -> None:
    """`tune` and `retrain` search and promote GANs only: refuse another learner in one line."""
    if config.model.learner != "gan":
        raise ConfigError(f"ganray {command} takes GAN configs only (model.learner: gan), not model.learner "
                          f"'{config.model.learner}'; train it with ganray train")
