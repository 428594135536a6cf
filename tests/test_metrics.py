"""Sample-quality metrics: the PacGAN 2D protocol and FID/KID on the digits feature classifier."""

from __future__ import annotations

import copy
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchmetrics.image.fid import FrechetInceptionDistance

from ganray.models import digits_classifier as classifier_mod
from ganray.models.errors import ConfigError
from ganray.models.digits_classifier import DigitsFeatureNet, load_or_train_digits_classifier, train_digits_classifier
from ganray.models.fid import FeatureExtractor, RealStatsCache, image_scores, inception_feature_net
from ganray.models.metrics2d import evaluate_2d, mixture_modes

DIGITS_SHAPE = (1, 8, 8)
KID_SUBSETS = 10  # torchmetrics' default of 100 only adds run time here


# ---------------------------------------------------------------------------- 2D protocol


def test_ring8_geometry() -> None:
    modes, std = mixture_modes("ring8")
    assert modes.shape == (8, 2) and std == 0.01
    np.testing.assert_allclose(np.linalg.norm(modes, axis=1), 1.0, atol=1e-12)
    angles = np.arctan2(modes[:, 1], modes[:, 0]) % (2 * np.pi)
    np.testing.assert_allclose(angles, 2 * np.pi * np.arange(8) / 8, atol=1e-12)
    np.testing.assert_allclose(modes[0], [1.0, 0.0], atol=1e-12)


def test_grid25_geometry() -> None:
    modes, std = mixture_modes("grid25")
    assert modes.shape == (25, 2) and std == 0.05
    expected = set(itertools.product((-4.0, -2.0, 0.0, 2.0, 4.0), repeat=2))
    assert {tuple(m) for m in modes.tolist()} == expected


def test_unknown_mixture_is_refused() -> None:
    with pytest.raises(ValueError, match="ring8"):
        mixture_modes("ring9")


def test_samples_on_every_centre_score_perfectly() -> None:
    modes, std = mixture_modes("grid25")
    samples = np.repeat(modes, 100, axis=0)
    scores = evaluate_2d(samples, modes, std)
    assert scores["modes"] == 25
    assert scores["hq"] == 1.0
    assert scores["kl"] == pytest.approx(0.0, abs=1e-12)


def test_collapse_onto_one_mode() -> None:
    modes, std = mixture_modes("grid25")
    rng = np.random.default_rng(0)
    samples = modes[7] + rng.normal(scale=0.5 * std, size=(2500, 2)) / np.sqrt(2)
    samples = samples[np.linalg.norm(samples - modes[7], axis=1) <= 3 * std]  # keep all HQ
    scores = evaluate_2d(samples, modes, std)
    assert scores["modes"] == 1
    assert scores["hq"] == 1.0
    assert scores["kl"] == pytest.approx(math.log(25), rel=1e-12)


def test_off_mode_noise_is_not_high_quality() -> None:
    modes, std = mixture_modes("grid25")
    # Cell centres (odd coordinates) lie sqrt(2) = 28 std away from every mode.
    samples = np.array(list(itertools.product((-3.0, -1.0, 1.0, 3.0), repeat=2)))
    scores = evaluate_2d(np.repeat(samples, 10, axis=0), modes, std)
    assert scores["hq"] == 0.0
    assert scores["modes"] == 0
    assert scores["kl"] == float("inf")


def test_known_mixture_of_good_and_bad_samples() -> None:
    modes, std = mixture_modes("ring8")
    rng = np.random.default_rng(1)
    good = np.repeat(modes, 75, axis=0)  # 600 samples, 75 per mode
    # Jitter well inside 3 std so every good sample stays high-quality.
    good = good + rng.uniform(-std, std, size=good.shape)
    bad = rng.uniform(-0.5, 0.5, size=(400, 2))  # near the centre, >= 0.29 (29 std) off the ring
    scores = evaluate_2d(np.concatenate([good, bad]), modes, std)
    assert scores["hq"] == pytest.approx(0.6, abs=1e-12)
    assert scores["modes"] == 8
    assert scores["kl"] == pytest.approx(0.0, abs=1e-12)


def test_reverse_kl_of_an_uneven_histogram() -> None:
    modes, std = mixture_modes("ring8")
    samples = np.concatenate([np.repeat(modes[:1], 300, axis=0), np.repeat(modes[3:4], 100, axis=0)])
    scores = evaluate_2d(samples, modes, std)
    assert scores["modes"] == 2
    assert scores["kl"] == pytest.approx(0.75 * math.log(0.75 * 8) + 0.25 * math.log(0.25 * 8), rel=1e-12)


def test_three_std_boundary_decides_capture() -> None:
    modes, std = mixture_modes("ring8")
    inside = modes[0] + np.array([2.9 * std, 0.0])
    outside = modes[1] + np.array([0.0, 3.1 * std])
    scores = evaluate_2d(np.stack([inside, outside]), modes, std)
    assert scores["hq"] == 0.5
    assert scores["modes"] == 1  # mode 1's only nearby sample is not high-quality
    assert scores["kl"] == pytest.approx(math.log(8))


