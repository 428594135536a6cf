"""Build G and D from the `model` config section: built-in names or a user's import path.

`model_cfg` is `TrainConfig.model.model_dump()` (keys generator, discriminator, z_dim, hidden,
depth, base_width, spectral_norm, batchnorm, mlp_batchnorm, pack, kwargs). A name is looked up
in the registries (`mlp`, `dcgan`, plus anything added with `register_generator` /
`register_discriminator`);
a name with a colon is an import path `pkg.mod:Name`, constructed as
`Name(sample_shape=..., z_dim=..., **kwargs)` for generators and `Name(sample_shape=..., **kwargs)`
for discriminators. Every user mistake surfaces as a one-line `ConfigError`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ganray.models.errors import ConfigError
from ganray.models.nets import (DCGAN_RESOLUTIONS, DCGANDiscriminator, DCGANGenerator, MLPDiscriminator,
                                MLPGenerator)

Builder = Callable[[Mapping[str, Any], tuple[int, ...]], nn.Module]

# Mirrors ModelConfig's defaults so callers that pass a partial dict (tests, notebooks) get the
# same networks as a full config; the config tree cannot be imported here (models is the bottom layer).
_DEFAULTS: dict[str, Any] = {
    "generator": "mlp", "discriminator": "mlp", "z_dim": 16, "hidden": 256, "depth": 3,
    "base_width": 64, "spectral_norm": False, "batchnorm": True, "mlp_batchnorm": False, "mlp_skip": False, "pack": 1,
    "kwargs": {}, "learner": "gan", "ae_noise": 0.0, "conditional": False, "num_classes": None,
}

_GENERATORS: dict[str, Builder] = {}
_DISCRIMINATORS: dict[str, Builder] = {}


def _register(table: dict[str, Builder], role: str, name: str, builder: Builder) -> Builder:
    if not name or ":" in name:
        raise ValueError(f"a {role} name must be non-empty and contain no ':' (that marks an import path), got {name!r}")
    if name in table:
        raise ValueError(f"{role} '{name}' is already registered")
    if not callable(builder):
        raise TypeError(f"the builder for {role} '{name}' is not callable")
    table[name] = builder
    return builder


def register_generator(name: str, builder: Builder) -> Builder:
    """Make `model.generator: <name>` build `builder(model_cfg, sample_shape)`."""
    return _register(_GENERATORS, "generator", name, builder)


def register_discriminator(name: str, builder: Builder) -> Builder:
    """Make `model.discriminator: <name>` build `builder(model_cfg, sample_shape)`."""
    return _register(_DISCRIMINATORS, "discriminator", name, builder)


def _image_shape(key: str, sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, resolution) of an image sample shape that DCGAN supports, or a ConfigError."""
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2] or sample_shape[1] not in DCGAN_RESOLUTIONS:
        raise ConfigError(f"{key} 'dcgan' needs square images (C, R, R) with R in "
                          f"{', '.join(map(str, DCGAN_RESOLUTIONS))}, but the data's samples have shape "
                          f"{tuple(sample_shape)}: use 'mlp' for 2D data or set data.resolution")
    return sample_shape[0], sample_shape[1]


def num_classes_of(model_cfg: Mapping[str, Any]) -> int:
    """The classes of a conditional model (`model.conditional`), 0 for an unconditional one."""
    cfg = {**_DEFAULTS, **model_cfg}
    if not cfg["conditional"]:
        return 0
    if not cfg["num_classes"]:
        raise ConfigError("model.conditional: true needs model.num_classes "
                          "(the number of classes in the data's labels)")
    return int(cfg["num_classes"])


