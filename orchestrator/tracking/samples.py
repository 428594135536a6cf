"""Sample figures logged to MLflow: an image grid from a fixed latent batch, or a 2D scatter
of samples over the mixture's modes.

During training both are drawn with numpy/torchvision into an RGB array and logged as MLflow
step images. matplotlib is kept for `ganray sample --out x.png`: importing and rendering it
in the training process costs interpreter time per plot that competes for the GIL with the
training loop (measured by `ganray bench tracking`). A conditional generator's image grid has
one row per class (`class_request`: also `ganray sample --class`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ganray.models.errors import GanrayError
from ganray.orchestrator.job.evaluate import MIXTURES, generator_classes, sample_generator

FIXED_LATENT_SEED = 20_240_601  # the same latent batch at every step, so grids are comparable
# A grid narrower than this is scaled up by a whole factor, nearest neighbour: an 8x8 digits grid
# is otherwise a thumbnail in the MLflow UI, and whole pixels keep the samples' own pixels sharp.
MIN_GRID_WIDTH = 256
# A training grid of a conditional model: this many samples of each class, one row per class,
# for at most GRID_MAX_CLASSES classes (the first ones: a 1000-class grid would be unreadable).
GRID_PER_CLASS = 8
GRID_MAX_CLASSES = 32


def class_request(G: torch.nn.Module, spec: Optional[str], n: int) -> tuple[Optional[torch.Tensor], int]:
    """(each sample's class, samples per grid row) for `ganray sample --class K|all` and `-n n`.

    No `spec`: None (a conditional G takes the classes in turn) and rows of 8. `K`: n samples of
    class K. `all`: ceil(n / classes) samples of every class, one grid row per class. A class
    out of range, or `--class` on an unconditional model, is a one-line GanrayError."""
    classes = generator_classes(G)
    if spec is None:
        return None, 8
    if not classes:
        raise GanrayError(f"--class {spec}: this model is unconditional (trained without model.conditional); "
                          "drop --class")
    if spec.strip().lower() == "all":
        per_class = max(1, -(-n // classes))
        return torch.arange(classes).repeat_interleave(per_class), per_class
    try:
        k = int(spec)
    except ValueError:
        raise GanrayError(f"--class {spec!r}: give a class number 0..{classes - 1} or 'all'") from None
    if not 0 <= k < classes:
        raise GanrayError(f"--class {k} is out of range: this model has {classes} classes, 0..{classes - 1}")
    return torch.full((n,), k, dtype=torch.long), 8


def image_grid(images: torch.Tensor, nrow: int = 8, min_width: int = MIN_GRID_WIDTH) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> an HxWx3 uint8 grid (torchvision's make_grid), at least
    `min_width` pixels wide."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize
    from torchvision.utils import make_grid

    grid = make_grid(images.clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    factor = -(-min_width // grid.shape[-1])  # ceil
    if factor > 1:
        size = [grid.shape[-2] * factor, grid.shape[-1] * factor]
        grid = resize(grid, size, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


SCATTER_SIZE = 320
_POINT_RGB = np.array([31, 119, 180], dtype=np.float32)  # matplotlib's default blue
_MODE_RGB = np.array([214, 39, 40], dtype=np.uint8)
_FRAME_RGB = np.array([160, 160, 160], dtype=np.uint8)


def scatter_extent(samples: np.ndarray, data_name: str) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) shown: the mixture's modes with a margin (the same frame at every step,
    so the images of a run compare), or the samples' 1st-99th percentiles for other 2D data."""
    if data_name in MIXTURES:
        from ganray.models.metrics2d import mixture_modes

        points = mixture_modes(data_name)[0]
    else:
        finite = samples[np.isfinite(samples).all(axis=1)]
        points = np.percentile(finite, [1, 99], axis=0) if len(finite) else np.array([[-1.0, -1.0], [1.0, 1.0]])
    lo, hi = points.min(axis=0), points.max(axis=0)
    half = max(float((hi - lo).max()) / 2.0, 1e-3) * 1.25
    centre = (lo + hi) / 2.0
    return centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half


def scatter_image(samples: np.ndarray, data_name: str, size: int = SCATTER_SIZE) -> np.ndarray:
    """An HxWx3 uint8 scatter of (N, 2) samples: shade by how many samples fall on each pixel,
    red crosses on a mixture's modes, a grey frame. Samples outside the frame are not drawn."""
    x0, x1, y0, y1 = scatter_extent(samples, data_name)
    counts, _, _ = np.histogram2d(samples[:, 1], samples[:, 0], bins=size, range=[[y0, y1], [x0, x1]])
    counts = counts[::-1]  # row 0 is the top of the picture: largest y
    # Dilate each sample to a 2x2 dot, then shade like alpha-blended markers (alpha 0.4 each).
    dots = counts.copy()
    dots[1:, :] += counts[:-1, :]
    dots[:, 1:] += counts[:, :-1]
    cover = 1.0 - 0.6 ** dots
    image = 255.0 * (1.0 - cover[..., None]) + _POINT_RGB * cover[..., None]
    image = image.round().astype(np.uint8)
    if data_name in MIXTURES:
        from ganray.models.metrics2d import mixture_modes

        for mx, my in mixture_modes(data_name)[0]:
            col = int((mx - x0) / (x1 - x0) * size)
            row = int((y1 - my) / (y1 - y0) * size)
            for d in range(-4, 5):  # an 'x' 9 pixels wide
                for r, c in ((row + d, col + d), (row + d, col - d)):
                    if 0 <= r < size and 0 <= c < size:
                        image[r, c] = _MODE_RGB
    image[[0, -1], :] = _FRAME_RGB
    image[:, [0, -1]] = _FRAME_RGB
    return image


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
        samples = sample_generator(G, 2500, FIXED_LATENT_SEED).numpy()
        logger.log_image(scatter_image(samples, config.data.name), key="samples", step=images_seen)
    elif generator_classes(G):
        rows = min(generator_classes(G), GRID_MAX_CLASSES)
        classes = torch.arange(rows).repeat_interleave(GRID_PER_CLASS)
        images = sample_generator(G, len(classes), FIXED_LATENT_SEED, classes=classes)
        logger.log_image(image_grid(images, nrow=GRID_PER_CLASS), key="samples", step=images_seen)
    else:
        images = sample_generator(G, 64, FIXED_LATENT_SEED)
        logger.log_image(image_grid(images), key="samples", step=images_seen)


class SamplePlots:
    """A sample picture of the run every `schedule.sample_kimg` (the job's last point included)."""

    def __init__(self, logger: Any, config: Any, images_seen: int) -> None:
        from ganray.orchestrator.job.schedule import Interval

        self.logger, self.config = logger, config
        self.interval = Interval(config.schedule.sample_kimg, images_seen)

    def due(self, images_seen: int) -> bool:
        return self.interval.due(images_seen)

    def log(self, G: torch.nn.Module, images_seen: int) -> None:
        log_samples(self.logger, self.config, G, images_seen)


class NullSamplePlots:
    """No pictures: tracking is off (drawing them would cost the loop for nothing)."""

    def due(self, images_seen: int) -> bool:
        return False

    def log(self, G: torch.nn.Module, images_seen: int) -> None:
        pass
