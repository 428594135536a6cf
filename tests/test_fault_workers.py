"""Worker loss on real Ray: SIGKILLed and hung worker processes, a lost node, the restart budget.

Jobs run through `Trainer` on the session's Ray instance; one worker process is killed with
SIGKILL, frozen with SIGSTOP or loses its node while it is provably inside a chunk: the test
parks it (`WorkerBase.hold_for_fault_test`) in the middle round of a chunk, with the chunk's
earlier rounds done, and hits it as soon as it says so. No timer races the chunk, which in these
tiny jobs can end within any delay. The other workers meet the loss mid-round. The job must
notice, recreate its workers, restore them from the snapshot and finish with exactly the history
and image count of an uninterrupted run, having redone at most `fault.snapshot_rounds` rounds.
The multi-node case (`ray.cluster_utils.Cluster`) runs in a subprocess of its own: the session's
Ray instance is one per process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ganray.orchestrator.job.fault import FaultError
from ganray.orchestrator.job.trainer import Trainer
from helpers import REPO, small_config
from saboteur import Saboteur, assert_hit_inside_chunk, assert_same_history, sabotaged
from mlflow_server import sqlite_store  # noqa: F401

SNAPSHOT_ROUNDS = 8
TOTAL_ROUNDS = 40  # 2.56 kimg at batch 64


def _config(kind: str, tracking: bool = False, **fault: Any):
    topology = ({"kind": "replicated", "num_workers": 2} if kind == "replicated"
                else {"kind": "split", "num_generators": 1, "num_discriminators": 2})
    return small_config(topology=topology, tracking={"enabled": tracking},
                        schedule={"total_kimg": TOTAL_ROUNDS * 64 / 1000, "batch_size": 64, "sync_kimg": 0.64,
                                  "checkpoint_kimg": 100},
                        resources={"step_timeout_s": 20, "placement_timeout_s": 180},
                        fault={"snapshot_rounds": SNAPSHOT_ROUNDS, "capacity_wait_s": 180, **fault})


@pytest.fixture(scope="module")
def reference(ray_session) -> dict[str, Any]:
    """Uninterrupted runs of both topologies (histories to compare with)."""
    return {kind: Trainer(_config(kind), progress=False).run() for kind in ("replicated", "split")}


def _assert_recovered(result: Any, trainer: Trainer, saboteur: Saboteur, reference: Any) -> None:
    assert saboteur.hit is not None
    assert_hit_inside_chunk(saboteur.hit)
    # Every image once: a round counted twice (or lost) would change the count and the history.
    assert result.images_seen == reference.images_seen == TOTAL_ROUNDS * 64 and not result.stopped_early
    assert trainer.faults is not None and trainer.faults.restarts == 1
    assert trainer.faults.rounds_redone <= SNAPSHOT_ROUNDS
    assert_same_history(result.history, reference)
    # The chunk the victim was parked in was the one lost; what ran before it was kept up to the snapshot.
    assert sum(n for _, n in saboteur.chunks) - TOTAL_ROUNDS == trainer.faults.rounds_redone
    assert saboteur.hit["pid"] not in saboteur.hit["pids_after"]  # the worker was recreated
    print(f"fault report: hit {saboteur.hit}, {trainer.faults.metrics()}, "
          f"wall {result.wall_s:.1f} s vs {reference.wall_s:.1f} s uninterrupted")


@pytest.mark.slow
def test_replicated_worker_sigkilled_mid_chunk(reference: dict[str, Any], sqlite_store: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="ganray")
    box: list[Saboteur] = []
    # Killed in the chunk from round 20 (the snapshot of round 16 is the last): parked mid-round,
    # its D gradients computed; the survivor meets the death inside that round's all-reduce.
    trainer = Trainer(_config("replicated", tracking=True), progress=False,
                      engine_factory=sabotaged(box, tmp_path / "held", victim=1, after=17))
    result = trainer.run()
    _assert_recovered(result, trainer, box[0], reference["replicated"])
    client = MlflowClient(f"sqlite:///{sqlite_store / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(result.run_id, "fault/restarts")] == [1.0]
    tags = client.get_run(result.run_id).data.tags
    assert tags["ganray.fault.last_event"].startswith("restart")
    assert tags["ganray.allreduce"].startswith(("shared memory", "gloo"))  # two replicas reduce
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss/D")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # one point per sync interval, none twice
    assert any("worker lost" in r.getMessage() and "replica 1" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_split_discriminator_sigkilled_mid_chunk(reference: dict[str, Any], tmp_path: Path) -> None:
    box: list[Saboteur] = []
    # Discriminator 1 (actor 2, after the generator), killed between its calls of two rounds of
    # the chunk from round 20 while the driver has later rounds of that chunk in flight.
    trainer = Trainer(_config("split"), progress=False,
                      engine_factory=sabotaged(box, tmp_path / "held", victim=2, after=20))
    result = trainer.run()
    _assert_recovered(result, trainer, box[0], reference["split"])


@pytest.mark.slow
def test_hung_worker_times_out_and_is_replaced(reference: dict[str, Any], tmp_path: Path) -> None:
    config = _config("replicated")
    config.resources.step_timeout_s = 4
    box: list[Saboteur] = []
    # Stopped mid-round in the chunk from round 10: the chunk can only end by the step timeout.
    trainer = Trainer(config, progress=False,
                      engine_factory=sabotaged(box, tmp_path / "held", victim=0, after=9, sig=signal.SIGSTOP))
    try:
        result = trainer.run()
    finally:
        if box and box[0].hit and "pid" in box[0].hit:  # never leave a frozen process behind
            try:
                os.kill(box[0].hit["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    _assert_recovered(result, trainer, box[0], reference["replicated"])


@pytest.mark.slow
def test_restart_budget_spent_stops_with_a_resumable_checkpoint(ray_session, sqlite_store: Path,
                                                                tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator.job.checkpoint import latest_checkpoint

    box: list[Saboteur] = []
    config = _config("replicated", tracking=True, max_restarts=0)
    # Killed mid-chunk in the chunk from round 20: the snapshot of round 16 is the last one.
    trainer = Trainer(config, progress=False, engine_factory=sabotaged(box, tmp_path / "held", victim=0, after=20))
    with pytest.raises(FaultError) as err:
        trainer.run()
    assert "fault.max_restarts=0" in str(err.value) and "--resume" in str(err.value)
    assert_hit_inside_chunk(box[0].hit)
    client = MlflowClient(f"sqlite:///{sqlite_store / 'mlflow.db'}")
    state, meta = latest_checkpoint(client, trainer.run_id, sqlite_store / "dl")
    assert meta["images_seen"] == trainer.keeper.images_seen == 16 * 64  # the last snapshot before the kill
    assert state["progress"]["rounds"] == 16 and client.get_run(trainer.run_id).info.status == "FAILED"
    resumed = Trainer(config, resume=trainer.run_id, progress=False).run()
    assert resumed.images_seen == TOTAL_ROUNDS * 64 and not resumed.stopped_early


CLUSTER_SCRIPT = r'''
import json, os, sys, threading, time
import psutil
import ray
from ray.cluster_utils import Cluster

from ganray.orchestrator.job.config import config_from_dict
from ganray.orchestrator.job.engine import make_engine
from ganray.orchestrator.job.trainer import Trainer

# Quick node-death detection; nodes are added and removed from the main thread (Ray asks that).
fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}
cluster = Cluster(initialize_head=True, connect=True,
                  head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
config = config_from_dict(json.loads(sys.argv[1]))
flag = os.path.abspath("held")
events, box = {}, {}


class Watch:
    # Parks replica 1 in the middle round of the first chunk of 2+ rounds from round 10 on, just
    # before its first gradient all-reduce of that round (`hold_at_round_for_fault_test`); the
    # main thread removes its node while it is parked there, inside the chunk.
    def __init__(self, engine):
        self._engine, self.rounds = engine, 0

    def run(self, n, stop=None):
        if "round" not in events and n >= 2 and self.rounds >= 10:
            events["chunk"], events["round"] = [self.rounds, n], self.rounds + n // 2
            ray.get(self._engine.actors[1].hold_at_round_for_fault_test.remote(events["round"], flag), timeout=60)
        res = self._engine.run(n, stop)
        self.rounds = res.round_index
        return res

    def __getattr__(self, name):
        return getattr(self._engine, name)


trainer = Trainer(config, progress=False, engine_factory=lambda c: Watch(make_engine(c)))


def train():
    try:
        box["result"] = trainer.run()
    except BaseException as err:
        box["error"] = err


t0 = time.monotonic()
thread = threading.Thread(target=train)
thread.start()
while not os.path.exists(flag):
    assert thread.is_alive() and time.monotonic() - t0 < 400, f"replica 1 never parked: {box.get('error')!r}"
    time.sleep(0.01)
events["held"] = json.loads(open(flag).read())
node = next(n for n in list(cluster.worker_nodes) if n.node_id == events["held"]["node_id"])
cluster.remove_node(node, allow_graceful=False)
events["removed_at"] = time.monotonic() - t0
try:
    psutil.Process(events["held"]["pid"]).wait(timeout=60)
except psutil.NoSuchProcess:
    pass
time.sleep(2.0)
cluster.add_node(num_cpus=1)
events["added_at"] = time.monotonic() - t0
thread.join(timeout=480)
if "error" in box:
    raise box["error"]
result = box["result"]
print("RESULT", json.dumps({"images_seen": result.images_seen, "history": result.history,
                            "restarts": trainer.faults.restarts, "rounds_redone": trainer.faults.rounds_redone,
                            "wall_s": time.monotonic() - t0, **events}), flush=True)
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
def test_node_lost_mid_chunk_then_replaced_on_a_cluster(reference: dict[str, Any], tmp_path: Path) -> None:
    config = _config("replicated")
    tree = config.model_dump(mode="json")
    tree["resources"].update({"strategy": "SPREAD", "cpus_per_worker": 1, "step_timeout_s": 30,
                              "placement_timeout_s": 120})
    tree["fault"]["capacity_wait_s"] = 120
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(tree)], capture_output=True, text=True,
                          timeout=540, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    history = report.pop("history")
    print(f"fault report: {report}")
    assert_hit_inside_chunk({**report, "rounds_done": report["held"]["rounds"]})
    assert report["removed_at"] < report["added_at"]
    assert report["images_seen"] == reference["replicated"].images_seen == TOTAL_ROUNDS * 64
    # A loss while recovering (a worker placed on the dying node) is one more restart, with nothing redone.
    assert report["restarts"] >= 1 and report["rounds_redone"] <= SNAPSHOT_ROUNDS
    assert_same_history(history, reference["replicated"])
