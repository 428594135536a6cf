"""Evaluation of a generator in the driver: the 2D mixture protocol or FID/KID for images.

The evaluator is built once per job (the feature network and the real statistics are cached by
data hash), and `evaluate(G_ema)` returns `{name: value}` that the caller logs as `eval/<name>`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ganray.models.latent import draw_latent, latent_of
from ganray.models.metrics2d import evaluate_2d, mixture_modes
from ganray.models.stacked_metrics import STACKED_METRICS, stacked_scores
from ganray.workers.data import load_dataset

log = logging.getLogger("ganray")

MIXTURES = ("ring8", "grid25")
STACKED = "stacked-digits"


def cache_dir() -> Path:
    """Where derived artefacts (feature classifiers, real statistics) are cached."""
    import os

    root = Path(os.environ.get("GANRAY_CACHE", Path.home() / ".cache" / "ganray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def generator_classes(G: nn.Module) -> int:
    """The classes of a conditional generator (`model.conditional`); 0 for an unconditional one
    (and for sampling modules without classes: decoders, the energy search)."""
    return int(getattr(G, "num_classes", 0) or 0)


@torch.no_grad()
def sample_generator(G: nn.Module, n: int, seed: int, batch: int = 1024,
                     classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n samples from G with a fixed latent stream (seeded), on G's device, returned on CPU.

    A conditional G (`num_classes` > 0) draws row i of class `classes[i]`, by default i mod
    num_classes: every class equally often, so evaluation, retrain and Tune judge all of them."""
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    num_classes = generator_classes(G)
    if num_classes and classes is None:
        classes = torch.arange(n) % num_classes
    was_training = G.training
    G.eval()
    out = []
    for start in range(0, n, batch):
        z = draw_latent(latent_of(G), (min(batch, n - start), int(G.z_dim)), generator=gen).to(device)
        if classes is None:
            out.append(G(z).float().cpu())
        else:
            out.append(G(z, classes[start:start + z.shape[0]].to(device)).float().cpu())
    G.train(was_training)
    return torch.cat(out)


def default_metrics(data_name: str, kind: str) -> list[str]:
    if kind == "2d":
        return ["modes", "hq", "kl"] if data_name in MIXTURES else []
    if data_name == STACKED:
        return list(STACKED_METRICS)
    return ["fid", "kid"]


class Evaluator:
    """Scores samples of a generator against the held-out split of the job's data."""

    def __init__(self, config: Any, test_source: Any = None) -> None:
        self.config = config
        data_cfg = config.data.model_dump()
        self.source = test_source if test_source is not None else load_dataset(data_cfg, config.seed, "test")
        self.kind = self.source.kind
        wanted = [m for m in config.eval.metrics if m != "auto"]
        self.metrics = wanted or default_metrics(config.data.name, self.kind)
        self.num_samples = config.eval.num_samples
        self.seed = config.eval.seed
        self._feature_net: Optional[nn.Module] = None
        self.floor: dict[str, float] = {}
        self.classifier_accuracy: Optional[float] = None
        self._real: Optional[torch.Tensor] = None
        self._by_class: Optional[Any] = None  # ClassScores, made for digits and conditional generators

    # -- images ------------------------------------------------------------------------------
    def _digits_classifier(self) -> nn.Module:
        """The digits classifier (trained on the digits' train split, cached by its hash): the
        channel labeller of stacked digits, shared with the FID features of `digits` jobs."""
        from ganray.models.digits_classifier import load_or_train_digits_classifier

        digits_cfg = {"name": "digits", "test_fraction": self.config.data.test_fraction}
        train_src = load_dataset(digits_cfg, self.config.seed, "train")
        test_src = load_dataset(digits_cfg, self.config.seed, "test")
        net, acc = load_or_train_digits_classifier(
            cache_dir(), train_src.get(np.arange(len(train_src))), torch.as_tensor(train_src.labels),
            test_src.get(np.arange(len(test_src))), torch.as_tensor(test_src.labels), train_src.fingerprint)
        self.classifier_accuracy = float(acc)
        return net

    def _evaluate_stacked(self, G: nn.Module) -> dict[str, float]:
        if self._feature_net is None:
            self._feature_net = self._digits_classifier()
        scores = stacked_scores(self._feature_net, sample_generator(G, self.num_samples, self.seed))
        return {k: float(scores[k]) for k in self.metrics if k in scores}

    def _prepare_images(self) -> None:
        if self._feature_net is not None:
            return
        from ganray.models import fid
        from ganray.models.digits_classifier import load_or_train_digits_classifier

        cfg = self.config
        if cfg.data.name == "digits":
            train_src = load_dataset(cfg.data.model_dump(), cfg.seed, "train")
            x_tr = train_src.get(np.arange(len(train_src)))
            x_te = self.source.get(np.arange(len(self.source)))
            net, acc = load_or_train_digits_classifier(
                cache_dir(), x_tr, torch.as_tensor(train_src.labels), x_te,
                torch.as_tensor(self.source.labels), train_src.fingerprint)
            self.classifier_accuracy = float(acc)
            self._feature_net = net
            self._real = x_te
            # The real-vs-real floor: train split against test split, same features and sizes.
            n = min(len(x_tr), len(x_te))
            self.floor = fid.image_scores(x_te[:n], x_tr[:n], net, tuple(self.source.sample_shape),
                                          kid_subset_size=min(100, n))
        elif cfg.eval.inception_weights:
            self._feature_net = fid.inception_feature_net(cfg.eval.inception_weights)
            n = min(len(self.source), self.num_samples)
            self._real = self.source.get(np.arange(n))
        else:
            log.warning("no feature network for FID on '%s': set eval.inception_weights to a local "
                        "Inception weights file; image metrics are skipped", cfg.data.name)
            self.metrics = []

    def evaluate(self, G: nn.Module) -> dict[str, float]:
        if not self.metrics:
            return {}
        if self.kind == "2d":
            modes, std = mixture_modes(self.config.data.name)
            samples = sample_generator(G, self.num_samples, self.seed)
            scores = evaluate_2d(samples.numpy(), modes, std)
            return {k: float(scores[k]) for k in self.metrics if k in scores}
        if self.config.data.name == STACKED:
            return self._evaluate_stacked(G)
        self._prepare_images()
        if not self.metrics:
            return {}
        from ganray.models import fid

        assert self._real is not None and self._feature_net is not None
        real = self._real
        fake = sample_generator(G, len(real), self.seed)
        scores = fid.image_scores(real, fake, self._feature_net, tuple(self.source.sample_shape),
                                  kid_subset_size=min(100, len(real)))
        out = {k: float(v) for k, v in scores.items() if k in self.metrics or k == "kid_std"}
        for k, v in self.floor.items():
            if k in self.metrics:
                out[f"{k}_floor"] = float(v)
        if self.classifier_accuracy is not None:
            out["classifier_acc"] = self.classifier_accuracy
        conditional = generator_classes(G) > 0
        if conditional or self.config.data.name == "digits":
            from ganray.orchestrator.job.class_scores import ClassScores

            self._by_class = self._by_class or ClassScores(self.config)
        if self.config.data.name == "digits":
            out.update(self._by_class.digit_fidelity(G, self.num_samples, self.seed))
        if conditional:
            out.update(self._by_class.scores(G, real, self.source.labels, fake, self._feature_net,
                                             tuple(self.source.sample_shape), self.num_samples, self.seed))
        return out