def _mlp_generator(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    return MLPGenerator(cfg["z_dim"], cfg["hidden"], cfg["depth"], sample_shape,
                        batchnorm=bool(cfg["mlp_batchnorm"]), skip=bool(cfg["mlp_skip"]),
                        num_classes=num_classes_of(cfg))


def _mlp_discriminator(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    return MLPDiscriminator(cfg["hidden"], cfg["depth"], sample_shape, spectral_norm=cfg["spectral_norm"],
                            pack=int(cfg["pack"]), num_classes=num_classes_of(cfg))


def _dcgan_generator(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    channels, resolution = _image_shape("model.generator", sample_shape)
    return DCGANGenerator(cfg["z_dim"], resolution, channels, cfg["base_width"],
                          batchnorm=cfg["batchnorm"], spectral_norm=cfg["spectral_norm"],
                          num_classes=num_classes_of(cfg))


def _dcgan_discriminator(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    channels, resolution = _image_shape("model.discriminator", sample_shape)
    return DCGANDiscriminator(resolution, channels, cfg["base_width"], spectral_norm=cfg["spectral_norm"],
                              num_classes=num_classes_of(cfg), pack=int(cfg["pack"]))


def _refuse_conditional_import(key: str, name: str, cfg: Mapping[str, Any]) -> None:
    if cfg["conditional"]:
        raise ConfigError(f"model.conditional: true needs the built-in networks (mlp, dcgan) for {key}; "
                          f"'{name}' is an import path: use mlp or dcgan, or set model.conditional: false")


register_generator("mlp", _mlp_generator)
register_generator("dcgan", _dcgan_generator)
register_discriminator("mlp", _mlp_discriminator)
register_discriminator("dcgan", _dcgan_discriminator)


def _import_callable(key: str, path: str) -> Callable[..., Any]:
    """Resolve 'pkg.mod:Name' (Name may be dotted, e.g. 'mod:Outer.Inner')."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} '{path}' is not an import path: write it as 'pkg.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a config problem
        raise ConfigError(f"{key} '{path}': cannot import module '{module_name}' "
                          f"({type(exc).__name__}: {exc}); check the name and that it is on PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key} '{path}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key} '{path}' names a {type(obj).__name__}, not a class or function that builds a model")
    return obj


def _construct(key: str, path: str, given: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    clash = sorted(set(given) & set(kwargs))
    if clash:
        raise ConfigError(f"model.kwargs must not set {', '.join(clash)}: ganray passes it to {key} "
                          f"'{path}' from model.z_dim and the data's sample shape; remove it from model.kwargs")
    factory = _import_callable(key, path)
    kwargs = {**given, **kwargs}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{key} '{path}' failed to build with arguments {sorted(kwargs)} "
                          f"({type(exc).__name__}: {exc}); check model.kwargs") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key} '{path}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@torch.no_grad()
def _probe(key: str, path: str, model: nn.Module, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Run a user model once on zeros and check its output shape, for a clear error at build time.

    Eval mode, so BatchNorm statistics and spectral-norm vectors stay untouched, and zeros, so no
    random stream is consumed (every topology must draw the same noise afterwards).
    """
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise ConfigError(f"{key} '{path}' fails on a batch of shape {tuple(x.shape)} "
                          f"({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{key} '{path}' must return shape {expected} for a batch of shape "
                          f"{tuple(x.shape)}, got {got}")


def _config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**_DEFAULTS, **model_cfg}
    cfg["kwargs"] = dict(cfg.get("kwargs") or {})
    return cfg


def build_generator(model_cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    """G for the given config and data sample shape; G has `z_dim` and `sample_shape` attributes."""
    cfg = _config(model_cfg)
    shape = tuple(int(s) for s in sample_shape)
    name, z_dim = str(cfg["generator"]), int(cfg["z_dim"])
    key = "model.generator"
    if name in _GENERATORS:
        G = _GENERATORS[name](cfg, shape)
    elif ":" in name:
        _refuse_conditional_import(key, name, cfg)
        G = _construct(key, name, {"sample_shape": shape, "z_dim": z_dim}, cfg["kwargs"])
    else:
        raise ConfigError(f"unknown {key} '{name}': use one of {', '.join(sorted(_GENERATORS))} "
                          "or an import path 'pkg.module:Class'")
    # Callers draw z from G.z_dim and size sample grids from G.sample_shape: make both reliable.
    if getattr(G, "z_dim", z_dim) != z_dim:
        raise ConfigError(f"{key} '{name}' has z_dim {G.z_dim} but model.z_dim is {z_dim}")
    if tuple(getattr(G, "sample_shape", shape)) != shape:
        raise ConfigError(f"{key} '{name}' has sample_shape {tuple(G.sample_shape)} but the data's is {shape}")
    G.z_dim, G.sample_shape = z_dim, shape
    G.latent = str(cfg.get("latent") or "normal")  # every z drawn for G comes from this (models/latent.py)
    G.num_classes = num_classes_of(cfg)  # 0: G(z); otherwise G(z, y) with y in 0..num_classes-1
    if name not in _GENERATORS:
        _probe(key, name, G, torch.zeros(2, z_dim), (2, *shape))
    return G


def build_discriminator(model_cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    """D for the given config and data sample shape: D(x (N, *sample_shape)) -> logits (N,)."""
    cfg = _config(model_cfg)
    shape = tuple(int(s) for s in sample_shape)
    name = str(cfg["discriminator"])
    key = "model.discriminator"
    if name in _DISCRIMINATORS:
        return _DISCRIMINATORS[name](cfg, shape)
    if ":" in name:
        _refuse_conditional_import(key, name, cfg)
        D = _construct(key, name, {"sample_shape": shape}, cfg["kwargs"])
        _probe(key, name, D, torch.zeros(2, *shape), (2,))
        return D
    raise ConfigError(f"unknown {key} '{name}': use one of {', '.join(sorted(_DISCRIMINATORS))} "
                      "or an import path 'pkg.module:Class'")


def check_model_names(model_cfg: Mapping[str, Any]) -> None:
    """Both model names resolve (a registered name, or an importable 'pkg.module:Class'), checked
    without building: building needs the data's sample shape."""
    cfg = _config(model_cfg)
    for key, table in (("model.generator", _GENERATORS), ("model.discriminator", _DISCRIMINATORS)):
        name = str(cfg[key.partition(".")[2]])
        if name in table:
            continue
        if ":" not in name:
            raise ConfigError(f"unknown {key} '{name}': use one of {', '.join(sorted(table))} "
                              "or an import path 'pkg.module:Class'")
        _import_callable(key, name)


# --- sampling modules: each learner's z -> x module ------------------------------------------------

_SAMPLERS: dict[str, Builder] = {}


def register_sampling_module(learner: str, builder: Builder) -> Builder:
    """Make `build_sampling_module` build `builder(model_cfg, sample_shape)` for `model.learner: <learner>`."""
    return _register(_SAMPLERS, "sampling module", learner, builder)


def build_sampling_module(model_cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> nn.Module:
    """The learner's z -> x module, untrained, for the given config and data sample shape: what
    evaluation, sample grids and releases run, loaded with the state a stepper's
    `sampling_module()` saved (the GAN's G_ema). It has `z_dim`, `sample_shape` and `latent`."""
    cfg = _config(model_cfg)
    learner = str(cfg["learner"])
    if learner not in _SAMPLERS:
        raise ConfigError(f"unknown model.learner '{learner}': use one of {', '.join(sorted(_SAMPLERS))}")
    return _SAMPLERS[learner](cfg, tuple(int(s) for s in sample_shape))


register_sampling_module("gan", build_generator)


def _register_learners() -> None:
    # Imported here, at the bottom: the learners' networks import nothing from this module.
    from ganray.models.autoencoders import build_ae_sampler
    from ganray.models.vae import build_vae_sampler

    from ganray.models.energy import build_energy_sampler

    register_sampling_module("ae", build_ae_sampler)
    register_sampling_module("vae", build_vae_sampler)
    register_sampling_module("energy", build_energy_sampler)


_register_learners()
