"""The generator's latent distribution: one definition for training, evaluation and release.

`normal` is N(0, I), the usual choice. `uniform` is U(-1, 1)^z_dim, the original DCGAN latent:
for a target made of many separate modes of equal mass (grid25, ring8) a box splits into
equal cells by straight cuts, so G needs no curved, quantile-shaped partition of a Gaussian to
give every mode its share; on grid25 it is what takes a plain MLP GAN from mode-dropping to
every mode within minutes.

Every place that draws z (the worker's noise streams, evaluation, sample grids, the released
model's input example) goes through `draw_latent`, so a generator is never scored or released
on another distribution than it was trained on.
"""

from __future__ import annotations

from typing import Optional

import torch

LATENTS = ("normal", "uniform")


def draw_latent(kind: str, shape: tuple[int, ...], generator: Optional[torch.Generator] = None,
                device: Optional[torch.device | str] = None) -> torch.Tensor:
    """A latent batch of `shape` from the named distribution (seeded by `generator`)."""
    if kind == "normal":
        return torch.randn(shape, generator=generator, device=device)
    if kind == "uniform":
        # rand is [0, 1); the affine map keeps one draw per element, so streams stay aligned.
        return torch.rand(shape, generator=generator, device=device).mul_(2.0).sub_(1.0)
    raise ValueError(f"unknown latent distribution {kind!r}: use one of {', '.join(LATENTS)}")


def latent_of(G: torch.nn.Module) -> str:
    """The latent distribution a generator was built for (`normal` for user modules without one)."""
    return str(getattr(G, "latent", "normal"))