def test_torch_input_and_non_finite_samples() -> None:
    modes, std = mixture_modes("ring8")
    samples = torch.tensor(np.concatenate([modes, [[float("nan"), 0.0], [float("inf"), 1.0]]]), dtype=torch.float32)
    scores = evaluate_2d(samples, modes, std)
    assert scores["modes"] == 8
    assert scores["hq"] == pytest.approx(0.8)
    assert scores == evaluate_2d(samples.numpy(), modes, std)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        evaluate_2d(np.zeros((4, 3)), modes, std)


# ---------------------------------------------------------------------------- digits FID/KID


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = load_digits()
    x = (data.images / 8.0 - 1.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)
    return {k: torch.as_tensor(v) for k, v in dict(xtr=xtr, xte=xte, ytr=ytr, yte=yte).items()}


@pytest.fixture(scope="module")
def classifier(digits: dict[str, torch.Tensor]) -> tuple[DigitsFeatureNet, float]:
    return train_digits_classifier(digits["xtr"], digits["ytr"], digits["xte"], digits["yte"], seed=0)


def _uniform_noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_classifier_reaches_protocol_accuracy(classifier, digits) -> None:
    net, accuracy = classifier
    assert accuracy >= 0.95
    assert not net.training
    with torch.no_grad():
        assert net(digits["xte"][:5]).shape == (5, 10)
        assert net.features(digits["xte"][:5]).shape == (5, DigitsFeatureNet.feature_dim)


def test_classifier_training_is_seeded(digits) -> None:
    args = (digits["xtr"][:256], digits["ytr"][:256], digits["xte"][:64], digits["yte"][:64])
    a, _ = train_digits_classifier(*args, seed=3, epochs=1)
    b, _ = train_digits_classifier(*args, seed=3, epochs=1)
    c, _ = train_digits_classifier(*args, seed=4, epochs=1)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_classifier_cache_trains_once(tmp_path, monkeypatch, classifier, digits) -> None:
    calls = []

    def counting_train(*args, **kwargs):
        calls.append(1)
        net, acc = classifier
        return copy.deepcopy(net), acc

    monkeypatch.setattr(classifier_mod, "train_digits_classifier", counting_train)
    args = (tmp_path, digits["xtr"], digits["ytr"], digits["xte"], digits["yte"])
    net1, acc1 = load_or_train_digits_classifier(*args, data_hash="abc123")
    rng_before = torch.get_rng_state()
    net2, acc2 = load_or_train_digits_classifier(*args, data_hash="abc123")
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation leaves training's RNG alone
    assert len(calls) == 1
    assert acc2 == acc1 == classifier[1]
    assert not net2.training
    for name, tensor in net1.state_dict().items():
        assert torch.equal(tensor, net2.state_dict()[name]), name

    load_or_train_digits_classifier(*args, data_hash="other")  # other data: its own entry
    assert len(calls) == 2
    weights = next(tmp_path.glob("*abc123.pt"))
    weights.write_bytes(b"not a checkpoint")  # corrupt entries are rebuilt, not trusted
    load_or_train_digits_classifier(*args, data_hash="abc123")
    assert len(calls) == 3
    with pytest.raises(ValueError, match="data_hash"):
        load_or_train_digits_classifier(*args, data_hash="../escape")


def test_fid_and_kid_order_self_real_floor_and_noise(classifier, digits) -> None:
    net, _ = classifier
    test_set = digits["xte"]
    score = lambda real, fake: image_scores(real, fake, net, DIGITS_SHAPE, kid_subsets=KID_SUBSETS)  # noqa: E731
    self_ = score(test_set, test_set)
    floor = score(digits["xtr"], test_set)
    noise = score(test_set, _uniform_noise(test_set.shape[0]))

    assert noise["fid"] > 10.0
    assert abs(self_["fid"]) < 1e-6 * noise["fid"]
    assert 0.0 < floor["fid"] < 0.05 * noise["fid"]
    # KID is unbiased: on identical sets it sits slightly below 0, and the floor scatters around 0.
    assert noise["kid"] > 0.3
    assert abs(self_["kid"]) < 0.05 * noise["kid"]
    assert abs(floor["kid"]) < 0.05 * noise["kid"]
    assert floor["kid_std"] > 0.0 and all(math.isfinite(v) for v in noise.values())


