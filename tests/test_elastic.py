"""Elastic `replicated` worlds, in process (the session's Ray instance): a replica lost, the job
goes on with the survivor, and grows back into the bundle Ray keeps for it.

One node here, so the lost replica's bundle stays placed: `grow` starts a newcomer there at
once. The multi-node path (a node lost, its bundle rescheduled onto a node that joins later) is
tests/test_cluster.py's.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from helpers import small_config
from ganray.models.errors import ConfigError
from ganray.orchestrator.job.coordinator import RayEngine
from ganray.orchestrator.job.fault import WorkerLostError

ROUNDS = 20
GROW_LIMIT_S = 180  # bounds a hang: a newcomer's start-up is a torch import and the data


def _config(workers: int, **topology):
    return small_config(topology={"kind": "replicated", "num_workers": workers, **topology},
                        resources={"cpus_per_worker": 0.5})


def _params(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k in ("G", "D", "G_ema") for v in state[k].values()
                      if v.is_floating_point()])


def _grow(engine: RayEngine):
    deadline = time.monotonic() + GROW_LIMIT_S
    while time.monotonic() < deadline:
        resize = engine.grow()
        if resize is not None:
            return resize
        time.sleep(0.2)
    raise AssertionError(f"the job did not grow back within {GROW_LIMIT_S} s")


def test_survivor_trains_on_as_one_replica_and_the_job_grows_back(ray_session) -> None:
    elastic = RayEngine(_config(2, min_workers=1))
    one = two = None
    try:
        elastic.run(3)
        snapshot = elastic.state()
        ray.kill(elastic.actors[1], no_restart=True)
        with pytest.raises(WorkerLostError, match="replica 1"):
            elastic.run(2)
        assert elastic.grow() is None  # nothing joins while the loss is not handled

        shrunk = elastic.shrink()
        assert shrunk is not None and (shrunk.kind, shrunk.before, shrunk.after) == ("shrink", 2, 1)
        assert elastic.worker_count == 1 and elastic.allreduce == "none (one replica)"
        elastic.load_state(snapshot)
        on_survivor = elastic.run(ROUNDS)
        assert on_survivor.images_seen == (3 + ROUNDS) * 64  # the global batch is the full world's

        # The survivor is exactly a fresh 1-replica job loaded with the same snapshot...
        one = RayEngine(_config(1))
        one.load_state(snapshot)
        fresh = one.run(ROUNDS)
        assert on_survivor.metrics == fresh.metrics
        assert torch.equal(_params(elastic.state()), _params(one.state()))
        one.close()
        # ...and stays close to the uninterrupted 2-replica run (only the reduction order differs).
        two = RayEngine(_config(2))
        two.load_state(snapshot)
        two.run(ROUNDS)
        torch.testing.assert_close(_params(elastic.state()), _params(two.state()), rtol=0, atol=1e-4)

        # Ray keeps the lost replica's bundle: a newcomer starts there and joins between chunks.
        grown = _grow(elastic)
        assert (grown.kind, grown.before, grown.after) == ("grow", 1, 2) and elastic.worker_count == 2
        assert "(2 ranks" in elastic.allreduce, elastic.allreduce
        two.load_state(elastic.state())
        after, reference = elastic.run(5), two.run(5)
        np.testing.assert_array_equal(after.metrics["loss/D"], reference.metrics["loss/D"])
        assert torch.equal(_params(elastic.state()), _params(two.state()))
    finally:
        for engine in (elastic, one, two):
            if engine is not None:
                engine.close()


def test_a_job_below_its_minimum_is_not_shrunk(ray_session) -> None:
    engine = RayEngine(_config(2))  # min_workers defaults to num_workers: not elastic
    try:
        ray.kill(engine.actors[0], no_restart=True)
        with pytest.raises(WorkerLostError):
            engine.run(1)
        assert engine.shrink() is None and engine.grow() is None
    finally:
        engine.close()


@pytest.mark.parametrize("topology, message", [
    ({"num_workers": 3, "min_workers": 2}, "does not divide among topology.num_workers=3 workers"),
    ({"num_workers": 4, "min_workers": 3}, "does not divide among 3 workers, a size the elastic range"),
    ({"num_workers": 2, "min_workers": 3}, "topology.min_workers=3 exceeds topology.num_workers=2"),
])
def test_every_size_of_the_elastic_range_must_divide_the_batch(topology, message) -> None:
    with pytest.raises(ConfigError, match=message):
        small_config(topology={"kind": "replicated", **topology})


def test_split_generator_trains_on_against_the_surviving_discriminator_and_the_lost_one_rejoins(ray_session) -> None:
    config = small_config(topology={"kind": "split", "num_generators": 1, "num_discriminators": 2,
                                    "min_discriminators": 1}, resources={"cpus_per_worker": 0.5})
    engine = RayEngine(config)
    try:
        engine.run(3)
        snapshot = engine.state()
        ray.kill(engine.actors[2], no_restart=True)  # generator 0, discriminator 0, discriminator 1
        with pytest.raises(WorkerLostError, match="discriminator 1"):
            engine.run(2)
        shrunk = engine.shrink()
        assert shrunk is not None and (shrunk.before, shrunk.after) == (3, 2) and engine.worker_count == 2
        engine.load_state(snapshot)
        alone = engine.run(4)
        assert "feedback/loss_G/d0" in alone.metrics and "feedback/loss_G/d1" not in alone.metrics
        assert alone.metrics["feedback/weight/d0"] == [1.0] * 4  # G weighs the survivor's feedback alone
        kept = engine.state()  # every state still holds both discriminators: the lost one as it was
        assert sorted(kept["D"]) == ["d0", "d1"]
        assert all(torch.equal(kept["D"]["d1"][k], snapshot["D"]["d1"][k]) for k in snapshot["D"]["d1"])
        assert not all(torch.equal(kept["D"]["d0"][k], snapshot["D"]["d0"][k]) for k in snapshot["D"]["d0"])

        grown = _grow(engine)
        assert (grown.before, grown.after) == (2, 3) and engine.worker_count == 3
        rejoined = engine.state()
        assert all(torch.equal(rejoined["D"]["d1"][k], snapshot["D"]["d1"][k]) for k in snapshot["D"]["d1"])
        assert rejoined["sampler"]["d1"] == rejoined["sampler"]["d0"]  # at the job's data position
        both = engine.run(2)
        assert len(both.metrics["feedback/loss_G/d1"]) == 2 and both.images_seen == (3 + 4 + 2) * 64
    finally:
        engine.close()


def test_a_checkpoint_resumes_at_another_size_of_the_elastic_range(ray_session, mlflow_store) -> None:
    from ganray.orchestrator.job.trainer import Trainer

    def job(workers: int):
        return small_config(topology={"kind": "replicated", "num_workers": workers, "min_workers": 1},
                            schedule={"total_kimg": 1.28, "batch_size": 64, "sync_kimg": 0.32,
                                      "checkpoint_kimg": 100, "sample_kimg": 100},
                            resources={"num_cpus": None, "cpus_per_worker": 0.5})

    first = Trainer(job(2), progress=False, stop_at_kimg=0.64).run()
    assert first.stopped_early and first.images_seen == 640
    rest = Trainer(job(1), progress=False, resume=first.run_id).run()  # the two samplers' position, one replica
    assert rest.run_id == first.run_id and rest.images_seen == 1280
    # The resumed replica read on where the two left off: its losses are a 1-replica job's from
    # the same checkpoint, so they continue the 2-replica run within the reduction order.
    full = Trainer(job(2), progress=False).run()
    assert len(rest.history["loss/D"]) == 10
    assert max(abs(a - b) for a, b in zip(rest.history["loss/D"], full.history["loss/D"][10:])) < 1e-4
