"""Sample pictures: the 2D scatter drawn without matplotlib, and their logging during training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ganray.models.metrics2d import mixture_modes
from ganray.orchestrator.tracking.samples import SCATTER_SIZE, scatter_extent, scatter_image
from helpers import small_config
from mlflow_server import sqlite_store  # noqa: F401

WHITE = (255, 255, 255)


def _pixel(x: float, y: float, extent: tuple[float, float, float, float], size: int = SCATTER_SIZE) -> tuple[int, int]:
    x0, x1, y0, y1 = extent
    return int((y1 - y) / (y1 - y0) * size), int((x - x0) / (x1 - x0) * size)


def test_scatter_marks_the_modes_and_shades_where_samples_fall() -> None:
    modes, _ = mixture_modes("grid25")
    extent = scatter_extent(modes, "grid25")
    assert extent[0] < -4 and extent[1] > 4 and extent[2] < -4 and extent[3] > 4  # every mode inside
    samples = np.repeat(np.array([[1.0, 3.0]]), 10, axis=0)  # one spot between the modes, 10 times
    image = scatter_image(samples, "grid25")
    assert image.shape == (SCATTER_SIZE, SCATTER_SIZE, 3) and image.dtype == np.uint8
    row, col = _pixel(1.0, 3.0, extent)
    assert image[row, col].tolist() != list(WHITE) and image[row, col][2] > image[row, col][0]  # blue
    for mx, my in modes:  # a red cross centre on every mode
        r, c = _pixel(mx, my, extent)
        assert image[r, c].tolist() == [214, 39, 40], (mx, my)
    corner = image[SCATTER_SIZE // 2 + 5, 20]  # far from samples and crosses
    assert tuple(corner) == WHITE


def test_scatter_is_the_same_frame_at_every_step_and_drops_outliers() -> None:
    near = scatter_image(np.zeros((100, 2)), "ring8")
    with_outliers = scatter_image(np.concatenate([np.zeros((100, 2)), np.full((5, 2), 50.0)]), "ring8")
    assert np.array_equal(near, with_outliers)  # the frame comes from the modes, not the samples
    other = scatter_image(np.random.default_rng(0).normal(size=(500, 2)) * [3.0, 0.5] + [10.0, 2.0], "moons")
    assert other.shape == (SCATTER_SIZE, SCATTER_SIZE, 3) and (other != 255).any()


def test_training_logs_a_scatter_per_sample_interval(sqlite_store: Path) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking.store import resolve_tracking_uri
    from ganray.orchestrator.job.trainer import Trainer

    config = small_config(schedule={"total_kimg": 2, "sample_kimg": 1})
    result = Trainer(config, progress=False).run()
    client = MlflowClient(resolve_tracking_uri(None, None))
    names = [a.path for a in client.list_artifacts(result.run_id, "images")]
    # MLflow's step images: one PNG (plus its JSON and thumbnail) per logged step, at 1 and 2 kimg.
    # (named like images/samples+step+1024+timestamp+...png)
    steps = sorted(int(n.split("+step+")[1].split("+")[0]) for n in names
                   if n.endswith(".png") and n.startswith("images/samples+step+"))
    assert steps == [1024, 2048], names


def test_small_image_grids_are_scaled_up_to_be_readable() -> None:
    """An 8x8 digits grid (73 px from make_grid) reaches MIN_GRID_WIDTH by whole nearest-neighbour
    pixels; a grid already wide enough is left as it is."""
    import torch

    from ganray.orchestrator.tracking.samples import MIN_GRID_WIDTH, image_grid

    images = torch.rand((64, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = image_grid(images)
    assert grid.shape == (292, 292, 3) and grid.shape[1] >= MIN_GRID_WIDTH and grid.dtype == np.uint8
    # Every 4x4 block is one source pixel: nothing blurred.
    assert (np.repeat(np.repeat(grid[::4, ::4], 4, axis=0), 4, axis=1) == grid).all()
    assert image_grid(images, min_width=1).shape == (73, 73, 3)
    assert image_grid(torch.zeros((64, 3, 32, 32))).shape == (265, 265, 3)
