"""Data readers: `load_dataset(data_cfg, seed, split)` turns the `data` config section into a `SampleSource`.

A `SampleSource` is what every trainer reads real samples from: `get(indices)` returns a float32
tensor `(n, *sample_shape)` for the indices a `ShardSampler` hands out. Small sets (the 2D mixtures,
digits, user arrays, torchvision's in-memory sets) are held as one tensor so `get` is a single
`index_select` on the hot path; image folders decode files lazily in `get`; Parquet datasets are
read by row group (see `parquet_source.py`), torchvision's sets from a local root (see
`torchvision_source.py`). `fingerprint` is a cheap content hash used as the data hash and cache
key. Every user mistake is a one-line `ConfigError` / `DataError`. `check_data_config` resolves
the data name without reading anything (`ganray validate`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import io
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ganray.models.errors import ConfigError, DataError

SPLITS = ("train", "test")
BUILTIN_NAMES = ("ring8", "grid25", "digits", "imagefolder", "parquet", "random_images", "stacked-digits")
# Fixed, not the job seed: every job (any seed, any retrain) evaluates on the same digits split.
DIGITS_SPLIT_SEED = 1797
# The synthetic test split is at least the BENCHMARKS.md evaluation size.
MIN_MIXTURE_TEST = 2500
# torchvision's ImageFolder extensions (kept here so importing this module stays light).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SOURCE_ATTRS = ("get", "sample_shape", "kind", "fingerprint", "name", "__len__")


class SampleSource(ABC):
    """A finite, indexable set of real samples; `get` is called on every training step."""

    name: str
    kind: str  # "2d" for (2,) points, "image" otherwise
    sample_shape: tuple[int, ...]
    fingerprint: str  # hex content hash: the data hash logged with a run and the cache key
    labels: np.ndarray | None = None  # int64 class / mode index per sample, where one exists
    skipped: int = 0  # corrupt files left out at load time (data.skip_corrupt)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Samples at `indices` as float32 `(len(indices), *sample_shape)`."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"sample_shape={self.sample_shape}, kind={self.kind!r})")


def kind_for_shape(sample_shape: Sequence[int]) -> str:
    return "2d" if tuple(sample_shape) == (2,) else "image"


def content_digest(*parts: Any, arrays: Sequence[np.ndarray] = ()) -> str:
    """sha256 over JSON-encoded `parts` and the raw bytes (with dtype and shape) of `arrays`."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()


class TensorSource(SampleSource):
    """All samples in one contiguous float32 tensor: `get` is one `index_select`."""

    def __init__(self, name: str, data: torch.Tensor | np.ndarray, fingerprint: str | None = None,
                 labels: np.ndarray | None = None, kind: str | None = None) -> None:
        tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if tensor.ndim < 2:
            raise DataError(f"dataset '{name}' must have shape (N, *sample_shape) with N samples "
                            f"(got shape {tuple(tensor.shape)}); return one row per sample")
        if tensor.shape[0] == 0:
            raise DataError(f"dataset '{name}' is empty (shape {tuple(tensor.shape)}); give it at least one sample")
        if not bool(torch.isfinite(tensor).all()):
            raise DataError(f"dataset '{name}' contains NaN or infinite values; clean the data before training")
        self._data = tensor
        self.name = name
        self.sample_shape = tuple(tensor.shape[1:])
        self.kind = kind or kind_for_shape(self.sample_shape)
        self.fingerprint = fingerprint or content_digest("tensor", name, arrays=[tensor.numpy()])
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def get(self, indices: np.ndarray) -> torch.Tensor:
        return self._data.index_select(0, torch.as_tensor(np.asarray(indices), dtype=torch.long))

    @property
    def data(self) -> torch.Tensor:
        """The whole set (read-only use: evaluation on small sets, plotting)."""
        return self._data


# ---------------------------------------------------------------------------------------------
# Synthetic 2D mixtures and digits


def mixture_geometry(name: str) -> tuple[np.ndarray, float]:
    """(modes (M, 2), std) of the PacGAN/VEEGAN mixtures `ring8` and `grid25`: the geometry the
    2D metrics score against (`ganray.models.metrics2d`), so data and metrics cannot disagree."""
    from ganray.models.metrics2d import mixture_modes

    try:
        return mixture_modes(name)
    except ValueError:
        raise ConfigError(f"'{name}' is not a 2D mixture; use ring8 or grid25") from None


