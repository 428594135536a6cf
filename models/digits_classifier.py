"""The digits feature classifier: a small CNN trained on scikit-learn's 8x8 digits, the feature
network of FID/KID on digits (BENCHMARKS.md: the features of a classifier that reaches >= 95%
test accuracy), cached on disk by the data's content hash so every evaluation reuses one network.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Bump when DigitsFeatureNet or its training recipe changes: cached classifiers (and the real
# features computed with them, whose key hashes the weights) then stop matching.
DIGITS_CLASSIFIER_VERSION = 1
_SAFE_KEY = re.compile(r"[0-9A-Za-z_.-]{1,128}")


class DigitsFeatureNet(nn.Module):
    """A small CNN for (1, 8, 8) digits in [-1, 1]: `forward` gives 10 class logits,
    `features` the 64-d penultimate layer used for FID/KID."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Flatten(),
        )
        self.embed = nn.Linear(32 * 4 * 4, self.feature_dim)
        # Standardises the embedding with the training data's statistics (frozen in eval), so
        # features are O(1) per dimension like Inception's: KID's cubic kernel
        # (x.y / F + 1)^3 assumes that scale and explodes on raw pre-activations.
        self.norm = nn.BatchNorm1d(self.feature_dim, affine=False)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        # Taken before the ReLU: no dead, constant dimensions, so the feature covariances FID
        # takes a matrix square root of stay well conditioned even for a few hundred samples.
        return self.norm(self.embed(self.trunk(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))


def _as_tensor(x: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    return x.detach().to("cpu", dtype) if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


@torch.no_grad()
def classifier_accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of `x` (N, 1, 8, 8) that `net` labels as `y` (N,)."""
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = net(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    net.train(was_training)
    return correct / max(int(x.shape[0]), 1)


def train_digits_classifier(
    x_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    x_test: Tensor | np.ndarray,
    y_test: Tensor | np.ndarray,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> tuple[DigitsFeatureNet, float]:
    """Train `DigitsFeatureNet` on CPU, deterministically for a given seed (a few seconds).

    Images are (N, 1, 8, 8) in [-1, 1], labels 0..9. Returns the net in eval mode and its
    accuracy on the test split.
    """
    xtr, ytr = _as_tensor(x_train, torch.float32), _as_tensor(y_train, torch.long)
    xte, yte = _as_tensor(x_test, torch.float32), _as_tensor(y_test, torch.long)
    if xtr.shape[1:] != (1, 8, 8) or xte.shape[1:] != (1, 8, 8):
        raise ValueError(f"digits images must be (N, 1, 8, 8), got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    # Seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
    shuffle = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    n = xtr.shape[0]
    # One intra-op thread: for a net this small, threads cost more than they save (and thrash
    # on a busy machine), and the weights then do not depend on the machine's thread count,
    # so one data hash names one classifier everywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=shuffle)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                if idx.numel() < 2:  # BatchNorm cannot train on a single sample
                    continue
                loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return net, classifier_accuracy(net, xte, yte)


def check_cache_key(data_hash: str) -> str:
    # The hash becomes part of a file name: refuse anything that could escape the cache dir.
    if not _SAFE_KEY.fullmatch(data_hash):
        raise ValueError(f"data_hash must be 1-128 characters of [0-9A-Za-z_.-], got {data_hash!r}")
    return data_hash


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a concurrent reader (another Tune trial)
    never sees a half-written cache entry."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def load_or_train_digits_classifier(
    cache_dir: Path,
    x_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    x_test: Tensor | np.ndarray,
    y_test: Tensor | np.ndarray,
    data_hash: str,
) -> tuple[DigitsFeatureNet, float]:
    """The digits classifier for the data identified by `data_hash`, trained at most once.

    Stored as `<stem>.pt` (a state dict: tensors only, loaded with `weights_only=True`) and
    `<stem>.json` (accuracy), the JSON written last so its presence marks a complete entry.
    A missing, corrupt or mismatched entry is rebuilt: the cache only ever holds derived data.
    """
    cache_dir = Path(cache_dir)
    stem = f"digits_classifier_v{DIGITS_CLASSIFIER_VERSION}_{check_cache_key(data_hash)}"
    weights_path, meta_path = cache_dir / f"{stem}.pt", cache_dir / f"{stem}.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("data_hash") != data_hash:
            raise ValueError("cache entry belongs to other data")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # An evaluation must not shift the trainer's RNG stream (resume reproducibility):
        # the throwaway initialisation draws from a forked generator.
        with torch.random.fork_rng(devices=[]):
            net = DigitsFeatureNet()
        net.load_state_dict(state)
        return net.eval(), float(meta["accuracy"])
    except Exception:  # any unreadable entry (missing, truncated, foreign) means: rebuild it
        pass

    net, accuracy = train_digits_classifier(x_train, y_train, x_test, y_test)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    atomic_write(weights_path, lambda p: torch.save(state, p))
    meta = {"data_hash": data_hash, "accuracy": accuracy, "version": DIGITS_CLASSIFIER_VERSION}
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta)))
    return net, accuracy
