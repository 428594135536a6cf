"""Mode coverage on stacked digits (the Stacked MNIST protocol of Metz et al., VEEGAN, PacGAN).

Each of a sample's three channels is labelled by the digits classifier; the triple `100*a + 10*b + c`
is the sample's mode (0..999). `modes` counts the distinct triples among the samples; `kl` is
KL(p_gen || uniform over 1000) = sum over non-empty bins of p log(p * 1000): empty bins contribute
0 (the 0 log 0 = 0 convention), as the Stacked MNIST papers compute it, so a generator covering one
mode scores log(1000) and a uniform one 0. `confidence` is the classifier's mean top-class
probability over all channels of all samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

NUM_MODES = 1000
STACKED_METRICS = ("modes", "kl", "confidence")


def triple_labels(channel_labels: np.ndarray) -> np.ndarray:
    """(n, 3) digit labels -> (n,) modes `100*a + 10*b + c`."""
    c = np.asarray(channel_labels, dtype=np.int64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"channel labels must be (n, 3), got {c.shape}")
    return c[:, 0] * 100 + c[:, 1] * 10 + c[:, 2]


def mode_scores(triples: np.ndarray, num_modes: int = NUM_MODES) -> dict[str, float]:
    """`modes` (distinct triples) and `kl` (KL of their histogram against uniform, see the module)."""
    t = np.asarray(triples, dtype=np.int64).reshape(-1)
    if t.size == 0:
        raise ValueError("mode_scores needs at least one sample")
    if t.min() < 0 or t.max() >= num_modes:
        raise ValueError(f"triples must lie in 0..{num_modes - 1}")
    counts = np.bincount(t, minlength=num_modes)
    p = counts[counts > 0] / t.size
    return {"modes": float(len(p)), "kl": float(np.sum(p * np.log(p * num_modes)))}


@torch.no_grad()
def classify_channels(net: nn.Module, images: Tensor, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel digit labels (n, 3) and top-class probabilities (n, 3) of images (n, 3, 8, 8)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"stacked digits must be (n, 3, 8, 8), got {tuple(images.shape)}")
    n = images.shape[0]
    flat = images.detach().to("cpu", torch.float32).reshape(n * 3, 1, *images.shape[2:])
    was_training = net.training
    net.eval()
    labels, probs = [], []
    for start in range(0, flat.shape[0], batch_size):
        p = torch.softmax(net(flat[start : start + batch_size]), dim=1)
        top, arg = p.max(dim=1)
        labels.append(arg)
        probs.append(top)
    net.train(was_training)
    return torch.cat(labels).reshape(n, 3).numpy(), torch.cat(probs).reshape(n, 3).numpy()


def stacked_scores(net: nn.Module, images: Tensor) -> dict[str, float]:
    """`modes`, `kl` and `confidence` of stacked-digit images under the digits classifier `net`."""
    labels, top = classify_channels(net, images)
    scores = mode_scores(triple_labels(labels))
    scores["confidence"] = float(top.mean())
    return scores
