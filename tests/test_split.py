"""The `split` topology: G and D in separate actors, fakes and dL/dx through the object store.

Pure-function tests first (feedback weights, batch slicing), then real Ray runs on tiny MLPs:
1 G + 1 D with mean feedback equals `local`; 2 generators equal 1 (the all-reduce scaling);
K=2 discriminators with max and GMAN softmax feedback, overlap and MD-GAN swap all run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray
import torch

from helpers import small_config
from ganray.models import losses
from ganray.models.errors import ConfigError
from ganray.orchestrator.job.coordinator import RayEngine
from ganray.orchestrator.job.engine import LocalEngine
from ganray.workers import phase_loss
from ganray.workers.split import feedback_weights, g_parts_for, rows_of


def _split(generators: int, discriminators: int, data: dict | None = None, loss: dict | None = None, **topology):
    return small_config(topology={"kind": "split", "num_generators": generators,
                                  "num_discriminators": discriminators, **topology},
                        data={"name": "grid25", "size": 4096, **(data or {})}, loss=loss or {},
                        # Half a logical CPU each: the shared reference engine and a 4-actor job
                        # fit the session's 6 logical CPUs together.
                        resources={"cpus_per_worker": 0.5})


def _losses(result) -> np.ndarray:
    return np.stack([result.metrics["loss/D"], result.metrics["loss/G"]])


# --- pure functions -----------------------------------------------------------------------------

def test_feedback_weights() -> None:
    losses = torch.tensor([0.5, 2.0, 1.0])
    assert feedback_weights(losses, "mean", 1.0).tolist() == pytest.approx([1 / 3] * 3)
    assert feedback_weights(losses, "max", 1.0).tolist() == [0.0, 1.0, 0.0]
    soft = feedback_weights(losses, "softmax", 2.0)
    assert soft.tolist() == pytest.approx(torch.softmax(2.0 * losses, 0).tolist())
    assert float(soft.sum()) == pytest.approx(1.0) and int(soft.argmax()) == 1
    # GMAN's lambda = 0 is the mean; a large lambda approaches the max.
    assert feedback_weights(losses, "softmax", 0.0).tolist() == pytest.approx([1 / 3] * 3)
    assert feedback_weights(losses, "softmax", 100.0)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="feedback mode"):
        feedback_weights(losses, "median", 1.0)


def test_discriminator_slices_come_from_the_right_generator_parts() -> None:
    assert rows_of(1, 4, 64) == (16, 32)
    # B=12, M=3 parts of 4 rows, K=2 slices of 6 rows: slice 0 = rows 0..5 (parts 0, 1),
    # slice 1 = rows 6..11 (parts 1, 2).
    assert g_parts_for(0, 2, 3, 12) == [0, 1]
    assert g_parts_for(1, 2, 3, 12) == [1, 2]
    assert g_parts_for(0, 1, 2, 8) == [0, 1]
    assert g_parts_for(1, 2, 1, 8) == [0]


def test_a_discriminator_pairs_all_fakes_with_its_own_reals() -> None:
    # D worker i of K holds B/K reals and scores all B fakes: fake j pairs with real j mod B/K.
    D = torch.nn.Linear(2, 1)
    params = list(D.parameters())
    real, fake = torch.randn(2, 2), torch.randn(4, 2)
    mine = phase_loss.g_loss(lambda x: D(x).squeeze(1), params, "relativistic", fake, real, False)
    pairs = real[torch.tensor([0, 1, 0, 1])]
    expected = losses.g_loss("relativistic", D(fake).squeeze(1), D(pairs).squeeze(1))
    assert mine.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="cannot pair"):
        phase_loss.g_loss(lambda x: D(x).squeeze(1), params, "relativistic", fake, real[:1].repeat(3, 1), False)


def test_batch_must_divide_among_generators() -> None:
    # batch 64 divides by K=2 but not by M=3: refused when the config is read (so --dry-run and
    # validate catch it too), before any Ray call.
    with pytest.raises(ConfigError, match="batch_size 64 .*num_generators=3"):
        _split(3, 2)


# --- real Ray -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_g_two_d_max(ray_session):
    """1 G + 2 D with max feedback: the reference for the 2-generator run."""
    engine = RayEngine(_split(1, 2, feedback="max"))
    yield engine, engine.run(12)
    engine.close()


# Instance noise, annealed within the 20 rounds (1.28 kimg), with R1 on the noisy reals: the
# D worker's real/fake/feedback noise must be the slices `local` draws.
NOISY = {"instance_noise": 0.5, "instance_noise_kimg": 1.0, "r1_gamma": 0.1, "r1_interval": 2}


# R2 and the relativistic loss, written once in the round table: D worker 0 of 1 pairs its fakes
# with its own reals (all of them), exactly as `local` does.
R2_ON = {"r1_gamma": 0.1, "r2_gamma": 0.2, "r1_interval": 2}
RELATIVISTIC = {"kind": "relativistic"}


@pytest.mark.parametrize("loss", [{}, NOISY, R2_ON, RELATIVISTIC],
                         ids=["plain", "instance-noise", "r2", "relativistic"])
def test_one_generator_one_discriminator_matches_local(ray_session, loss) -> None:
    engine = RayEngine(_split(1, 1, loss=loss))
    try:
        result = engine.run(20)
    finally:
        engine.close()
    local = LocalEngine(small_config(loss=loss)).run(20)
    assert result.images_seen == local.images_seen == 20 * 64
    np.testing.assert_allclose(_losses(result), _losses(local), rtol=0, atol=1e-4)
    for key in ("D/real_score", "D/fake_score", "grad_norm/D", "grad_norm/G"):
        np.testing.assert_allclose(result.metrics[key], local.metrics[key], rtol=0, atol=1e-4)
    assert np.ptp(result.metrics["loss/G"]) > 1e-3


def test_two_discriminators_are_independent_and_state_round_trips(one_g_two_d_max) -> None:
    engine, result = one_g_two_d_max
    assert result.rounds == 12 and result.images_seen == 12 * 64  # real images the Ds consumed
    assert all(math.isfinite(x) for key in ("loss/D", "loss/G") for x in result.metrics[key])
    assert result.time_compute_s > 0 and result.time_wait_s >= 0
    state = engine.state()
    assert set(state["D"]) == set(state["opt_D"]) == set(state["sampler"]) == {"d0", "d1"}
    d0, d1 = state["D"]["d0"], state["D"]["d1"]
    assert any(not torch.equal(d0[k], d1[k]) for k in d0)  # K critics with their own init, not replicas
    assert state["progress"] == {"rounds": 12, "images_seen": 768, "d_steps": 12}

    uninterrupted = engine.run(5)
    engine.load_state(state)
    resumed = engine.run(5)
    np.testing.assert_array_equal(_losses(resumed), _losses(uninterrupted))
    assert resumed.round_index == 17


def test_two_discriminators_with_relativistic_and_r2(ray_session) -> None:
    # K > 1: each critic pairs the G step's fakes with its own reals (a variant, not `local`).
    engine = RayEngine(_split(1, 2, loss={**RELATIVISTIC, **R2_ON}))
    try:
        result = engine.run(6)
    finally:
        engine.close()
    assert result.images_seen == 6 * 64
    assert all(math.isfinite(x) for key in ("loss/D", "loss/G", "loss/R1", "loss/R2") for x in result.metrics[key])
    assert result.metrics["loss/R2"][0] > 0 and result.metrics["loss/R2"][1] == 0.0


def test_two_generators_match_one(one_g_two_d_max) -> None:
    _, reference = one_g_two_d_max
    engine = RayEngine(_split(2, 2, feedback="max"))
    try:
        result = engine.run(12)
        g_ema = engine.generator_state()
    finally:
        engine.close()
    # Each generator backpropagates only its half of the batch; scaled by M and averaged by the
    # all-reduce, the update equals the full-batch one.
    np.testing.assert_allclose(_losses(result), _losses(reference), rtol=0, atol=1e-4)
    assert result.time_comm_s > 0
    assert g_ema and all(torch.isfinite(v).all() for v in g_ema.values())


def test_softmax_feedback_with_overlap_and_swap(ray_session) -> None:
    # 384 training samples = 6 global batches of 64 per epoch: 20 rounds end in epoch 3.
    engine = RayEngine(_split(1, 2, data={"size": 384}, feedback="softmax", softmax_lambda=2.0,
                              overlap=True, swap_every_epochs=1))
    try:
        first = engine.run(4)
        shards_before = [ray.get(d.__ray_call__.remote(lambda w: w.sampler.rank)) for d in engine.actors[1:]]
        second = engine.run(16)
        shards_after = [ray.get(d.__ray_call__.remote(lambda w: w.sampler.rank)) for d in engine.actors[1:]]
        epochs = ray.get(engine.actors[1].__ray_call__.remote(lambda w: w.sampler.epoch))
    finally:
        engine.close()
    for result in (first, second):
        assert all(math.isfinite(x) for key in ("loss/D", "loss/G") for x in result.metrics[key])
    assert second.images_seen == 20 * 64
    assert shards_before == [0, 1]  # first epoch: D i reads shard i
    assert epochs == 3
    assert shards_after == [1, 0]  # MD-GAN rotation every epoch: 3 swaps so far
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(engine.actors[0].param_checksum.remote(), timeout=60)  # close() killed the actors