def _mixture_source(name: str, size: int, test_fraction: float, seed: int, split: str) -> TensorSource:
    modes, std = mixture_geometry(name)
    # Drawn once per job so that epochs and shards are meaningful; the test split is an
    # independent draw from its own stream of the same seed.
    stream = SPLITS.index(split)
    n = size if split == "train" else max(MIN_MIXTURE_TEST, int(size * test_fraction))
    rng = np.random.default_rng([int(seed), stream])
    labels = rng.integers(len(modes), size=n)
    points = modes[labels] + std * rng.standard_normal((n, 2))
    fingerprint = content_digest("mixture-v1", name, n, int(seed), stream, std)
    return TensorSource(name, points.astype(np.float32), fingerprint, labels=labels, kind="2d")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All of scikit-learn's digits: images (N, 1, 8, 8) in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()  # bundled with scikit-learn: no download
    x = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return x, bunch.target.astype(np.int64)


def digits_split_indices(test_fraction: float, split: str) -> np.ndarray:
    """Sorted indices into `digits_arrays()` of the digits' fixed, stratified `split`."""
    from sklearn.model_selection import train_test_split

    y = digits_arrays()[1]
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                           random_state=DIGITS_SPLIT_SEED, stratify=y)
    return np.sort(train_idx if split == "train" else test_idx)


def _digits_source(test_fraction: float, split: str) -> TensorSource:
    x, y = digits_arrays()
    idx = digits_split_indices(test_fraction, split)
    fingerprint = content_digest("digits", split, test_fraction, arrays=[x[idx], y[idx]])
    return TensorSource("digits", x[idx], fingerprint, labels=y[idx], kind="image")


def _random_images_source(size: int, resolution: int, channels: int | None, seed: int, split: str) -> TensorSource:
    """`size` images of uniform noise in [-1, 1], `channels` (default 3) x `resolution`^2: a data
    set that needs no download and no disk, for throughput runs (`ganray bench`) and smoke tests
    of image models. Each split is its own stream of the seed."""
    stream = SPLITS.index(split)
    gen = torch.Generator().manual_seed(int(seed) * 2 + stream)
    shape = (int(size), int(channels or 3), int(resolution), int(resolution))
    images = torch.rand(shape, generator=gen) * 2.0 - 1.0
    fingerprint = content_digest("random-images-v1", shape, int(seed), stream)
    return TensorSource("random_images", images, fingerprint, kind="image")


# ---------------------------------------------------------------------------------------------
# Image decoding shared by imagefolder, torchvision and parquet


def image_mode(channels: int | None, default: int = 3) -> str:
    """PIL mode for `data.channels` (1 -> "L", 3 -> "RGB")."""
    c = default if channels is None else int(channels)
    if c not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB) for images (got {c})")
    return "L" if c == 1 else "RGB"


