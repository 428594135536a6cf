"""`data.name: stacked-digits`: three independent scikit-learn digits as the three channels of one
8x8 image, the 1,000-mode Stacked MNIST protocol (Metz et al.; VEEGAN; PacGAN) on the bundled digits.

Each split draws its channels only from the same split of the digits (`digits_split_indices`), so
the test split holds digits the model never saw. A split is a fixed set of `data.size` triples:
the train split drawn from the job seed (like the 2D mixtures), the test split from a fixed seed,
so every job and every retrain is scored against the same held-out images. The label of a sample
is its triple as one int `100*a + 10*b + c` (0..999), what the `modes` / `kl` metrics count
(`ganray.models.stacked_metrics`).
"""

from __future__ import annotations

import numpy as np

from ganray.workers.data import SPLITS, TensorSource, content_digest, digits_arrays, digits_split_indices

NAME = "stacked-digits"
CHANNELS = 3
# Fixed, not the job seed: the held-out triples are the same for every job, seed and retrain.
STACKED_TEST_SEED = 1000


class StackedDigitsSource(TensorSource):
    """A `TensorSource` that also keeps, per sample, the indices of its three digits in
    scikit-learn's full digits array (`digit_indices`, (n, 3)): what makes the train/test
    disjointness checkable."""

    digit_indices: np.ndarray


def stacked_digits_source(size: int, test_fraction: float, seed: int, split: str) -> StackedDigitsSource:
    x, y = digits_arrays()
    pool = digits_split_indices(test_fraction, split)
    stream = SPLITS.index(split)
    draw_seed = int(seed) if split == "train" else STACKED_TEST_SEED
    rng = np.random.default_rng([draw_seed, stream])
    # Three independent draws per sample (with replacement): every triple of classes is possible
    # and, with stratified splits, each of the 1,000 is close to equally likely.
    digit_indices = pool[rng.integers(len(pool), size=(int(size), CHANNELS))]
    images = x[digit_indices].reshape(int(size), CHANNELS, 8, 8)
    digit_labels = y[digit_indices]
    labels = digit_labels[:, 0] * 100 + digit_labels[:, 1] * 10 + digit_labels[:, 2]
    fingerprint = content_digest("stacked-digits-v1", split, int(size), test_fraction, draw_seed, stream,
                                 arrays=[digit_indices])
    source = StackedDigitsSource(NAME, images, fingerprint, labels=labels, kind="image")
    source.digit_indices = digit_indices
    return source
