"""The generator alone: encoder and decoder networks of the `ae` and `vae` learners, and the `ae`
learner's sampling module (the `vae`'s is its decoder: models/vae.py).

Both learners see any sample shape as a flat vector (2D points, or 8x8 images as 64 values) and
use MLPs of `model.hidden` width and `model.depth` hidden layers. Data are standardised by
`shift` (per value) and `scale` (one number for all values) buffers, set once from the training
set, so one learning rate suits ring8 (radius 1), grid25 (spread 4) and images in [-1, 1]. The
scale is shared because per-value scaling would blow a thin direction of noise up to unit size,
which a VAE's learned decoder variance then "explains" by ignoring its code (posterior collapse).

An autoencoder has no prior over its codes, so its samples come from a Gaussian fitted (mean,
covariance) to the training codes, plus noise of std `model.ae_noise`: what the decoder makes of
codes off the ones it was trained on is the point of the comparison (issue 17).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn


def mlp(width_in: int, hidden: int, depth: int, width_out: int) -> nn.Sequential:
    """`depth` hidden ReLU layers of `hidden` units, then a linear output layer."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width_in, hidden), nn.ReLU()]
        width_in = hidden
    layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class _Standardised(nn.Module):
    """Holds the data's `shift` (per value) and `scale` (one number) as buffers."""

    def __init__(self, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.features = math.prod(self.sample_shape)
        self.register_buffer("shift", torch.zeros(self.features))
        self.register_buffer("scale", torch.ones(()))

    def set_standardisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.shift.copy_(shift.reshape(-1))
        self.scale.copy_(scale)


class Encoder(_Standardised):
    """x (N, *sample_shape) in data coordinates -> (N, width_out) from the standardised values."""

    def __init__(self, sample_shape: tuple[int, ...], hidden: int, depth: int, width_out: int) -> None:
        super().__init__(sample_shape)
        self.net = mlp(self.features, hidden, depth, width_out)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) - self.shift) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(x))


class Decoder(_Standardised):
    """code (N, code_dim) -> x (N, *sample_shape) in data coordinates; `raw` gives the
    standardised output (what the losses compare). The `vae` learner samples with it as is."""

    def __init__(self, code_dim: int, hidden: int, depth: int, sample_shape: tuple[int, ...]) -> None:
        super().__init__(sample_shape)
        self.z_dim = int(code_dim)
        self.latent = "normal"
        self.net = mlp(self.z_dim, hidden, depth, self.features)

    def raw(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return (self.net(code) * self.scale + self.shift).reshape(code.shape[0], *self.sample_shape)


class CodeGaussian(nn.Module):
    """Running first and second moments of the training codes (buffers, so checkpoints, resume
    and group broadcasts carry them): an exponential average over batches, since the encoder
    moves while it trains; the first batch sets them."""

    def __init__(self, code_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(code_dim))
        self.register_buffer("second", torch.eye(code_dim))
        self.register_buffer("batches", torch.zeros(()))

    @staticmethod
    def batch_moments(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, E[c c^T]) of a batch of codes (N, k)."""
        return codes.mean(dim=0), codes.T @ codes / codes.shape[0]

    @torch.no_grad()
    def update(self, mean: torch.Tensor, second: torch.Tensor, beta: float) -> None:
        keep = beta if float(self.batches) > 0 else 0.0
        self.mean.mul_(keep).add_(mean, alpha=1.0 - keep)
        self.second.mul_(keep).add_(second, alpha=1.0 - keep)
        self.batches.add_(1.0)

    def covariance(self) -> torch.Tensor:
        cov = self.second - torch.outer(self.mean, self.mean)
        return 0.5 * (cov + cov.T)


def covariance_root(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = cov, for a covariance that may be singular (an over-complete code): the
    symmetric root from the eigendecomposition, negative rounding errors clipped to 0."""
    values, vectors = torch.linalg.eigh(cov.double())
    return (vectors * values.clamp(min=0.0).sqrt()).to(cov.dtype)


class AESampler(nn.Module):
    """z (N, 2k) ~ N(0, I) -> x: the decoder on code = mean + L z[:, :k] + ae_noise * z[:, k:],
    i.e. a code from the Gaussian fitted to the training codes plus independent noise. Both come
    from z, so the module is a pure function of z (exportable, seeded by whoever draws z)."""

    def __init__(self, decoder: Decoder, ae_noise: float) -> None:
        super().__init__()
        k = decoder.z_dim
        self.decoder = decoder
        self.code_dim = k
        self.z_dim = 2 * k
        self.sample_shape = decoder.sample_shape
        self.latent = "normal"
        self.register_buffer("code_mean", torch.zeros(k))
        self.register_buffer("code_root", torch.eye(k))
        self.register_buffer("ae_noise", torch.tensor(float(ae_noise)))

    @torch.no_grad()
    def fit(self, codes: CodeGaussian) -> "AESampler":
        self.code_mean.copy_(codes.mean)
        self.code_root.copy_(covariance_root(codes.covariance()))
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = self.code_dim
        code = self.code_mean + z[:, :k] @ self.code_root.T + self.ae_noise * z[:, k:]
        return self.decoder(code)


def build_ae_sampler(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> AESampler:
    """The `ae` learner's sampling module for a model config, untrained (`build_sampling_module`)."""
    decoder = Decoder(int(cfg["z_dim"]), int(cfg["hidden"]), int(cfg["depth"]), sample_shape)
    return AESampler(decoder, float(cfg.get("ae_noise", 0.0)))
