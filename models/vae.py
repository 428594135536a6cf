"""A 2D variational autoencoder: the "generator alone" baseline the GANs are compared with.

A VAE is trained by likelihood: every data point must be explained by some latent code under a
continuous decoder, and the Gaussian prior over codes is connected, so the decoder's image of it
is too. On a mixture of well-separated modes it therefore spreads mass along the paths between
modes instead of placing it only on them, which is the weakness an adversarial D corrects.

Gaussian decoder with a learned (global, per-coordinate) log-variance; the ELBO is optimised
with the reparameterisation trick (Kingma & Welling 2014).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def _mlp(width_in: int, hidden: int, depth: int, width_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width_in, hidden), nn.ReLU()]
        width_in = hidden
    layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class VAE2D(nn.Module):
    """Encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), decoder p(x|z) = N(f(z), diag(exp(2*log_sigma))).

    Data are standardised with the `shift` (per coordinate) and `scale` (one number for both
    coordinates) buffers, set by `train_vae` from the training set, so one learning rate suits
    ring8 (radius 1) and grid25 (spread 4) alike; `decode` and `sample` return data coordinates.
    The scale is shared because per-coordinate scaling would blow a thin direction of noise up
    to unit size, which the learned decoder variance then "explains" by ignoring z entirely
    (posterior collapse).
    """

    def __init__(self, latent_dim: int = 2, hidden: int = 128, depth: int = 2) -> None:
        super().__init__()
        if latent_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"latent_dim, hidden and depth must be >= 1 (got {latent_dim}, {hidden}, {depth})")
        self.latent_dim = int(latent_dim)
        self.encoder = _mlp(2, hidden, depth, 2 * self.latent_dim)
        self.decoder = _mlp(self.latent_dim, hidden, depth, 2)
        # Learned decoder noise (in standardised units); starts at sigma = 1, the data's own scale.
        self.log_sigma = nn.Parameter(torch.zeros(2))
        self.register_buffer("shift", torch.zeros(2))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (N, latent_dim), for data-space points x (N, 2)."""
        mu, logvar = self.encoder((x - self.shift) / self.scale).chunk(2, dim=1)
        # Clamped so exp() can neither overflow nor collapse the posterior to a point early on.
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder mean f(z) in data coordinates, (N, 2)."""
        return self.decoder(z) * self.scale + self.shift

    def negative_elbo(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """-ELBO per sample, averaged over the batch, in nats of the standardised data (one z draw)."""
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z = mu + std * eps
        x_std = (x - self.shift) / self.scale
        log_sigma = self.log_sigma.clamp(min=-7.0)
        residual = (x_std - self.decoder(z)) * torch.exp(-log_sigma)
        nll = 0.5 * (residual.pow(2) + _LOG_2PI).sum(dim=1) + log_sigma.sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return (nll + kl).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, add_noise: bool = False) -> torch.Tensor:
        """n samples (n, 2): decoder means of z ~ N(0, I), plus the decoder's noise if `add_noise`.

        Decoder means are what a generator outputs and what the 2D metrics compare; `add_noise`
        draws from the full model p(x) instead.
        """
        device = self.shift.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        x = self.decode(z)
        if add_noise:
            noise = torch.randn(n, 2, generator=generator, device=device)
            x = x + noise * torch.exp(self.log_sigma.clamp(min=-7.0)) * self.scale
        return x


def train_vae(data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> VAE2D:
    """Train a `VAE2D` on `data` (N, 2) with Adam for `steps` minibatch steps; returns it in eval mode.

    Deterministic for a given seed, and leaves the global torch RNG untouched (its own streams
    initialise the weights and draw batches and noise).
    """
    if data.dim() != 2 or data.shape[1] != 2:
        raise ValueError(f"data must have shape (N, 2), got {tuple(data.shape)}")
    if data.shape[0] < 2 or steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need at least 2 points, steps >= 1, batch_size >= 1 and lr > 0 "
                         f"(got N={data.shape[0]}, steps={steps}, batch_size={batch_size}, lr={lr})")
    # A 2D baseline this small trains fastest on the CPU (and its random streams live there).
    data = data.detach().to("cpu", torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VAE2D()
    model.shift.copy_(data.mean(dim=0))
    # One scale for both coordinates (see VAE2D): the root of the mean per-coordinate variance.
    model.scale.fill_(float(data.var(dim=0, unbiased=False).mean().sqrt().clamp(min=1e-6)))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(data.shape[0], (batch_size,), generator=gen)
        loss = model.negative_elbo(data[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