def test_scores_equal_torchmetrics_with_the_extractor(classifier, digits) -> None:
    net, _ = classifier
    real, fake = digits["xte"], _uniform_noise(200, seed=1)
    extractor = FeatureExtractor(net, DIGITS_SHAPE)
    assert extractor.num_features == DigitsFeatureNet.feature_dim
    metric = FrechetInceptionDistance(feature=extractor, input_img_size=DIGITS_SHAPE, normalize=True)
    metric.train()  # must not switch the feature net's BatchNorm to training
    assert not net.training
    metric.update((real + 1) / 2, real=True)
    metric.update((fake + 1) / 2, real=False)
    direct = metric.compute()
    assert direct.dtype == torch.float64
    ours = image_scores(real, fake, net, DIGITS_SHAPE, kid_subsets=KID_SUBSETS)
    assert ours["fid"] == pytest.approx(float(direct), rel=1e-6)


def test_small_sample_counts(classifier, digits) -> None:
    net, _ = classifier
    real, fake = digits["xte"][:20], digits["xtr"][:12]  # fewer than the KID subset size
    scores = image_scores(real, fake, net, DIGITS_SHAPE, kid_subset_size=1000, kid_subsets=KID_SUBSETS)
    assert all(math.isfinite(v) for v in scores.values())
    with pytest.raises(ValueError, match="at least 2"):
        image_scores(digits["xte"][:20], digits["xtr"][:1], net, DIGITS_SHAPE)
    with pytest.raises(ValueError, match="shape"):
        image_scores(digits["xte"][:20], torch.zeros(4, 1, 16, 16), net, DIGITS_SHAPE)


def test_real_stats_cache_computes_real_features_once(tmp_path, classifier, digits) -> None:
    net, _ = classifier
    loads = []

    def load_real() -> torch.Tensor:
        loads.append(1)
        return digits["xte"]

    cache = RealStatsCache(tmp_path)
    fake = digits["xtr"][:300]
    kwargs = dict(kid_subsets=KID_SUBSETS, cache=cache, data_hash="digits-test")
    rng_before = torch.get_rng_state()
    first = image_scores(load_real, fake, net, DIGITS_SHAPE, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = image_scores(load_real, fake, net, DIGITS_SHAPE, **kwargs)
    assert len(loads) == 1 and cache.computed == 1
    assert first == second
    assert first == image_scores(digits["xte"], fake, net, DIGITS_SHAPE, kid_subsets=KID_SUBSETS)

    other = copy.deepcopy(net)
    with torch.no_grad():
        other.embed.bias.add_(1.0)  # other weights, other features: must not hit the same entry
    image_scores(load_real, fake, other, DIGITS_SHAPE, **kwargs)
    assert cache.computed == 2

    for entry in tmp_path.glob("real_features_*.pt"):
        entry.write_bytes(b"\x00garbage")
    assert image_scores(load_real, fake, net, DIGITS_SHAPE, **kwargs) == first
    assert cache.computed == 3


# ---------------------------------------------------------------------------- Inception


def test_inception_needs_a_local_weights_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="eval.inception_weights"):
        inception_feature_net(str(tmp_path / "missing.pth"))
    bogus = tmp_path / "bogus.pth"
    torch.save({"not": torch.zeros(1)}, bogus)
    with pytest.raises(ConfigError, match="eval.inception_weights"):
        inception_feature_net(str(bogus))


def test_inception_features_from_a_local_torchvision_state_dict(tmp_path, monkeypatch) -> None:
    from torchvision.models import inception_v3

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # the torchvision path, installed or not
    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=1000)
    weights: Path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), weights)

    # Grey (1, 16, 16) images: the network repeats them to RGB and resizes them to 299.
    rng_before = torch.get_rng_state()
    extractor = FeatureExtractor(inception_feature_net(str(weights)), (1, 16, 16))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert extractor.num_features == 2048
    feats = extractor(torch.rand(2, 1, 16, 16))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0
    assert not torch.allclose(feats[0], feats[1])


def test_digit_fidelity_counts_confidence_class_shares_and_near_copies() -> None:
    from ganray.models.digits_fidelity import COPY_RADIUS, fidelity_scores

    train = torch.rand(50, 1, 8, 8) * 2 - 1
    copies = train[:4] + 0.01                      # within the radius of a training image
    new = train[4:8] + 2 * COPY_RADIUS             # every pixel moved by 1.0: 8 away over 64 pixels
    samples = torch.cat([copies, new])
    predicted = [0, 0, 1, 1, 2, 2, 3, 3]           # classes 4-9 get no sample
    probabilities = np.full((8, 10), 0.4 / 9)
    probabilities[np.arange(8), predicted] = 0.6
    scores = fidelity_scores(probabilities, samples, train)
    assert scores["near_copies"] == 0.5
    assert scores["confidence"] == pytest.approx(0.6)
    assert scores["class_share_min"] == 0.0
    uniform = np.full((10, 10), 0.01) + np.eye(10) * 0.9   # one sample per class, 91% sure
    assert fidelity_scores(uniform, torch.cat([samples, new[:2]]), train) == pytest.approx(
        {"confidence": 0.91, "class_share_min": 0.1, "near_copies": 0.4})
