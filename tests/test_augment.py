"""Adaptive discriminator augmentation (issue 18, item 3): the augmentations, ADA's p, and the
topologies' agreement with augmentation on.

Pure torch first (the augmentations, p's direction, the round table), then `local` runs on the
digits (exact resume keeps p), then real Ray: replicated(1) = local within 1e-5, split(1G, 1D)
= local within 1e-4, and two replicas that hold one p.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from helpers import ray_rounds, run_cli, small_config
from ganray.models.errors import ConfigError
from ganray.orchestrator.job.checkpoint import read_checkpoint, write_checkpoint
from ganray.orchestrator.job.coordinator import RayEngine
from ganray.orchestrator.job.engine import LocalEngine
from ganray.workers.augment import DRAWS, AugmentSettings, Augmenter, augment, p_metric
from ganray.workers.phases import round_table
from ganray.workers.settings import Hyper

# A tiny conv job on the digits (1x8x8): p moves within a few rounds (speed_kimg 1: one
# adjustment of 2 D steps of 32 images moves p by 0.064), R1 on the augmented reals.
ADA = {"kind": "ada", "speed_kimg": 1.0, "interval": 2}


def _digits(augment: dict | None = None, **sections):
    tree = dict(data={"name": "digits"},
                model={"generator": "dcgan", "discriminator": "dcgan", "z_dim": 8, "base_width": 8,
                       "batchnorm": False},
                schedule={"batch_size": 32, "n_critic": 2}, loss={"r1_gamma": 0.05, "r1_interval": 2},
                augment=augment if augment is not None else ADA)
    tree.update(sections)
    return small_config(**tree)


def _losses(result) -> np.ndarray:
    return np.stack([result.metrics["loss/D"], result.metrics["loss/G"]])


# --- the augmentations --------------------------------------------------------------------------

def test_augmentations_are_differentiable_and_keep_the_shape() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in ((6, 1, 8, 8), (6, 3, 16, 16)):
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        u = torch.rand((shape[0], DRAWS), generator=gen)
        out = augment(x, u, 1.0, flip=True)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert not torch.equal(out, x)
        out.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        # p = 0: every sample untouched, bit for bit.
        assert torch.equal(augment(x, u, 0.0, flip=True), x)
    # The analytic gradient is the numerical one (on small images: gradcheck costs one pass per pixel).
    x = (torch.rand((3, 3, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    u = torch.rand((3, DRAWS), generator=gen)
    assert torch.autograd.gradcheck(lambda t: augment(t, u, 1.0, flip=True), (x,))


def test_flips_only_when_asked() -> None:
    x = torch.arange(8.0).repeat(8, 1).expand(4, 1, 8, 8) / 4 - 1  # columns 0..7: not mirror-symmetric
    u = torch.zeros((4, DRAWS))  # every augmentation on at p=1, every parameter at its lowest
    u[:, 6:8] = 0.5  # translation 0
    u[:, 8] = 0.5  # brightness +0
    u[:, 10] = 0.5  # contrast 1
    u[:, 11:13] = -1.0  # cutout square off the image
    assert torch.allclose(augment(x, u, 1.0, flip=False), x)
    assert torch.allclose(augment(x, u, 1.0, flip=True), x.flip(3))


def test_p_moves_up_when_D_overfits_and_down_otherwise() -> None:
    settings = AugmentSettings(kind="ada", target=0.6, interval=2)
    aug = Augmenter(settings, torch.device("cpu"))
    step = 0.25
    overfit = torch.tensor([3.0, 2.0, 1.0, 0.5])  # r_t = 1 > 0.6
    for adjust in (False, True, False, True):
        aug.observe_reals(overfit)
        aug.end_d_step(adjust, step)
    assert aug.p.item() == pytest.approx(0.5)
    honest = torch.tensor([1.0, -1.0, 2.0, -2.0])  # r_t = 0 < 0.6
    for adjust in (False, True):
        aug.observe_reals(honest)
        aug.end_d_step(adjust, step)
    assert aug.p.item() == pytest.approx(0.25)
    for _ in range(3):  # clamped at 0; a NaN logit counts as 0 and cannot poison p
        aug.observe_reals(torch.tensor([float("nan"), -1.0]))
        aug.end_d_step(True, step)
    assert aug.p.item() == 0.0
    # The table: D and G phases augment; the D phases adjust p by ADA's step every interval.
    table = round_table("nonsaturating", 4, 10.0, Hyper(2e-4, 2e-4, (0.5, 0.99), 2, 0.0),
                        AugmentSettings(kind="ada", interval=4, speed_kimg=500.0), global_batch=64)
    assert all(p.augment for p in (*table.d_steps, table.g_step))
    adapt = table.d_steps[0].adapt
    assert adapt is not None and adapt.weight == pytest.approx(64 * 4 / 500_000)
    assert [d for d in range(1, 13) if adapt.due(d)] == [4, 8, 12]
    plain = round_table("nonsaturating", 4, 10.0, Hyper(2e-4, 2e-4, (0.5, 0.99), 2, 0.0))
    assert not any(p.augment or p.adapt for p in plain.phases)


def test_each_discriminators_p_is_logged_under_its_own_name() -> None:
    from ganray.workers.stats import SKIPPED, merge_models

    merged = merge_models([{"loss/D": 1.0, p_metric(0): 0.1, SKIPPED: 1.0},
                           {"loss/D": 3.0, p_metric(1): 0.3, SKIPPED: 1.0}])
    assert merged == {"loss/D": 2.0, "augment/p/d0": 0.1, SKIPPED: 2.0, "augment/p/d1": 0.3}


def test_augmentation_is_refused_on_2d_data(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("data: {name: grid25}\n")
    code, _, err = run_cli(["validate", str(config), "--set", "augment.kind=ada"])
    assert code == 2 and "augment.kind 'ada' augments images" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["validate", str(config), "--set", "augment.kind=flips"])
    assert code == 2 and "augment.kind must be one of" in err
    # Data whose shape only the workers learn: the same line from the discriminator's side.
    with pytest.raises(ConfigError, match="augment.kind 'diffaugment' augments images"):
        LocalEngine(small_config(data={"name": "ring8", "size": 256}, augment={"kind": "diffaugment"}))


# --- local ---------------------------------------------------------------------------------------

def test_exact_resume_keeps_p(tmp_path: Path) -> None:
    """Stop mid-interval (r_t's running sum is state too), write and read a checkpoint, go on:
    the same p and losses as a run that never stopped."""
    config = _digits(loss={"r1_gamma": 0.05, "r1_interval": 2}, schedule={"batch_size": 32, "n_critic": 1})
    whole = LocalEngine(config)
    first = whole.run(5)
    state = whole.state()
    assert state["augment"]["steps"] == 1  # 5 D steps, interval 2: one step into an interval
    rest = whole.run(5)
    write_checkpoint(state, tmp_path / "ckpt", {})
    restored, _ = read_checkpoint(tmp_path / "ckpt")
    resumed = LocalEngine(config)
    resumed.load_state(restored)
    again = resumed.run(5)
    assert again.metrics == rest.metrics
    p = first.metrics[p_metric()] + rest.metrics[p_metric()]
    assert np.ptp(p) > 0 and min(p) >= 0.0 and max(p) <= 1.0


def test_diffaugment_keeps_p_and_none_changes_nothing() -> None:
    diff = LocalEngine(_digits({"kind": "diffaugment"})).run(2)
    assert diff.metrics[p_metric()] == [1.0, 1.0]
    plain = LocalEngine(_digits({"kind": "none"})).run(2)
    unset = LocalEngine(_digits({})).run(2)  # the section left at its defaults
    assert plain.metrics == unset.metrics and p_metric() not in plain.metrics
    assert not np.allclose(_losses(plain), _losses(diff))


# --- Ray -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ada():
    """12 rounds of the ada digits job in `local`: the reference of the Ray topologies."""
    return LocalEngine(_digits()).run(12)


def test_one_replica_with_ada_reproduces_local(ray_session, local_ada) -> None:
    result = ray_rounds(_digits(topology={"kind": "replicated", "num_workers": 1}), 12)
    np.testing.assert_allclose(_losses(result), _losses(local_ada), rtol=0, atol=1e-5)
    for key in ("D/real_score", "D/fake_score", p_metric()):
        np.testing.assert_allclose(result.metrics[key], local_ada.metrics[key], rtol=0, atol=1e-5, err_msg=key)
    assert np.ptp(local_ada.metrics[p_metric()]) > 0  # p moved: the comparison means something


def test_one_generator_one_discriminator_with_ada_matches_local(ray_session, local_ada) -> None:
    engine = RayEngine(_digits(topology={"kind": "split", "num_generators": 1, "num_discriminators": 1},
                               resources={"cpus_per_worker": 0.5}))
    try:
        result = engine.run(12)
        state = engine.state()
    finally:
        engine.close()
    np.testing.assert_allclose(_losses(result), _losses(local_ada), rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.metrics[p_metric(0)], local_ada.metrics[p_metric()], rtol=0, atol=1e-4)
    assert set(state["augment"]) == {"d0"}


def test_two_replicas_hold_one_p(ray_session, local_ada) -> None:
    """r_t rides along with D's all-reduce: both replicas steer the same p, the global batch's."""
    engine = RayEngine(_digits(topology={"kind": "replicated", "num_workers": 2}))
    try:
        result = engine.run(12)
        states = ray.get([w.state.remote(True) for w in engine.actors])
    finally:
        engine.close()
    assert states[0]["augment"]["p"].item() == states[1]["augment"]["p"].item()
    np.testing.assert_allclose(result.metrics[p_metric()], local_ada.metrics[p_metric()], rtol=0, atol=1e-4)
    np.testing.assert_allclose(_losses(result), _losses(local_ada), rtol=0, atol=1e-4)
