"""`data.name: stacked-digits` (issue 18, item 1): the data, its mode metrics, and a tiny job."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import small_config

from ganray.models.errors import ConfigError
from ganray.models.stacked_metrics import classify_channels, mode_scores, stacked_scores, triple_labels
from ganray.orchestrator.job.evaluate import Evaluator, default_metrics
from ganray.workers.data import BUILTIN_NAMES, check_data_config, digits_arrays, load_dataset

PAPER_SAMPLES = 26_000  # the Stacked MNIST protocol's evaluation size


def _cfg(size: int = 512, **extra: object) -> dict:
    return {"name": "stacked-digits", "size": size, **extra}


def test_splits_shapes_range_labels_and_disjoint_digits() -> None:
    assert "stacked-digits" in BUILTIN_NAMES
    check_data_config(_cfg())
    x, y = digits_arrays()
    train, test = load_dataset(_cfg(), seed=0), load_dataset(_cfg(), seed=0, split="test")
    for source in (train, test):
        assert (len(source), source.sample_shape, source.kind) == (512, (3, 8, 8), "image")
        data = source.get(np.arange(len(source)))
        assert data.dtype == torch.float32 and float(data.min()) >= -1.0 and float(data.max()) <= 1.0
        # Each channel is the digit its index names, and the label is that digit triple.
        d = source.digit_indices
        assert torch.equal(data, torch.as_tensor(x[d].reshape(-1, 3, 8, 8)))
        assert np.array_equal(source.labels, y[d[:, 0]] * 100 + y[d[:, 1]] * 10 + y[d[:, 2]])
        assert 0 <= source.labels.min() and source.labels.max() <= 999
    assert not set(train.digit_indices.ravel()) & set(test.digit_indices.ravel())
    # The train split follows the job seed; the held-out split is the same for every seed.
    other = load_dataset(_cfg(), seed=1), load_dataset(_cfg(), seed=1, split="test")
    assert other[0].fingerprint != train.fingerprint and not np.array_equal(other[0].digit_indices, train.digit_indices)
    assert other[1].fingerprint == test.fingerprint and np.array_equal(other[1].digit_indices, test.digit_indices)
    assert load_dataset(_cfg(), seed=0).fingerprint == train.fingerprint != test.fingerprint


def test_mode_scores_on_hand_made_triples() -> None:
    uniform = mode_scores(np.arange(1000))
    assert uniform["modes"] == 1000 and uniform["kl"] == pytest.approx(0.0, abs=1e-12)
    one = mode_scores(np.full(500, 427))
    assert one["modes"] == 1 and one["kl"] == pytest.approx(math.log(1000))
    # Two modes, 3:1: sum over the non-empty bins of p log(1000 p).
    two = mode_scores(np.array([5, 5, 5, 999]))
    assert two["modes"] == 2
    assert two["kl"] == pytest.approx(0.75 * math.log(750) + 0.25 * math.log(250))
    assert list(triple_labels(np.array([[4, 2, 7], [0, 0, 0], [9, 9, 9]]))) == [427, 0, 999]
    with pytest.raises(ValueError):
        mode_scores(np.array([1000]))


def test_real_held_out_stacked_digits_cover_every_mode() -> None:
    config = small_config(data=_cfg(PAPER_SAMPLES), eval={"num_samples": PAPER_SAMPLES})
    assert default_metrics("stacked-digits", "image") == ["modes", "kl", "confidence"]
    evaluator = Evaluator(config)
    net = evaluator._digits_classifier()
    real = evaluator.source.get(np.arange(len(evaluator.source)))
    scores = stacked_scores(net, real)
    assert scores["modes"] >= 990 and scores["kl"] < 0.1 and scores["confidence"] > 0.9, scores
    # The classifier labels the held-out channels as their true digits, nearly always.
    labels, _ = classify_channels(net, real[:2000])
    assert float(np.mean(triple_labels(labels) == evaluator.source.labels[:2000])) > 0.85


def test_tiny_local_job_reports_stacked_metrics() -> None:
    from ganray.orchestrator.job.trainer import Trainer

    config = small_config(
        data=_cfg(1024),
        model={"generator": "dcgan", "discriminator": "dcgan", "z_dim": 8, "base_width": 8, "batchnorm": False},
        schedule={"total_kimg": 0.5, "batch_size": 32, "sync_kimg": 0.25, "checkpoint_kimg": 1, "sample_kimg": 1000},
        eval={"every_kimg": 1000, "num_samples": 300},
        tracking={"enabled": False})
    result = Trainer(config, progress=False).run()
    assert result.rounds >= 2
    assert set(result.eval) == {"modes", "kl", "confidence"}, result.eval
    assert 1 <= result.eval["modes"] <= 300 and 0.0 <= result.eval["kl"] <= math.log(1000) + 1e-9
    assert 0.1 <= result.eval["confidence"] <= 1.0


def test_tune_and_retrain_read_the_stacked_metrics() -> None:
    from ganray.orchestrator.job.config import config_from_dict
    from ganray.orchestrator.retrain.champion import resolve_metric
    from ganray.orchestrator.tune.spec import reported_eval_metrics

    config = config_from_dict({"data": {"name": "stacked-digits"}})
    assert reported_eval_metrics(config) == ["eval/modes", "eval/kl", "eval/confidence"]
    assert resolve_metric(config, "image") == ("kl", "min")  # no FID here: the gate reads what is computed
    config.retrain.metric = "modes"
    assert resolve_metric(config, "image") == ("modes", "max")
    config.retrain.metric = "fid"
    with pytest.raises(ConfigError, match="use one of modes, kl, confidence"):
        resolve_metric(config, "image")
