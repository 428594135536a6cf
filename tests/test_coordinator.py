"""The Ray coordinator with the `replicated` topology: equivalence with `local`, state, placement.

Real Ray (the session's `ray_session` instance), tiny MLP configs without BatchNorm. Actor
start-up (a torch import per actor) dominates the time, so the replica engines are shared by
module-scoped fixtures and each test uses what it needs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray

from helpers import small_config
from ganray.models.errors import DataError
from ganray.orchestrator.errors import PlacementError
from ganray.orchestrator.job.coordinator import RayEngine
from ganray.orchestrator.job.engine import LocalEngine


def _replicated(workers: int, **sections):
    return small_config(topology={"kind": "replicated", "num_workers": workers}, **sections)


def _losses(result) -> np.ndarray:
    return np.stack([result.metrics["loss/D"], result.metrics["loss/G"]])


@pytest.fixture(scope="module")
def one_worker_run(ray_session):
    """50 rounds of a 1-replica job (and the engine, closed at the end of the module)."""
    engine = RayEngine(_replicated(1))
    result = engine.run(50)
    yield engine, result
    engine.close()


@pytest.fixture(scope="module")
def two_workers(ray_session):
    """A 2-replica engine and its initial state (tests rewind to it, so their order is free)."""
    engine = RayEngine(_replicated(2))
    yield engine, engine.state()
    engine.close()


def test_one_replica_reproduces_local(one_worker_run) -> None:
    _, ray_result = one_worker_run
    local = LocalEngine(small_config()).run(50)
    assert ray_result.rounds == 50 and ray_result.images_seen == 50 * 64 == local.images_seen
    np.testing.assert_allclose(_losses(ray_result), _losses(local), rtol=0, atol=1e-5)
    for key in ("D/real_score", "D/fake_score", "grad_norm/D", "grad_norm/G"):
        np.testing.assert_allclose(ray_result.metrics[key], local.metrics[key], rtol=0, atol=1e-5)
    # Training moved the losses: the comparison is not between two constant sequences.
    assert np.ptp(ray_result.metrics["loss/D"]) > 1e-3


def test_two_replicas_match_one_and_restore_exactly(one_worker_run, two_workers) -> None:
    _, one = one_worker_run
    two_workers, initial = two_workers
    two_workers.load_state(initial)
    first = two_workers.run(20)
    assert first.rounds == 20 and first.images_seen == 20 * 64  # the global batch, not per replica
    np.testing.assert_allclose(_losses(first), _losses(one)[:, :20], rtol=0, atol=1e-4)
    assert first.time_comm_s > 0.0  # the all-reduce ran, and was timed apart from compute
    # The workers time their own compute; the driver's wall also holds the Ray calls around it.
    assert first.time_compute_s > 0.0 and first.time_wait_s > 0.0

    # state()/load_state(): continuing after a restore equals continuing without one.
    state = two_workers.state()
    assert set(state) >= {"G", "D", "G_ema", "opt_G", "opt_D", "progress", "sampler", "rng"}
    assert set(state["sampler"]) == {"rank0", "rank1"}
    assert state["progress"]["images_seen"] == 20 * 64
    uninterrupted = two_workers.run(10)
    two_workers.load_state(state)
    resumed = two_workers.run(10)
    assert resumed.images_seen == uninterrupted.images_seen == 30 * 64
    np.testing.assert_array_equal(_losses(resumed), _losses(uninterrupted))


def test_two_replicas_with_instance_noise_match_local(ray_session) -> None:
    # The noise on D's inputs is drawn for the global batch and sliced by rank, like z.
    loss = {"instance_noise": 0.5, "instance_noise_kimg": 1.0, "r1_gamma": 0.1, "r1_interval": 2}
    engine = RayEngine(_replicated(2, loss=loss))
    try:
        result = engine.run(20)
    finally:
        engine.close()
    local = LocalEngine(small_config(loss=loss)).run(20)
    plain = LocalEngine(small_config(loss={"r1_gamma": 0.1, "r1_interval": 2})).run(20)
    np.testing.assert_allclose(_losses(result), _losses(local), rtol=0, atol=1e-4)
    assert np.abs(_losses(local) - _losses(plain)).max() > 1e-3  # the noise was there


# R2 (lazy, on the D steps R1 is due) and the relativistic pairing loss: each written once in
# the round table, so they hold in every topology.
R2_ON = {"r1_gamma": 0.1, "r2_gamma": 0.2, "r1_interval": 2}
RELATIVISTIC = {"kind": "relativistic"}


@pytest.mark.parametrize("loss", [R2_ON, RELATIVISTIC], ids=["r2", "relativistic"])
def test_one_replica_reproduces_local_with_r2_and_relativistic(ray_session, loss) -> None:
    engine = RayEngine(_replicated(1, loss=loss))
    try:
        result = engine.run(20)
    finally:
        engine.close()
    local = LocalEngine(small_config(loss=loss)).run(20)
    assert set(result.metrics) == set(local.metrics)
    for key in local.metrics:
        np.testing.assert_allclose(result.metrics[key], local.metrics[key], rtol=0, atol=1e-5, err_msg=key)
    assert np.ptp(result.metrics["loss/G"]) > 1e-3
    if "r2_gamma" in loss:
        assert max(result.metrics["loss/R2"]) > 0 and result.metrics["loss/R2"][1] == 0.0  # lazy


def test_two_replicas_pair_their_own_rows_like_local(ray_session) -> None:
    # Fake j pairs with real j of the global batch: each replica holds the same rows of both.
    loss = {**RELATIVISTIC, **R2_ON}
    engine = RayEngine(_replicated(2, loss=loss))
    try:
        result = engine.run(20)
    finally:
        engine.close()
    local = LocalEngine(small_config(loss=loss)).run(20)
    np.testing.assert_allclose(_losses(result), _losses(local), rtol=0, atol=1e-4)


def test_engine_says_how_its_replicas_all_reduce(one_worker_run, two_workers) -> None:
    from ganray.workers.shared_slots import supported

    one, _ = one_worker_run
    two, _ = two_workers
    assert one.allreduce == "none (one replica)"
    # Both replicas run on this one node, so they sum through shared memory where it exists.
    assert two.allreduce.startswith("shared memory" if supported() else "gloo"), two.allreduce
    assert LocalEngine(small_config()).allreduce == "none (one process)"


def test_replica_divergence_refuses_checkpoint(two_workers) -> None:
    # Perturb replica 1 only; the checksum comparison inside state() must name the replicas.
    def bump(worker):
        for p in worker.stepper.gen.G.parameters():
            p.data.add_(1.0)
            break

    two_workers, _ = two_workers
    state = two_workers.state()
    ray.get(two_workers.actors[1].__ray_call__.remote(bump))
    with pytest.raises(RuntimeError, match="replica 0.*replica 1"):
        two_workers.state()
    two_workers.load_state(state)  # load_state brings the replicas back into agreement
    assert two_workers.state()["progress"] == state["progress"]


def test_generator_state_and_hyper_reach_the_workers(one_worker_run) -> None:
    engine, _ = one_worker_run
    g_state = engine.generator_state()
    assert g_state and all(v.device.type == "cpu" for v in g_state.values())
    engine.set_hyper({"g_lr": 1e-3, "d_lr": 2e-3})
    engine.scale_lr(0.5)
    lrs = ray.get(engine.actors[0].__ray_call__.remote(
        lambda w: (w.stepper.gen.opt.param_groups[0]["lr"], w.stepper.disc.opt.param_groups[0]["lr"])))
    assert lrs == pytest.approx((5e-4, 1e-3))


def _live_groups() -> set[str]:
    return {pid for pid, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_unplaceable_workers_fail_fast_and_leave_no_group(ray_session) -> None:
    before = _live_groups()
    config = _replicated(2, resources={"cpus_per_worker": 64, "placement_timeout_s": 2})
    with pytest.raises(PlacementError) as err:
        RayEngine(config)
    message = str(err.value)
    assert "128 CPUs" in message and "strategy PACK" in message  # what was asked
    assert f"{ray.cluster_resources()['CPU']:g} CPUs" in message    # what the cluster has
    assert "\n" not in message
    assert _live_groups() <= before
    assert ray.is_initialized()  # the engine never shuts down a Ray instance it did not start


def test_trainer_start_up_failures_release_what_the_other_half_started(ray_session, mlflow_store) -> None:
    """The Trainer opens the MLflow run in a helper thread while it starts the Ray workers: a
    store that does not answer leaves no workers behind, and workers that cannot be placed
    leave the already opened run FAILED."""
    from mlflow import MlflowClient

    from ganray.orchestrator.errors import TrackingError
    from ganray.orchestrator.job.trainer import Trainer
    from helpers import free_port

    before = _live_groups()
    with pytest.raises(TrackingError, match="--tracking-uri"):
        Trainer(_replicated(1, tracking={"enabled": True}), tracking_uri=f"http://127.0.0.1:{free_port()}",
                progress=False)
    assert _live_groups() <= before

    started: list[str] = []
    config = _replicated(2, tracking={"enabled": True}, resources={"cpus_per_worker": 64, "placement_timeout_s": 2})
    with pytest.raises(PlacementError, match="128 CPUs"):
        Trainer(config, progress=False, on_run_id=started.append)
    assert len(started) == 1 and _live_groups() <= before
    uri = f"sqlite:///{mlflow_store / 'mlflow.db'}"
    assert MlflowClient(uri).get_run(started[0]).info.status == "FAILED"


def test_a_workers_data_error_reaches_the_user_as_is(ray_session, tmp_path) -> None:
    """Workers load their own data; a bad path must still be a one-line DataError (exit 2)."""
    config = _replicated(1, data={"name": "parquet", "path": str(tmp_path / "missing")})
    with pytest.raises(DataError, match="does not exist"):
        RayEngine(config)


def test_engine_inside_a_placement_group_uses_it(ray_session) -> None:
    """As in a Tune trial: the coordinator runs in a task that sits in a placement group."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)

    # Self-contained (imports inside, config as an argument): the test module is not importable
    # on Ray's workers, only the ganray package is.
    @ray.remote(num_cpus=1)
    def trial(config) -> tuple[list[float], int]:
        import ray as ray_in_trial
        from ganray.orchestrator.job.coordinator import RayEngine as Engine

        engine = Engine(config)
        try:
            table = ray_in_trial.util.placement_group_table().values()
            return engine.run(3).metrics["loss/D"], sum(1 for g in table if g["state"] == "CREATED")
        finally:
            engine.close()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    try:
        losses, groups_seen = ray.get(trial.options(scheduling_strategy=strategy).remote(_replicated(1)),
                                      timeout=300)
    finally:
        remove_placement_group(pg)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The worker went into the trial's group: no second group was reserved meanwhile. (The
    # module's shared engines each hold one group, hence the comparison with the table.)
    others = sum(1 for g in ray.util.placement_group_table().values() if g["state"] == "CREATED")
    assert groups_seen == others + 1


def test_trainer_runs_a_replicated_job_end_to_end(ray_session) -> None:
    from ganray.orchestrator.job.trainer import Trainer

    config = _replicated(2, tracking={"enabled": False},
                         schedule={"total_kimg": 1.28, "batch_size": 64, "sync_kimg": 0.32})
    result = Trainer(config, progress=False).run()
    assert result.run_id is None and not result.stopped_early
    assert result.images_seen == 1280 and result.rounds == 20
    assert len(result.history["loss/D"]) == 20
    assert all(math.isfinite(x) for x in result.history["loss/G"]) and np.ptp(result.history["loss/G"]) > 1e-3
    # The final evaluation ran on the generator fetched from rank 0: grid25's three figures.
    assert set(result.eval) == {"modes", "hq", "kl"}
