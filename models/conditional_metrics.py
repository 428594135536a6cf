"""Scores of a class-conditional generator: does a sample show the class it was asked for?

- `IndependentDigitsClassifier`: a scikit-learn logistic regression on the digits' raw pixels,
  fitted on the digits' train split. It plays no part in training (D never sees it) nor in FID/KID
  (whose features come from the CNN of `digits_classifier.py`), so a generator cannot have been
  tuned against it. `class_accuracy` is the share of samples it labels as the class asked for,
  overall and per class (`class_acc/<k>`), with the worst class as `class_acc_min` (the goal is
  every class).
- `per_class_kid`: KID between the real test images of class k and the samples asked for class k,
  on the FID feature network's features. FID per class is singular at the digits' size (about 36
  test images a class on 64 features); KID is unbiased at any size, with a subset size that fits
  the smallest class.
"""

from __future__ import annotations

import warnings
import numpy as np
import torch
from torch import Tensor

# Subsets KID averages over; each draws min(subset size, class size) rows of either side.
KID_SUBSETS = 50


class IndependentDigitsClassifier:
    """Logistic regression on flattened 8x8 digits in [-1, 1] (scikit-learn, lbfgs)."""

    def __init__(self, images: Tensor, labels: Tensor | np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(max_iter=5000)
        self.model.fit(_flat(images), np.asarray(labels, dtype=np.int64))

    def predict(self, images: Tensor) -> np.ndarray:
        return self.model.predict(_flat(images)).astype(np.int64)

    def probabilities(self, images: Tensor) -> np.ndarray:
        """(N, classes) class probabilities."""
        return self.model.predict_proba(_flat(images))


def _flat(images: Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float64).reshape(images.shape[0], -1).numpy()


def class_accuracy(predicted: np.ndarray, asked: np.ndarray, num_classes: int) -> dict[str, float]:
    """`class_acc` (all samples), `class_acc_min` (the worst class) and `class_acc/<k>`."""
    predicted, asked = np.asarray(predicted), np.asarray(asked)
    hits = predicted == asked
    out: dict[str, float] = {"class_acc": float(hits.mean())}
    per_class = []
    for k in range(num_classes):
        mine = asked == k
        if mine.any():
            out[f"class_acc/{k}"] = float(hits[mine].mean())
            per_class.append(out[f"class_acc/{k}"])
    out["class_acc_min"] = float(min(per_class))
    return out


def per_class_kid(real_features: Tensor, real_labels: np.ndarray, fake_features: Tensor, fake_classes: np.ndarray,
                  num_classes: int, seed: int = 0) -> dict[str, float]:
    """`kid_class/<k>` for every class with at least 2 real and 2 generated samples, and their
    mean `kid_class_mean`; torchmetrics' KID in float64 on precomputed features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    from ganray.models.fid import _Precomputed

    out: dict[str, float] = {}
    real_labels, fake_classes = np.asarray(real_labels), np.asarray(fake_classes)
    identity = _Precomputed(int(real_features.shape[1]))
    for k in range(num_classes):
        real_k = real_features[torch.from_numpy(real_labels == k)].double()
        fake_k = fake_features[torch.from_numpy(fake_classes == k)].double()
        n = min(real_k.shape[0], fake_k.shape[0])
        if n < 2:
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(feature=identity, subsets=KID_SUBSETS, subset_size=n, normalize=True)
        kid.update(real_k, real=True)
        kid.update(fake_k, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            mean, _ = kid.compute()
        out[f"kid_class/{k}"] = float(mean)
    if out:
        out["kid_class_mean"] = float(np.mean(list(out.values())))
    return out

