"""Exponential moving average of the generator's weights (G_ema), StyleGAN's convention.

The decay is given as a half-life in thousands of images (kimg) rather than per step, so a
config means the same thing at any batch size or worker count: after `half_life_kimg * 1000`
images, the weight of the old average has halved.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch_size: int, half_life_kimg: float) -> float:
    """Per-update decay for one step of `batch_size` images: 0.5 ** (batch / (half_life * 1000)).

    A half-life of 0 turns averaging off (beta 0: G_ema is a copy of G after every update).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if half_life_kimg < 0:
        raise ValueError(f"half_life_kimg must be >= 0, got {half_life_kimg}")
    if half_life_kimg == 0:
        return 0.0
    return 0.5 ** (batch_size / (half_life_kimg * 1000.0))


class EmaPair:
    """An average model and the model it follows, their tensors listed once: walking a module
    tree (`parameters()`, `buffers()`) on every update costs more than the update itself on a
    small network.

    Both models must have the same architecture (parameters and buffers in the same order), and
    their tensors must stay the same objects (`load_state_dict` copies into them, so it may run).
    """

    def __init__(self, ema_model: nn.Module, model: nn.Module) -> None:
        self.ema_params, self.params = list(ema_model.parameters()), list(model.parameters())
        self.ema_buffers, self.buffers = list(ema_model.buffers()), list(model.buffers())
        if len(self.ema_params) != len(self.params) or len(self.ema_buffers) != len(self.buffers):
            raise ValueError("ema_model and model have different architectures "
                             f"({len(self.ema_params)} vs {len(self.params)} parameters, "
                             f"{len(self.ema_buffers)} vs {len(self.buffers)} buffers)")

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """ema_param <- beta * ema_param + (1 - beta) * param for every parameter; buffers copied.

        Buffers (BatchNorm running statistics, spectral-norm power-iteration vectors) are state,
        not weights: averaging them would describe no network, so the average takes the model's
        current ones."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if self.params:
            # One fused call over all tensors instead of a Python loop of small kernels.
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - beta)
        if self.buffers:
            torch._foreach_copy_(self.ema_buffers, self.buffers)
