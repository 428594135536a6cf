"""Do generated digits look like digits, and are they new? Scores by a classifier that played no
part in training or FID (`conditional_metrics.IndependentDigitsClassifier`, fitted on the digits'
train split) and by distance to the training images:

- `confidence`: the classifier's mean top-class probability over the samples (real held-out
  digits give the ceiling, `confidence_real`);
- `class_share_min`: the smallest share of samples the classifier puts in any one class (each of
  the 10 digits should get a fair share: 10% each when uniform);
- `near_copies`: the share of samples within L2 distance `COPY_RADIUS` of some training image, on
  the [-1, 1] scale over all pixels (a memorising generator scores high).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

COPY_RADIUS = 0.5


def fidelity_scores(probabilities: np.ndarray, samples: Tensor, train_images: Tensor,
                    copy_radius: float = COPY_RADIUS) -> dict[str, float]:
    """`confidence`, `class_share_min` and `near_copies` of `samples` (N, C, H, W) given the
    classifier's class probabilities for them (N, classes)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    shares = np.bincount(predicted, minlength=probabilities.shape[1]) / max(1, len(predicted))
    flat = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)
    train = train_images.detach().to("cpu", torch.float64).reshape(train_images.shape[0], -1)
    nearest = torch.cat([torch.cdist(part, train).min(dim=1).values for part in flat.split(1024)])
    return {"confidence": float(probabilities.max(axis=1).mean()), "class_share_min": float(shares.min()),
            "near_copies": float((nearest < copy_radius).double().mean())}
