"""Classes for a conditional GAN (`model.conditional`): the real rows' labels, checked once
against the model, and D with its classes bound for the loss terms that call it with x alone.

The labels come from the data (`SampleSource.labels`: digits, the 2D mixtures' modes, image
folders' class sub-folders, a Parquet `data.label_column`, torchvision's targets) and travel with
their rows through sharding (`RealBatches.next_labelled`). The fakes' classes are drawn from the
per-round noise streams like z (`NoiseStreams.labels`), so every topology draws the same ones.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ganray.models.errors import ConfigError, DataError
from ganray.models.registry import num_classes_of


def class_labels(config: dict[str, Any], source: Any) -> Optional[np.ndarray]:
    """The source's labels when the model is conditional (None otherwise), checked to lie in
    0..model.num_classes-1; a one-line error for data without labels."""
    classes = num_classes_of(config["model"])
    if not classes:
        return None
    name = str(config["data"].get("name"))
    labels = getattr(source, "labels", None)
    if labels is None:
        hint = " (set data.label_column)" if name == "parquet" else ""
        raise ConfigError(f"model.conditional: true needs labelled data, but data '{name}' has no labels{hint}; "
                          "use digits, imagefolder with class sub-folders, parquet with data.label_column or "
                          "torchvision:<Name>, or set model.conditional: false")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(source):
        raise DataError(f"data '{name}' has {len(labels)} labels for {len(source)} samples; give one label per sample")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"data '{name}' has labels {int(labels.min())}..{int(labels.max())} but model.num_classes "
                        f"is {classes}; set model.num_classes to {int(labels.max()) + 1} or fix the labels")
    return labels


def conditioned(D: nn.Module, y: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """D with classes `y` bound (D itself when unconditional), for terms that call D(x): R1, R2, GP."""
    if y is None:
        return D
    return lambda x: D(x, y)

