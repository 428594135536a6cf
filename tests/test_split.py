"""The `split` topology: G and D in separate actors, fakes and dL/dx through the object store.

Pure-function tests first (feedback weights, batch slicing), then real Ray runs on tiny MLPs:
1 G + 1 D with mean feedback equals `local`; 2 generators equal 1 (the all-reduce scaling);
K=2 discriminators: the weights each feedback mode gives (read from the per-critic statistics),
overlap's fakes exactly one G step old (against a sequential run), MD-GAN's shard swap.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import pytest
import ray
import torch

from helpers import small_config
from ganray.models import losses
from ganray.models.errors import ConfigError
from ganray.orchestrator.job.coordinator import RayEngine
from ganray.orchestrator.job.engine import ChunkResult, LocalEngine
from ganray.workers import phase_loss
from ganray.workers.split import (feedback_loss_name, feedback_weight_name, feedback_weights, g_parts_for,
                                  rows_of)


def _split(generators: int, discriminators: int, data: dict | None = None, loss: dict | None = None, **topology):
    return small_config(topology={"kind": "split", "num_generators": generators,
                                  "num_discriminators": discriminators, **topology},
                        data={"name": "grid25", "size": 4096, **(data or {})}, loss=loss or {},
                        # Half a logical CPU each: the shared reference engine and a 4-actor job
                        # fit the session's 6 logical CPUs together.
                        resources={"cpus_per_worker": 0.5})


def _losses(result) -> np.ndarray:
    return np.stack([result.metrics["loss/D"], result.metrics["loss/G"]])


def _feedback(result, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, K) arrays: each critic's G loss and the weight the generator gave it."""
    losses = np.array([result.metrics[feedback_loss_name(i)] for i in range(k)]).T
    weights = np.array([result.metrics[feedback_weight_name(i)] for i in range(k)]).T
    return losses, weights


def _expected_weights(losses: np.ndarray, mode: str, lam: float) -> np.ndarray:
    """Each mode's weights per round, written independently of `feedback_weights`."""
    if mode == "mean":
        return np.full_like(losses, 1.0 / losses.shape[1])
    if mode == "max":
        return np.eye(losses.shape[1])[losses.argmax(axis=1)]
    e = np.exp(lam * (losses - losses.max(axis=1, keepdims=True)))
    return e / e.sum(axis=1, keepdims=True)


def _assert_weighed(result, mode: str, lam: float = 0.0) -> np.ndarray:
    """The run's weights are `mode`'s for the critics' reported losses, and loss/G is the
    weighted loss; returns the weights."""
    losses, weights = _feedback(result)
    np.testing.assert_allclose(weights, _expected_weights(losses, mode, lam), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.metrics["loss/G"], (weights * losses).sum(axis=1), rtol=0, atol=1e-6)
    return weights


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

class Reference(NamedTuple):
    engine: RayEngine  # left running: later tests restore their own states into it
    result: ChunkResult  # its first 12 rounds
    wall_s: float  # the time `run(12)` took
    g_ema: dict[str, torch.Tensor]  # G_ema after those rounds


@pytest.fixture(scope="module")
def one_g_two_d_max(ray_session):
    """1 G + 2 D with max feedback: the reference for the 2-generator run, and the sequential
    engine the feedback and overlap tests restore states into."""
    engine = RayEngine(_split(1, 2, feedback="max"))
    t0 = time.perf_counter()
    result = engine.run(12)
    wall_s = time.perf_counter() - t0
    yield Reference(engine, result, wall_s, engine.generator_state())
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
    engine, result, wall_s, _ = one_g_two_d_max
    assert result.rounds == 12 and result.images_seen == 12 * 64  # real images the Ds consumed
    _assert_weighed(result, "max")
    # The chunk's time split: no all-reduce with one generator; compute, comm and wait are parts
    # of the chunk's wall time, so together they fit inside the time the call took.
    assert result.time_comm_s == 0.0
    assert result.time_compute_s > 0 and result.time_wait_s > 0
    assert result.time_compute_s + result.time_comm_s + result.time_wait_s <= wall_s
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
    _assert_weighed(result, "mean")  # the default feedback
    assert all(math.isfinite(x) for x in result.metrics["loss/D"])
    # R1 and R2 are due on the same D steps, every second one (one D step per round).
    for key in ("loss/R1", "loss/R2"):
        assert all(x > 0 for x in result.metrics[key][0::2]) and result.metrics[key][1::2] == [0.0] * 3, key


def test_two_generators_match_one(one_g_two_d_max) -> None:
    reference = one_g_two_d_max.result
    engine = RayEngine(_split(2, 2, feedback="max"))
    try:
        result = engine.run(12)
        g_ema = engine.generator_state()
    finally:
        engine.close()
    # Each generator backpropagates only its half of the batch; scaled by M and averaged by the
    # all-reduce, the update equals the full-batch one.
    np.testing.assert_allclose(_losses(result), _losses(reference), rtol=0, atol=1e-4)
    # `max` is observable: all weight on the harsher critic, in both runs, and the critics
    # disagree by more than the tolerance, so `mean` would not match the reference.
    np.testing.assert_array_equal(_assert_weighed(result, "max"), _assert_weighed(reference, "max"))
    reference_losses, _ = _feedback(reference)
    assert np.abs(reference_losses[:, 0] - reference_losses[:, 1]).min() > 1e-3
    assert result.time_comm_s > 0
    assert g_ema.keys() == one_g_two_d_max.g_ema.keys()
    for name, value in g_ema.items():
        torch.testing.assert_close(value, one_g_two_d_max.g_ema[name], rtol=0, atol=1e-4, msg=name)


