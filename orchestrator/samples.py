"""Sample figures logged to MLflow: an image grid from a fixed latent batch, or a 2D scatter
of samples over the mixture's modes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ganray.orchestrator.evaluate import MIXTURES, sample_generator

FIXED_LATENT_SEED = 20_240_601  # the same latent batch at every step, so grids are comparable


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> an HxWx3 uint8 grid (torchvision's make_grid)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def scatter_figure(samples: np.ndarray, data_name: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, label="G_ema samples")
    if data_name in MIXTURES:
        from ganray.models.metrics2d import mixture_modes

        modes, _ = mixture_modes(data_name)
        ax.scatter(modes[:, 0], modes[:, 1], s=30, c="red", marker="x", label="modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=6)
    fig.tight_layout()
    return fig


def log_samples(logger: Any, config: Any, G: torch.nn.Module, images_seen: int) -> None:
    if len(getattr(G, "sample_shape", (2,))) == 1:
        import matplotlib.pyplot as plt

        samples = sample_generator(G, 2500, FIXED_LATENT_SEED).numpy()
        fig = scatter_figure(samples, config.data.name)
        logger.log_figure(fig, f"samples/scatter-{images_seen:09d}.png")
        plt.close(fig)
    else:
        images = sample_generator(G, 64, FIXED_LATENT_SEED)
        logger.log_image(image_grid(images), key="samples", step=images_seen)
