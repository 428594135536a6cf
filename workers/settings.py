"""What a round needs to know, read once from the job config dict (`TrainConfig.model_dump()`).

`Hyper` holds the values that may change during a run (PBT mutates them after a restore, and
the fault policy scales the learning rates); `StepSettings` holds the rest, plus the device,
precision and memory format the worker resolved for itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from ganray.models.errors import ConfigError
from ganray.workers.augment import AugmentSettings


@dataclass
class Hyper:
    """Hyperparameters that may change during a run (PBT mutates them after a restore)."""

    g_lr: float
    d_lr: float
    betas: tuple[float, float]
    n_critic: int
    r1_gamma: float
    r2_gamma: float = 0.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Hyper":
        sched, loss = config["schedule"], config["loss"]
        return cls(g_lr=float(sched["g_lr"]), d_lr=float(sched["d_lr"]),
                   betas=(float(sched["betas"][0]), float(sched["betas"][1])),
                   n_critic=int(sched["n_critic"]), r1_gamma=float(loss["r1_gamma"]),
                   r2_gamma=float(loss.get("r2_gamma", 0.0)))

    def update(self, values: dict[str, Any]) -> None:
        """Set the given hyperparameters; an unknown name is a ConfigError naming the valid ones,
        and nothing is changed."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown hyperparameter {', '.join(repr(k) for k in unknown)}; "
                              f"use one of {', '.join(names)}")
        for key, value in values.items():
            if key == "betas":
                value = (float(value[0]), float(value[1]))
            elif key == "n_critic":
                value = int(value)
            else:
                value = float(value)
            setattr(self, key, value)


@dataclass
class StepSettings:
    """Everything a round needs to know, taken from the job config dict (`TrainConfig.model_dump()`)."""

    seed: int
    global_batch: int
    loss_kind: str
    r1_interval: int
    gp_weight: float
    ema_half_life_kimg: float
    lr_decay: str
    lr_decay_kimg: Optional[float]
    lr_min_factor: float
    hyper: Hyper
    instance_noise: float = 0.0
    instance_noise_kimg: Optional[float] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_bf16: bool = False
    channels_last: bool = False
    compile_backend: Optional[str] = None  # resources.compile's backend; None: eager
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StepSettings":
        sched, loss, res = config["schedule"], config["loss"], config["resources"]
        device = pick_device(res.get("device", "auto"))
        return cls(
            seed=int(config["seed"]), global_batch=int(sched["batch_size"]),
            loss_kind=loss["kind"], r1_interval=int(loss["r1_interval"]),
            gp_weight=float(loss["gp_weight"]), ema_half_life_kimg=float(sched["ema_half_life_kimg"]),
            lr_decay=sched["lr_decay"], lr_decay_kimg=sched.get("lr_decay_kimg"),
            lr_min_factor=float(sched["lr_min_factor"]), hyper=Hyper.from_config(config),
            instance_noise=float(loss.get("instance_noise", 0.0)),
            instance_noise_kimg=loss.get("instance_noise_kimg"),
            device=device,
            autocast_bf16=(res.get("precision") == "bf16" and device.type == "cuda"),
            channels_last=channels_last_for(res.get("channels_last"), device),
            compile_backend=str(res.get("compile_backend") or "inductor") if res.get("compile") else None,
            augment=AugmentSettings.from_config(config),
        )

    def lr_factor(self, kimg: float) -> float:
        """LR multiplier at absolute `kimg`; defined over absolute kimg so extending a run
        (a larger total_kimg) never rewrites its past."""
        if self.lr_decay == "none" or not self.lr_decay_kimg:
            return 1.0
        t = min(max(kimg / self.lr_decay_kimg, 0.0), 1.0)
        lo = self.lr_min_factor
        if self.lr_decay == "linear":
            return 1.0 - (1.0 - lo) * t
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))

    def noise_std(self, kimg: float) -> float:
        """Instance-noise std at absolute `kimg`: linear decay to 0 at instance_noise_kimg, or
        constant when that is unset. Noise on both of D's inputs keeps D smooth early on, so its
        gradient still reaches modes G has no samples near (mass can move between modes)."""
        if self.instance_noise <= 0.0:
            return 0.0
        if not self.instance_noise_kimg:
            return self.instance_noise
        return self.instance_noise * max(0.0, 1.0 - kimg / self.instance_noise_kimg)


def channels_last_for(requested: Optional[bool], device: torch.device) -> bool:
    """`resources.channels_last`, or its default when unset: on for CPU, where oneDNN's NHWC
    convolutions are the faster path; off on CUDA, where it helped in fp32 and hurt in bf16 in
    the benchmark runs, so it is the user's call. Only conv nets (image samples) are converted;
    the MLPs ignore it."""
    if requested is None:
        return device.type == "cpu"
    return bool(requested)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("resources.device is 'cuda' but this worker sees no GPU; "
                               "set resources.gpus_per_worker or resources.device: cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
