"""`compare.png`: every learner's samples side by side, drawn with matplotlib after training.

2D data: one panel per learner, the held-out targets in green and the learner's samples in
blue over them (the classic picture of a VAE smearing probability between scattered targets).
Images: one grid of samples per learner, with the held-out images as the first panel.
The frame is the same in every panel, so the panels compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ganray.orchestrator.tracking.samples import image_grid, scatter_extent

TARGET_COLOUR = "tab:green"
SAMPLE_COLOUR = "tab:blue"


def compare_figure(targets: torch.Tensor, samples: dict[str, torch.Tensor], data_name: str,
                   titles: dict[str, str], out: Path) -> None:
    """Write the figure to `out` (atomically: never a half-written file under that name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    two_d = targets.dim() == 2
    panels = len(names) + (0 if two_d else 1)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.6), dpi=110, squeeze=False)
    axes = axes[0]
    if two_d:
        t = targets.numpy()
        x0, x1, y0, y1 = scatter_extent(t, data_name)
        for ax, name in zip(axes, names):
            s = samples[name].numpy()
            ax.scatter(s[:, 0], s[:, 1], s=3, c=SAMPLE_COLOUR, alpha=0.35, label=f"{name} samples")
            ax.scatter(t[:, 0], t[:, 1], s=4, c=TARGET_COLOUR, alpha=0.5, label="held-out data")
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_aspect("equal")
            ax.set_title(titles.get(name, name), fontsize=8)
            ax.legend(loc="upper right", fontsize=6, markerscale=3)
    else:
        grids = [("held-out data", targets)] + [(titles.get(n, n), samples[n]) for n in names]
        for ax, (title, images) in zip(axes, grids):
            grid = image_grid(images[:64])
            ax.imshow(grid if grid.shape[2] == 3 else grid[..., 0], interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def panel_title(name: str, metrics: dict[str, float]) -> str:
    """`name` and its headline figures, for the panel's title."""
    shown = [f"{k} {v:.3g}" for k, v in metrics.items() if k in ("modes", "hq", "kl", "fid", "classes")
             and np.isfinite(v)]
    return name + ("\n" + ", ".join(shown) if shown else "")
