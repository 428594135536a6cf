"""torchvision datasets read from a local root (`data.name: torchvision:<Name>`), never downloaded.

Split out of data.py so that torchvision is imported only by jobs that name one of its sets.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ganray.models.errors import ConfigError, DataError
from ganray.workers.data import SampleSource, content_digest, image_mode, pil_to_uint8, uint8_to_unit


class TorchvisionSource(SampleSource):
    """`torchvision.datasets.<Name>` read from a local root with download=False.

    Sets torchvision keeps in memory (MNIST family, CIFAR, SVHN, ...: a `.data` array) are
    converted once into a uint8 tensor; file-backed ones are decoded lazily in `get`.
    """

    def __init__(self, dataset: str, root: str, resolution: int | None, channels: int | None,
                 split: str) -> None:
        self.name = f"torchvision:{dataset}"
        cls = torchvision_class(dataset)
        params = inspect.signature(cls).parameters
        kwargs: dict[str, Any] = {"root": root}
        if "download" in params:
            kwargs["download"] = False
        if "train" in params:
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        else:
            raise ConfigError(f"data.name '{self.name}' has no train/test split argument; "
                              "use data.name: imagefolder on its files instead")
        missing = torchvision_missing(dataset, root, f" ({split} split)")
        if not Path(root).exists():
            raise DataError(missing)
        try:
            self._dataset = cls(**kwargs)
        except (RuntimeError, OSError, ValueError) as exc:
            raise DataError(f"{missing} ({exc})") from None
        if len(self._dataset) == 0:
            raise DataError(f"{self.name} at '{root}' ({split} split) is empty; check data.path")
        first = self._image(0)
        native_channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
        self._mode = image_mode(channels, default=native_channels)
        self._resolution = int(resolution) if resolution else min(first.size)
        self.sample_shape = (len(self._mode), self._resolution, self._resolution)
        self.kind = "image"
        targets = getattr(self._dataset, "targets", getattr(self._dataset, "labels", None))
        self.labels = None if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)
        self._memory: torch.Tensor | None = None
        if isinstance(getattr(self._dataset, "data", None), (np.ndarray, torch.Tensor)):
            self._memory = torch.from_numpy(self._decode(np.arange(len(self._dataset))))
        self.fingerprint = content_digest("torchvision", dataset, split, self._resolution, self._mode,
                                          len(self._dataset), _tree_stats(Path(root)))

    def _image(self, i: int) -> Image.Image:
        item = self._dataset[int(i)]
        img = item[0] if isinstance(item, tuple) else item
        if not isinstance(img, Image.Image):
            raise DataError(f"{self.name} item {i} is a {type(img).__name__}, not a PIL image; "
                            "use an import-path loader for non-image datasets")
        return img

    def _decode(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.sample_shape), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = pil_to_uint8(self._image(i), self._resolution, self._mode)
        return out

    def __len__(self) -> int:
        return len(self._dataset)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._memory is not None:
            return uint8_to_unit(self._memory.index_select(0, torch.from_numpy(idx)))
        return uint8_to_unit(self._decode(idx))


def torchvision_class(dataset: str) -> type:
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
        raise ConfigError(f"data.name 'torchvision:{dataset}': torchvision.datasets has no dataset "
                          f"'{dataset}'; use a class name such as MNIST or CIFAR10")
    return cls


def torchvision_missing(dataset: str, root: str, which: str = "") -> str:
    return (f"torchvision dataset {dataset}{which} is not at data.path '{root}'; download it there beforehand "
            f"(torchvision.datasets.{dataset}(root, download=True)), ganray never downloads at run time")


def _tree_stats(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under root: a cheap change detector."""
    stats = []
    for dirpath, _, filenames in os.walk(root):
        for fname in filenames:
            stat = (Path(dirpath) / fname).stat()
            stats.append((str(Path(dirpath, fname).relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return sorted(stats)
