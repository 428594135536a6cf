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


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, beta: float) -> None:
    """ema_param <- beta * ema_param + (1 - beta) * param for every parameter; buffers copied.

    Buffers (BatchNorm running statistics, spectral-norm power-iteration vectors) are state, not
    weights: averaging them would describe no network, so G_ema takes G's current ones.
    Both models must have the same architecture (parameters and buffers in the same order).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    ema_params = list(ema_model.parameters())
    params = list(model.parameters())
    ema_buffers = list(ema_model.buffers())
    buffers = list(model.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError("ema_model and model have different architectures "
                         f"({len(ema_params)} vs {len(params)} parameters, "
                         f"{len(ema_buffers)} vs {len(buffers)} buffers)")
    if params:
        # One fused call over all tensors instead of a Python loop of small kernels.
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    if buffers:
        torch._foreach_copy_(ema_buffers, buffers)
