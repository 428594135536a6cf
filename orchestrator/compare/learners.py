"""Which learners a comparison trains, and each one's config derived from the GAN recipe.

The comparison starts from one config (a GAN recipe: its data, network width, batch, schedule).
Every learner trains on that config with `model.learner` set, minus the keys it does not read
(`learner_keys.LEARNER_IGNORES`: the GAN's loss, D's packing, the latent law, ...), which go back to
their defaults: the config refuses a key a learner ignores, and a comparison must not pretend a
GAN-only setting shaped the autoencoder. Periodic evaluations are off: each learner is scored
once, at the end, so every learner's training seconds are spent training (an energy model's
evaluation runs its sampling search, which would otherwise eat its budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.config import TrainConfig, config_from_dict, parse_override, read_yaml_file
from ganray.orchestrator.job.learner_keys import LEARNER_IGNORES, ignored
from ganray.orchestrator.job.preflight import check_job

LEARNERS: tuple[str, ...] = ("ae", "vae", "energy", "gan")
DEFAULT_SEED = 1000  # held-out: the recipes were chosen on seeds 0-9
NEVER_KIMG = 1e9     # eval.every_kimg of a comparison's jobs: only the final evaluation runs


def parse_learners(text: str) -> list[str]:
    """`ae,vae,energy,gan` -> the names in order, each known and named once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--learners is empty; name one or more of " + ", ".join(LEARNERS))
    unknown = [n for n in names if n not in LEARNERS]
    if unknown:
        raise ConfigError(f"--learners: unknown learner '{unknown[0]}'; choose from {', '.join(LEARNERS)}")
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise ConfigError(f"--learners names '{twice[0]}' twice")
    return names


def _reads(key: str, learner: str) -> bool:
    return not ignored(key, LEARNER_IGNORES[learner])


def _drop_unread(tree: dict[str, Any], learner: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in TrainConfig.model_fields and key != "seed":  # a section
            out[key] = {k: v for k, v in value.items() if _reads(f"{key}.{k}", learner)}
        elif _reads(str(key), learner):
            out[key] = value
    return out


@dataclass
class Recipe:
    """The config file's tree and the `--set` overrides, before any learner is chosen: a key only
    some learners read (`model.ae_noise`) is valid for those and left out for the others."""

    tree: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "Recipe":
        tree = read_yaml_file(path, "config", "configs/ring8.yaml")
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"the config must be a YAML mapping of sections (seed, data, model, ...), "
                              f"not a {type(tree).__name__}")
        return cls(tree, list(overrides or []))

    def check_overrides(self, learners: list[str]) -> None:
        """Every `--set` key is read by at least one learner compared (else it would change nothing)."""
        for text in self.overrides:
            key = ".".join(parse_override(text)[0])
            if not any(_reads(key, name) for name in learners):
                raise ConfigError(f"--set {key}: none of the learners compared ({', '.join(learners)}) reads it")


def learner_config(recipe: Recipe, learner: str, seed: int) -> TrainConfig:
    """The recipe for `learner`, trained from `seed`, scored only at the end, registering nothing."""
    tree = _drop_unread(recipe.tree, learner)
    kept = [o for o in recipe.overrides if _reads(".".join(parse_override(o)[0]), learner)]
    # One evaluation, the final one: an interval longer than any job never falls due before it.
    fixed = kept + [f"model.learner={learner}", f"seed={int(seed)}", "tracking.model_name=null",
                    f"eval.every_kimg={NEVER_KIMG:g}"]
    config = config_from_dict(tree, fixed)
    check_job(config)
    return config


def seeds_of(seed: int | None, seeds: int | None) -> list[int]:
    """`--seed N` (one seed) or `--seeds N` (N held-out seeds from 1000); default seed 1000."""
    if seed is not None and seeds is not None:
        raise ConfigError("give --seed N or --seeds N, not both")
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: give at least 1")
        return [DEFAULT_SEED + i for i in range(seeds)]
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed {seed}: seeds are >= 0")
    return [DEFAULT_SEED if seed is None else int(seed)]