def _set_feedback(engine, mode: str, lam: float) -> None:
    """Switch the running generator's feedback mode (actors[0]: the one generator), so the modes
    share one engine and start from one state instead of paying a Ray start each."""
    ray.get(engine.actors[0].__ray_call__.remote(
        lambda w: w.__dict__.update(feedback_mode=mode, softmax_lambda=lam)))


# mean; GMAN's softmax as lambda moves from 0 (the mean) towards the max; max.
SWEEP = [("mean", 0.0), ("softmax", 0.0), ("softmax", 20.0), ("softmax", 200.0), ("max", 0.0)]


def test_feedback_modes_weigh_the_critics(one_g_two_d_max) -> None:
    engine = one_g_two_d_max.engine
    start = engine.state()
    runs = {}
    try:
        for mode, lam in SWEEP:
            _set_feedback(engine, mode, lam)
            engine.load_state(start)
            runs[mode, lam] = engine.run(3)
    finally:
        _set_feedback(engine, "max", 1.0)  # the fixture's config
    weights = {key: _assert_weighed(result, *key) for key, result in runs.items()}
    # The first round's critics score the same G in every run: their losses are the same, and
    # different (independent inits and shards), so the modes weigh them differently.
    first = {key: _feedback(result)[0][0] for key, result in runs.items()}
    for critic_losses in first.values():
        np.testing.assert_array_equal(critic_losses, first["mean", 0.0])
    worst = int(np.argmax(first["mean", 0.0]))
    assert abs(first["mean", 0.0][0] - first["mean", 0.0][1]) > 1e-3
    # The harsher critic's weight moves from 1/K (mean, lambda = 0) to 1 (max) as lambda grows.
    top = [weights[key][0, worst] for key in SWEEP]
    assert top[0] == top[1] == 0.5 and 0.5 < top[2] < top[3] < top[4] == 1.0
    # lambda = 0 is the mean, step for step.
    for name, values in runs["mean", 0.0].metrics.items():
        np.testing.assert_array_equal(runs["softmax", 0.0].metrics[name], values, err_msg=name)
    # The weights steer G's step: the next round's D phase sees a G that mean and max moved apart.
    for a, b in [(SWEEP[0], SWEEP[4]), (SWEEP[2], SWEEP[3])]:
        assert abs(runs[a].metrics["D/fake_score"][1] - runs[b].metrics["D/fake_score"][1]) > 1e-6, (a, b)


# The statistics of a round's D phases: they see G only through the D phases' fakes.
D_PHASE = ("loss/D", "D/real_score", "D/fake_score", "grad_norm/D")


def test_overlap_fakes_are_one_generator_step_old(one_g_two_d_max) -> None:
    # With overlap, round r's D phases score fakes of G as it was in round r-1 (before that
    # round's step). Checked against the sequential engine: restored to the overlapped run's state
    # after round r-1 but with the G of one round earlier, its round r is the overlapped round r.
    sequential = one_g_two_d_max.engine
    engine = RayEngine(_split(1, 2, feedback="max", overlap=True))
    try:
        states = [engine.state()]
        overlapped = []
        for _ in range(3):  # chunks of one round: the pre-made fakes carry over between chunks
            overlapped.append(engine.run(1).metrics)
            states.append(engine.state())
    finally:
        engine.close()

    def sequential_round(state: dict, g_of: dict) -> dict:
        sequential.load_state({**state, "G": g_of["G"]})
        return sequential.run(1).metrics

    def d_phase(metrics: dict) -> np.ndarray:
        return np.array([metrics[name][0] for name in D_PHASE])

    # Round 0 has no earlier G: fresh fakes, the whole round as in a sequential run.
    fresh = sequential_round(states[0], states[0])
    for name, values in fresh.items():
        np.testing.assert_array_equal(overlapped[0][name], values, err_msg=name)
    for r in (1, 2):
        np.testing.assert_array_equal(d_phase(overlapped[r]), d_phase(sequential_round(states[r], states[r - 1])),
                                      err_msg=f"round {r}")
    # Staleness 0 (overlap ignored) and 2 give other D phases, so the check above can fail.
    for stale, g_of in [(0, states[2]), (2, states[0])]:
        other = d_phase(sequential_round(states[2], g_of))
        assert np.abs(other - d_phase(overlapped[2])).max() > 1e-6, f"staleness {stale}"


def test_softmax_feedback_with_overlap_and_swap(ray_session) -> None:
    # 384 training samples = 6 global batches of 64 per epoch: 20 rounds end in epoch 3.
    engine = RayEngine(_split(1, 2, data={"size": 384}, feedback="softmax", softmax_lambda=2.0,
                              overlap=True, swap_every_epochs=1))
    try:
        first = engine.run(4)
        shards_before = [ray.get(d.__ray_call__.remote(lambda w: w.reals.sampler.rank)) for d in engine.actors[1:]]
        second = engine.run(16)
        shards_after = [ray.get(d.__ray_call__.remote(lambda w: w.reals.sampler.rank)) for d in engine.actors[1:]]
        epochs = ray.get(engine.actors[1].__ray_call__.remote(lambda w: w.reals.sampler.epoch))
    finally:
        engine.close()
    for result in (first, second):
        top = _assert_weighed(result, "softmax", 2.0).max(axis=1)
        assert all(0.5 < w < 1.0 for w in top)  # GMAN between mean and max
    assert second.images_seen == 20 * 64
    assert shards_before == [0, 1]  # first epoch: D i reads shard i
    assert epochs == 3
    assert shards_after == [1, 0]  # MD-GAN rotation every epoch: 3 swaps so far
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(engine.actors[0].param_checksum.remote(), timeout=60)  # close() killed the actors
