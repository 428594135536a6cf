"""`resources.collective: gloo` on one host: the path ranks on different hosts take, tested here.

Two replicas on one host sum through shared memory by default (`auto`); `gloo` puts them on
torch.distributed's gloo, as a multi-host cluster does, with the same losses (the two paths differ
in reduction order at most). On that path a replica SIGKILLed while its peer waits for it inside
a gradient all-reduce must not leave the survivor in the collective until
`resources.step_timeout_s` (the group's timeout too): gloo reports the closed connection at once,
the survivor's chunk call fails, the coordinator's liveness probe finds it answering (so only the
killed replica is named lost), and the job recovers with the history of an uninterrupted run.

The victim is parked (`ReplicaWorker.hold_at_round_for_fault_test`) just before the first
all-reduce of a round in the middle of a chunk, so the hit provably lands inside the collective.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from ganray.orchestrator.job.engine import make_engine
from ganray.orchestrator.job.trainer import Trainer
from ganray.workers.shared_slots import supported as shared_memory_supported
from helpers import small_config
from saboteur import Saboteur, assert_hit_inside_chunk, assert_same_history, sabotaged

SNAPSHOT_ROUNDS = 8
TOTAL_ROUNDS = 24  # 1.536 kimg at batch 64
STEP_TIMEOUT_S = 120.0
# How soon after the kill the coordinator must see the loss: far below STEP_TIMEOUT_S (what a
# survivor stuck in its collective would cost), generous for a loaded 2-core machine.
NOTICED_WITHIN_S = 60.0


def _config(collective: str) -> Any:
    return small_config(topology={"kind": "replicated", "num_workers": 2}, tracking={"enabled": False},
                        schedule={"total_kimg": TOTAL_ROUNDS * 64 / 1000, "batch_size": 64, "sync_kimg": 0.64,
                                  "checkpoint_kimg": 100},
                        resources={"collective": collective, "cpus_per_worker": 0.5,
                                   "step_timeout_s": STEP_TIMEOUT_S, "placement_timeout_s": 180},
                        fault={"snapshot_rounds": SNAPSHOT_ROUNDS, "capacity_wait_s": 180})


def _recording(paths: list[str]):
    """An engine factory that notes how each engine's all-reduces travel (the `ganray.allreduce` tag)."""
    def factory(config: Any) -> Any:
        engine = make_engine(config)
        paths.append(engine.allreduce)
        return engine
    return factory


@pytest.fixture(scope="module")
def runs(ray_session) -> dict[str, tuple[Any, list[str]]]:
    """Uninterrupted 2-replica runs on each path: (result, all-reduce paths of its engines)."""
    out: dict[str, tuple[Any, list[str]]] = {}
    for collective in ("auto", "gloo"):
        paths: list[str] = []
        result = Trainer(_config(collective), progress=False, engine_factory=_recording(paths)).run()
        out[collective] = (result, paths)
    return out


def test_gloo_on_one_host_takes_the_gloo_path_with_the_same_losses(runs: dict[str, tuple[Any, list[str]]]) -> None:
    (auto, auto_paths), (gloo, gloo_paths) = runs["auto"], runs["gloo"]
    assert len(gloo_paths) == 1 and gloo_paths[0].startswith("gloo (2 ranks)"), gloo_paths
    expected_auto = "shared memory on this node" if shared_memory_supported() else "gloo (2 ranks)"
    assert len(auto_paths) == 1 and auto_paths[0].startswith(expected_auto), auto_paths
    assert gloo.images_seen == auto.images_seen == TOTAL_ROUNDS * 64
    assert_same_history(gloo.history, auto)


@pytest.mark.slow
def test_gloo_survivor_leaves_its_collective_when_its_peer_is_killed(
        runs: dict[str, tuple[Any, list[str]]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ganray")
    reference, _ = runs["gloo"]
    box: list[Saboteur] = []
    t0 = time.monotonic()
    trainer = Trainer(_config("gloo"), progress=False,
                      engine_factory=sabotaged(box, tmp_path / "held", victim=1, after=SNAPSHOT_ROUNDS + 1))
    result = trainer.run()
    hit = box[0].hit
    assert hit is not None
    assert_hit_inside_chunk(hit)
    noticed_s = hit["seen_at"] - hit["struck_at"]
    # Only the killed replica is lost: the survivor answered the coordinator's liveness probe,
    # which a replica still inside its chunk call (stuck in the collective) cannot do.
    assert "lost replica 1 (" in hit["seen"] and "replica 0 (" not in hit["seen"], (noticed_s, hit["seen"])
    assert noticed_s < NOTICED_WITHIN_S < STEP_TIMEOUT_S, hit
    # Recovered: every image once, one restart, the history of the uninterrupted run.
    assert result.images_seen == reference.images_seen == TOTAL_ROUNDS * 64 and not result.stopped_early
    assert trainer.faults is not None and trainer.faults.restarts == 1
    assert trainer.faults.rounds_redone <= SNAPSHOT_ROUNDS
    assert_same_history(result.history, reference)
    print(f"gloo loss noticed {noticed_s:.2f} s after the kill ({hit['seen'][:160]}); "
          f"job wall {time.monotonic() - t0:.1f} s, recovered run {result.wall_s:.1f} s vs {reference.wall_s:.1f} s")
