"""Scores that judge samples by class, beside FID/KID, with an independent classifier (a
logistic regression on the digits' train split; no part of training or FID):

- any generator on `digits`: the classifier's confidence, the smallest class share and the share
  of near-copies of training images (`ganray.models.digits_fidelity`);
- a class-conditional generator (`model.conditional`): the accuracy of the class asked for (on
  digits) and per-class KID (`ganray.models.conditional_metrics`). The classes are asked for in
  turn (sample i of class i mod num_classes, as `sample_generator` draws them), so every class is
  judged on as many samples.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ganray.models.conditional_metrics import IndependentDigitsClassifier, class_accuracy, per_class_kid
from ganray.workers.data import load_dataset

MIN_PER_CLASS = 200  # samples of each class the independent classifier labels


class ClassScores:
    """Per-job state: the independent classifier and the digits' train split, loaded once."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._classifier: Optional[IndependentDigitsClassifier] = None
        self.real_accuracy: Optional[float] = None
        self.real_confidence: Optional[float] = None
        self._train_images: Optional[torch.Tensor] = None

    def classifier(self) -> IndependentDigitsClassifier:
        """Fitted on the digits' train split; its accuracy on the test split is the real-data ceiling."""
        if self._classifier is None:
            digits = {"name": "digits", "test_fraction": self.config.data.test_fraction}
            train = load_dataset(digits, self.config.seed, "train")
            test = load_dataset(digits, self.config.seed, "test")
            self._train_images = train.get(np.arange(len(train)))
            self._classifier = IndependentDigitsClassifier(self._train_images, train.labels)
            probabilities = self._classifier.probabilities(test.get(np.arange(len(test))))
            self.real_accuracy = float((probabilities.argmax(axis=1) == test.labels).mean())
            self.real_confidence = float(probabilities.max(axis=1).mean())
        return self._classifier

    def digit_fidelity(self, G: nn.Module, num_samples: int, seed: int) -> dict[str, float]:
        """`confidence`, `class_share_min` and `near_copies` of `num_samples` new samples (at least
        MIN_PER_CLASS per digit, so a share is not read off a handful), and `confidence_real`."""
        from ganray.models.digits_fidelity import fidelity_scores
        from ganray.orchestrator.job.evaluate import sample_generator

        clf = self.classifier()
        samples = sample_generator(G, max(num_samples, MIN_PER_CLASS * 10), seed + 2)
        assert self._train_images is not None and self.real_confidence is not None
        return {**fidelity_scores(clf.probabilities(samples), samples, self._train_images),
                "confidence_real": self.real_confidence}

    def scores(self, G: nn.Module, real: torch.Tensor, real_labels: Optional[np.ndarray], fake: torch.Tensor,
               feature_net: nn.Module, sample_shape: tuple[int, ...], num_samples: int, seed: int) -> dict[str, float]:
        """Per-class KID of `fake` (drawn with classes in turn) against `real` by label, and on
        digits the independent classifier's accuracy over at least `num_samples` new samples (and
        MIN_PER_CLASS of each class)."""
        from ganray.models import fid
        from ganray.orchestrator.job.evaluate import generator_classes, sample_generator

        classes = generator_classes(G)
        out: dict[str, float] = {}
        if real_labels is not None:
            extractor = fid.FeatureExtractor(feature_net, sample_shape)
            out.update(per_class_kid(fid.extract_features(extractor, real), np.asarray(real_labels)[:len(real)],
                                     fid.extract_features(extractor, fake), np.arange(len(fake)) % classes,
                                     classes, seed))
        if self.config.data.name == "digits":
            clf = self.classifier()
            # Every class equally often, at least MIN_PER_CLASS each: a share per class is coarse on fewer.
            n = -(-max(num_samples, len(real), MIN_PER_CLASS * classes) // classes) * classes
            samples = sample_generator(G, n, seed + 1)
            out.update(class_accuracy(clf.predict(samples), np.arange(n) % classes, classes))
            assert self.real_accuracy is not None
            out["class_acc_real"] = self.real_accuracy
        return out
