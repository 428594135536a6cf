"""What a comparison measures on a trained learner besides the evaluator's scores: the cost of
sampling, the digits classifier's view of image samples, and the mean and spread over seeds.

Sampling cost is wall seconds and network evaluations per 1,000 samples: a GAN's G, an
autoencoder's decoder and a VAE's decoder take one pass per sample; the energy learner's
sampling module searches D's score and says how many D evaluations one sample costs
(`evals_per_sample`). The clock runs on as many threads as a worker trains with, so the figure
is the cost a worker would pay, whatever else runs in the driver.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ganray.orchestrator.job.evaluate import Evaluator, sample_generator

SAMPLES_FOR_COST = 1000


def evals_per_sample(G: nn.Module) -> float:
    """Network evaluations one sample costs (1 for a one-pass generator)."""
    return float(getattr(G, "evals_per_sample", 1))


def timed_samples(G: nn.Module, seed: int, threads: int, n: int = SAMPLES_FOR_COST) -> tuple[float, torch.Tensor]:
    """Wall seconds to draw `n` samples (a few samples first, so one-time set-up is not counted),
    and the samples (the comparison's picture shows them: no second draw)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        sample_generator(G, 8, seed)
        t0 = time.perf_counter()
        samples = sample_generator(G, n, seed)
        return time.perf_counter() - t0, samples
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def digit_class_scores(classifier: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """The digits classifier on samples: `classes` (distinct predicted digits of 10), `class_kl`
    (KL of the predicted-class histogram against uniform: 0 when every digit is equally common,
    log 10 for one digit only) and `confidence` (mean top-class probability)."""
    was_training = classifier.training
    classifier.eval()
    probs = torch.cat([torch.softmax(classifier(images[i:i + 1024].float()), dim=1)
                       for i in range(0, images.shape[0], 1024)])
    classifier.train(was_training)
    top, labels = probs.max(dim=1)
    counts = np.bincount(labels.numpy(), minlength=probs.shape[1])
    p = counts[counts > 0] / counts.sum()
    return {"classes": float(len(p)), "class_kl": float(np.sum(p * np.log(p * probs.shape[1]))),
            "confidence": float(top.mean())}


def scores(evaluator: Evaluator, G: nn.Module, given: Optional[dict[str, float]] = None) -> dict[str, float]:
    """The data's metrics for G: the evaluator's (or `given`, the Trainer's final evaluation of
    this very module), plus the digits classifier's class spread and confidence for `digits`."""
    out = dict(given) if given else evaluator.evaluate(G)
    if evaluator.config.data.name == "digits" and evaluator.kind != "2d":
        classifier = evaluator._digits_classifier()  # the evaluator's cached classifier (FID's features)
        images = sample_generator(G, len(evaluator.source), evaluator.seed)
        out.update(digit_class_scores(classifier, images))
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of finite values; NaN when none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var)


def summarise(per_seed: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Mean and spread over seeds of `metrics` and of the scalar `keys` of each seed's entry."""
    out: dict[str, Any] = {}
    names = sorted({k for entry in per_seed for k in entry.get("metrics", {})})
    out["metrics"] = {k: mean_spread([e["metrics"].get(k, float("nan")) for e in per_seed])[0] for k in names}
    out["metrics_std"] = {k: mean_spread([e["metrics"].get(k, float("nan")) for e in per_seed])[1] for k in names}
    for key in keys:
        mean, std = mean_spread([e[key] for e in per_seed if e.get(key) is not None])
        out[key], out[f"{key}_std"] = mean, std
    return out