def pil_to_uint8(img: Image.Image, resolution: int, mode: str) -> np.ndarray:
    """Convert to `mode`, resize the short side and center-crop to a square; (C, R, R) uint8."""
    img = img.convert(mode)
    if img.size != (resolution, resolution):
        # torchvision's Resize(R) + CenterCrop(R) in one call.
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_image(source: str | Path | bytes, resolution: int, mode: str, what: str, fix: str) -> np.ndarray:
    """Decode a file path or encoded bytes; any decode failure is a DataError naming `what`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return pil_to_uint8(img, resolution, mode)
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {what} ({type(exc).__name__}: {exc}); {fix}") from None


def uint8_to_unit(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return torch.as_tensor(batch).to(torch.float32).div_(127.5).sub_(1.0)


# (path, size, mtime_ns) -> verify() passed; a file is verified once per process, not per split.
_VERIFIED: dict[tuple[str, int, int], bool] = {}


def _verify_image(path: Path, size: int, mtime_ns: int) -> bool:
    key = (str(path), size, mtime_ns)
    if key not in _VERIFIED:
        try:
            with Image.open(path) as img:
                img.verify()  # checks structure and checksums without decoding pixels
            _VERIFIED[key] = size > 0
        except _DECODE_ERRORS:
            _VERIFIED[key] = False
    return _VERIFIED[key]


def holdout_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """Boolean test mask: the round(n * fraction) keys with the smallest sha256 are held out.

    Ranking by a hash of the key (not by position) spreads the test set over all classes and
    keeps a file's split stable when other files are added, as scheduled retraining does.
    """
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    if n >= 2:
        n_test = min(n - 1, max(1, round(n * fraction)))
        order = sorted(range(n), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
        mask[order[:n_test]] = True
    return mask


class ImageFolderSource(SampleSource):
    """torchvision ImageFolder layout (`root/<class>/**/<image>`, or images directly in root).

    Files are listed once and decoded lazily in `get`, so the set need not fit in memory.
    """

    def __init__(self, root: str, resolution: int, channels: int | None, split: str,
                 test_fraction: float, skip_corrupt: bool) -> None:
        self.root = Path(root)
        self.name = "imagefolder"
        self._resolution = int(resolution)
        self._mode = image_mode(channels)
        self.sample_shape = (len(self._mode), self._resolution, self._resolution)
        self.kind = "image"
        entries = _scan_image_folder(self.root)
        if not entries:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under data.path "
                            f"'{root}'; put images in <root>/<class>/ folders")
        if skip_corrupt:
            good = [e for e in entries if _verify_image(self.root / e[0], e[2], e[3])]
            self.skipped = len(entries) - len(good)
            entries = good
        test = holdout_mask([e[0] for e in entries], test_fraction)
        chosen = [e for e, is_test in zip(entries, test) if is_test == (split == "test")]
        self.files: list[Path] = [self.root / e[0] for e in chosen]
        self.labels = np.array([e[1] for e in chosen], dtype=np.int64)
        self.fingerprint = content_digest("imagefolder", split, test_fraction, skip_corrupt,
                                          self._resolution, self._mode, chosen)
        self._fix = ("fix or remove the file, or set data.skip_corrupt: true to skip corrupt files"
                     if not skip_corrupt else "it passed verification but does not decode; remove it")

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.sample_shape), dtype=np.uint8)
        for k, i in enumerate(idx):
            path = self.files[i]
            out[k] = decode_image(path, self._resolution, self._mode, f"'{path}'", self._fix)
        return uint8_to_unit(out)


def _scan_image_folder(root: Path) -> list[tuple[str, int, int, int]]:
    """Sorted (relative posix path, class index, size, mtime_ns) of every image under root."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    folders = [(i, root / c) for i, c in enumerate(classes)] or [(0, root)]
    entries = []
    for label, folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in filenames:
                if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = Path(dirpath) / fname
                stat = path.stat()
                entries.append((path.relative_to(root).as_posix(), label, stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


# ---------------------------------------------------------------------------------------------
# User loaders and the dispatcher


def _import_loader(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
        loader = functools.reduce(getattr, attr.split("."), module)
    except Exception as exc:  # any import-time failure of user code is a config problem
        raise ConfigError(f"data.name '{name}': cannot import the loader ({type(exc).__name__}: {exc}); "
                          "give an importable 'pkg.module:function'") from None
    if not callable(loader):
        raise ConfigError(f"data.name '{name}' is not callable; point it at a function "
                          "loader(data_cfg, seed, split)")
    return loader


def _from_loader(name: str, cfg: dict, seed: int, split: str) -> SampleSource:
    result = _import_loader(name)(dict(cfg), seed, split)
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return TensorSource(name, result)
    missing = [a for a in _SOURCE_ATTRS if not hasattr(result, a)]
    if missing:
        raise DataError(f"loader '{name}' returned a {type(result).__name__}, expected a SampleSource, "
                        f"torch.Tensor or numpy array (missing {', '.join(missing)})")
    return result


def _require_path(cfg: dict, name: str) -> str:
    path = cfg.get("path")
    if not path:
        raise ConfigError(f"data.path is required for data.name '{name}'; set it to the dataset root")
    return str(path)


def _require_local(path: str, name: str) -> str:
    if not Path(path).exists():
        raise DataError(f"data.path '{path}' for data.name '{name}' does not exist; fix the path")
    return path


def _require_resolution(cfg: dict, name: str) -> int:
    resolution = cfg.get("resolution")
    if not resolution:
        raise ConfigError(f"data.resolution is required for data.name '{name}'; set one of 8, 16, 32, 64")
    return int(resolution)


def load_dataset(data_cfg: dict, seed: int, split: str = "train") -> SampleSource:
    """The `split` ("train" or "test") of the dataset that `data_cfg` (DataConfig dump) names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    cfg = dict(data_cfg)
    name = str(cfg.get("name") or "grid25")
    test_fraction = float(cfg.get("test_fraction", 0.2))
    if name in ("ring8", "grid25"):
        source: SampleSource = _mixture_source(name, int(cfg.get("size", 100_000)), test_fraction, seed, split)
    elif name == "digits":
        source = _digits_source(test_fraction, split)
    elif name == "stacked-digits":
        from ganray.workers.stacked_digits import stacked_digits_source  # builds on this module

        source = stacked_digits_source(int(cfg.get("size", 100_000)), test_fraction, seed, split)
    elif name == "random_images":
        source = _random_images_source(int(cfg.get("size", 100_000)), _require_resolution(cfg, name),
                                       cfg.get("channels"), seed, split)
    elif name == "imagefolder":
        root = _require_local(_require_path(cfg, name), name)
        source = ImageFolderSource(root, _require_resolution(cfg, name), cfg.get("channels"), split,
                                   test_fraction, bool(cfg.get("skip_corrupt", False)))
    elif name == "parquet":
        from ganray.workers.parquet_source import ParquetSource  # imports pyarrow only when used

        source = ParquetSource(_require_path(cfg, name), cfg.get("column"), cfg.get("resolution"),
                               cfg.get("channels"), split, test_fraction, label_column=cfg.get("label_column"))
    elif name.startswith("torchvision:"):
        from ganray.workers.torchvision_source import TorchvisionSource  # imports torchvision only when used

        dataset = _torchvision_dataset(name)
        source = TorchvisionSource(dataset, _require_path(cfg, name), cfg.get("resolution"),
                                   cfg.get("channels"), split)
    elif ":" in name:
        source = _from_loader(name, cfg, seed, split)
    else:
        raise _unknown_name(name)
    if len(source) == 0:
        raise DataError(f"dataset '{name}' ({split} split) is empty; check data.path and data.test_fraction")
    return source


def _torchvision_dataset(name: str) -> str:
    """The dataset class name of `data.name: torchvision:<Name>`."""
    dataset = name.partition(":")[2]
    if not dataset:
        raise ConfigError("data.name 'torchvision:' names no dataset; use e.g. torchvision:MNIST")
    return dataset


def _unknown_name(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, BUILTIN_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"data.name '{name}' is not a dataset{hint}; use one of {', '.join(BUILTIN_NAMES)}, "
                       "torchvision:<Name> or an import path 'pkg.module:loader'")


def check_data_config(data_cfg: dict) -> None:
    """What `load_dataset` resolves before it reads anything, checked without reading the data:
    the name (a built-in, torchvision:<Name>, an importable loader), a required local path, a
    required resolution. `ganray validate` runs it; it mirrors the dispatch of `load_dataset`."""
    cfg = dict(data_cfg)
    name = str(cfg.get("name") or "grid25")
    if name in ("imagefolder", "random_images"):
        _require_resolution(cfg, name)
    if name in ("imagefolder", "parquet"):
        path = _require_path(cfg, name)
        if "://" not in path:  # parquet also reads URIs (s3://, gs://): only a local path is checked here
            _require_local(path, name)
        elif name == "parquet":  # workers open the URI with their own credentials; here only its form
            from ganray.workers.uri_secrets import refuse_uri_credentials

            refuse_uri_credentials(path)
    elif name.startswith("torchvision:"):
        dataset = _torchvision_dataset(name)
        from ganray.workers.torchvision_source import torchvision_class, torchvision_missing

        torchvision_class(dataset)
        root = _require_path(cfg, name)
        if not Path(root).exists():
            raise DataError(torchvision_missing(dataset, root))
    elif ":" in name:
        _import_loader(name)
    elif name not in BUILTIN_NAMES:
        raise _unknown_name(name)
