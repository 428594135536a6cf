"""The variational autoencoder of the `vae` learner: the "generator alone" trained by likelihood.

A VAE is trained by likelihood: every data point must be explained by some latent code under a
continuous decoder, and the Gaussian prior over codes is connected, so the decoder's image of it
is too. On a mixture of well-separated modes it therefore spreads mass along the paths between
modes instead of placing it only on them, which is the weakness an adversarial D corrects.

Encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), decoder p(x|z) = N(f(z), diag(exp(2*log_sigma)))
with a learned (global, per-value) log-variance, in the standardised units of
models/autoencoders.py; the ELBO is optimised with the reparameterisation trick (Kingma & Welling
2014), its noise handed in by the caller (the learner draws it from its per-round streams).
Samples are the decoder means f(z) of z ~ N(0, I): the decoder is the sampling module.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from ganray.models.autoencoders import Decoder, Encoder

_LOG_2PI = math.log(2.0 * math.pi)
LOG_SIGMA_INIT = -2.0  # the decoder's initial noise: exp(-2) of the data's scale


class VAE(nn.Module):
    """Encoder to (mu, logvar) of `code_dim` each, decoder, and the decoder's learned noise."""

    def __init__(self, sample_shape: tuple[int, ...], code_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        if code_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"code_dim, hidden and depth must be >= 1 (got {code_dim}, {hidden}, {depth})")
        self.code_dim = int(code_dim)
        self.encoder = Encoder(sample_shape, hidden, depth, 2 * self.code_dim)
        self.decoder = Decoder(self.code_dim, hidden, depth, sample_shape)
        # Learned decoder noise (in standardised units). Started at the data's own scale (sigma 1)
        # the decoder explains every point as noise and the KL term keeps the codes empty
        # (posterior collapse: samples at the data mean); started small, the codes carry the data.
        self.log_sigma = nn.Parameter(torch.full((self.encoder.features,), LOG_SIGMA_INIT))

    def set_standardisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.encoder.set_standardisation(shift, scale)
        self.decoder.set_standardisation(shift, scale)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (N, code_dim), for data-space samples x."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        # Clamped so exp() can neither overflow nor collapse the posterior to a point early on.
        return mu, logvar.clamp(-12.0, 8.0)

    def elbo_terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (reconstruction negative log-likelihood, KL(q(z|x) || N(0, I))), in nats of
        the standardised data, for one reparameterised code z = mu + std * eps per sample."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_sigma = self.log_sigma.clamp(min=-7.0)
        residual = (self.encoder.standardise(x) - self.decoder.raw(z)) * torch.exp(-log_sigma)
        nll = 0.5 * (residual.pow(2) + _LOG_2PI).sum(dim=1) + log_sigma.sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return nll, kl


def build_vae_sampler(cfg: Mapping[str, Any], sample_shape: tuple[int, ...]) -> Decoder:
    """The `vae` learner's sampling module for a model config, untrained: its decoder, z ~ N(0, I)."""
    return Decoder(int(cfg["z_dim"]), int(cfg["hidden"]), int(cfg["depth"]), sample_shape)
