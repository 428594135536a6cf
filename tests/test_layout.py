"""The layout resolved once from the config: worker specs, batch parts, bundles, Tune's reservation."""

from __future__ import annotations

import pytest

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.layout import DISCRIMINATOR, GENERATOR, REPLICA, WorkerSpec
from helpers import small_config


def test_local_has_no_worker_actors_and_reserves_its_threads() -> None:
    layout = small_config(resources={"threads_per_worker": 2, "gpus_per_worker": 0.5}).layout
    assert layout.kind == "local" and layout.workers == () and layout.bundles() == []
    assert layout.batch_parts == 1 and layout.per_worker_batch == 64
    assert layout.describe() == "local"
    factory = layout.tune_resources()
    assert factory.bundles == [{"CPU": 2.0, "GPU": 0.5}] and not factory.head_bundle_is_empty


def test_replicated_specs_in_rank_order() -> None:
    config = small_config(topology={"kind": "replicated", "num_workers": 4}, resources={"cpus_per_worker": 0.5})
    layout = config.layout
    assert layout.workers == tuple(WorkerSpec(REPLICA, r, r, 0.5, 0.0) for r in range(4))
    assert layout.batch_parts == 4 and layout.per_worker_batch == 16
    assert layout.bundles() == [{"CPU": 0.5}] * 4
    assert layout.describe() == "replicated x4"
    factory = layout.tune_resources()
    assert factory.head_bundle_is_empty and factory.bundles == [{"CPU": 0.5}] * 4
    assert factory.required_resources == {"CPU": 2.0}


def test_replicated_defaults_to_one_worker() -> None:
    layout = small_config(topology={"kind": "replicated"}).layout
    assert [s.role for s in layout.workers] == [REPLICA] and layout.batch_parts == 1


def test_split_places_generators_first_with_their_role_resources() -> None:
    config = small_config(topology={"kind": "split", "num_generators": 2, "num_discriminators": 4,
                                    "feedback": "softmax", "overlap": True},
                          resources={"generator": {"cpus": 2, "gpus": 0}, "strategy": "SPREAD"})
    layout = config.layout
    assert [(s.role, s.rank, s.index) for s in layout.workers] == [
        (GENERATOR, 0, 0), (GENERATOR, 1, 1), (DISCRIMINATOR, 0, 2), (DISCRIMINATOR, 1, 3),
        (DISCRIMINATOR, 2, 4), (DISCRIMINATOR, 3, 5)]
    assert [s.cpus for s in layout.workers] == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0]  # Ds: the per-worker default
    assert layout.batch_parts == 4 and layout.per_worker_batch == 16
    assert layout.split is not None and layout.split.feedback == "softmax" and layout.split.overlap
    assert layout.split.softmax_lambda == 1.0 and layout.split.swap_every_epochs == 0  # documented defaults
    assert layout.describe() == "split 2G+4D (softmax)"
    assert layout.cpu_keys == ("resources.generator.cpus", "resources.cpus_per_worker")
    factory = layout.tune_resources()
    assert factory.bundles == [{"CPU": 2.0}] * 2 + [{"CPU": 1.0}] * 4 and factory.strategy == "SPREAD"


def test_a_worker_asking_nothing_still_takes_a_sliver() -> None:
    layout = small_config(topology={"kind": "replicated", "num_workers": 2}, resources={"cpus_per_worker": 0}).layout
    assert layout.bundles() == [{"CPU": 0.01}] * 2
    assert layout.workers[0].actor_resources() == {"num_cpus": 0.01, "num_gpus": 0.0}


@pytest.mark.parametrize("topology, batch, needle", [
    ({"kind": "replicated", "num_workers": 3}, 64, "among topology.num_workers=3 workers; use a multiple of 3"),
    ({"kind": "split", "num_discriminators": 3}, 64, "among topology.num_discriminators=3"),
    ({"kind": "split", "num_generators": 3, "num_discriminators": 1}, 64, "among topology.num_generators=3"),
])
def test_batch_that_does_not_divide_is_one_line(topology: dict, batch: int, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        small_config(topology=topology, schedule={"batch_size": batch})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_packs_must_fit_each_workers_share() -> None:
    with pytest.raises(ConfigError, match=r"model.pack=3 needs a batch per replica that is a multiple of 3 \(got 32\)"):
        small_config(topology={"kind": "replicated", "num_workers": 2}, model={"pack": 3})
    small_config(topology={"kind": "replicated", "num_workers": 2}, model={"pack": 4})
    with pytest.raises(ConfigError, match="model.pack=2 applies to the built-in discriminators"):
        small_config(model={"pack": 2, "discriminator": "pkg.mod:MyD"})


def test_cuda_workers_must_reserve_a_gpu() -> None:
    with pytest.raises(ConfigError, match="each replica reserves no GPU.*resources.gpus_per_worker"):
        small_config(topology={"kind": "replicated", "num_workers": 2}, resources={"device": "cuda"})
    with pytest.raises(ConfigError, match="each discriminator reserves no GPU.*resources.discriminator.gpus"):
        small_config(topology={"kind": "split"}, resources={"device": "cuda", "gpus_per_worker": 1,
                                                            "discriminator": {"cpus": 1, "gpus": 0}})
    small_config(topology={"kind": "replicated"}, resources={"device": "cuda", "gpus_per_worker": 0.5})


def test_layout_follows_a_reassigned_section() -> None:
    config = small_config()
    config.topology = {"kind": "replicated", "num_workers": 2}
    assert config.layout.count(REPLICA) == 2
