"""Fault tests' saboteur: hurt one worker while it is provably inside a chunk.

`Saboteur` wraps an engine. In the first chunk of two or more rounds that starts at or after
round `after`, it parks worker `victim` at the chunk's middle round (a replica through
`ReplicaWorker.hold_at_round_for_fault_test`, just before that round's first gradient
all-reduce, its peers waiting in the reduce; a split discriminator through `_HoldBeforeRound`,
between its calls of two rounds), and a thread sends the signal as soon as the victim announces
the hold. `hit` records the chunk, the round, what the victim reported, when it was struck and
when and how the engine reported the chunk lost. Used by test_fault_workers.py and
test_collective_gloo.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psutil
import ray

from ganray.orchestrator.job.engine import make_engine
from ganray.workers.worker_base import FAULT_TEST_HOLD_LIMIT_S


class _HoldBeforeRound:
    """Stands in for a split discriminator's actor handle while a chunk is submitted: just before
    its `d_phase` call of round `round_index` it queues `hold_for_fault_test` on the real actor,
    then puts the real handle back. One caller's calls to an actor run in submission order, so
    the discriminator parks after its calls of every earlier round, inside the chunk."""

    def __init__(self, handles: list[Any], index: int, round_index: int, flag: Path) -> None:
        self._handles, self._index, self._real = handles, index, handles[index]
        self._round, self._flag = round_index, flag
        self.d_phase = self  # `d_phase.remote(...)` lands in `remote` below

    def remote(self, round_idx: int, *args: Any) -> Any:
        if round_idx == self._round:
            self._real.hold_for_fault_test.remote(str(self._flag))
            self._handles[self._index] = self._real
        return self._real.d_phase.remote(round_idx, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Saboteur:
    """An engine wrapper that hurts worker `victim` inside the first chunk of two or more rounds
    that starts at or after round `after`.

    The victim is parked in the chunk's middle round (a replica just before that round's first
    gradient all-reduce, its peer waiting in the reduce; a split discriminator between its calls
    of two rounds) and a thread sends it `sig` as soon as it announces the hold, then waits until
    it is dead (or stopped). `hit` records the chunk, the round and what the victim reported."""

    def __init__(self, engine: Any, victim: int, after: int, sig: int, flag: Path) -> None:
        self._engine = engine
        self.victim, self.after, self.sig, self.flag = victim, after, sig, flag
        self.rounds = 0
        self.hit: Optional[dict[str, Any]] = None
        self.chunks: list[tuple[int, int]] = []  # (start round, rounds) of every completed chunk

    def _park(self, round_index: int) -> None:
        if self._engine.layout.kind == "replicated":
            actor = self._engine.actors[self.victim]
            ray.get(actor.hold_at_round_for_fault_test.remote(round_index, str(self.flag)), timeout=30)
        else:  # split: the engine's actors are [*generators, *discriminators]
            job = self._engine._job
            index = self.victim - len(job.gens)
            assert index >= 0, "a split victim must be a discriminator"
            job.discs[index] = _HoldBeforeRound(job.discs, index, round_index, self.flag)

    def _strike(self, chunk_over: threading.Event) -> None:
        assert self.hit is not None
        deadline = time.monotonic() + FAULT_TEST_HOLD_LIMIT_S
        while not self.flag.exists():
            if chunk_over.is_set() or time.monotonic() > deadline:
                self.hit["error"] = "the victim never reached its hold"
                return
            time.sleep(0.005)
        held = json.loads(self.flag.read_text())
        self.hit.update(pid=held["pid"], rounds_done=held["rounds"])
        victim = psutil.Process(held["pid"])
        self.hit["struck_at"] = time.monotonic()
        victim.send_signal(self.sig)
        if self.sig == signal.SIGSTOP:  # a stopped process never exits: wait until it is stopped
            while victim.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            victim.wait(timeout=30)

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> Any:
        striker: Optional[threading.Thread] = None
        chunk_over = threading.Event()
        if self.hit is None and n_rounds >= 2 and self.rounds >= self.after:
            self.hit = {"chunk": (self.rounds, n_rounds), "round": self.rounds + n_rounds // 2}
            self._park(self.hit["round"])
            striker = threading.Thread(target=self._strike, args=(chunk_over,), daemon=True)
            striker.start()
        elif self.hit is not None and "pids_after" not in self.hit:  # the first chunk after recovery
            self.hit["pids_after"] = [ray.get(a.process_info.remote(), timeout=30)["pid"] for a in self._engine.actors]
        try:
            res = self._engine.run(n_rounds, stop_at_images)
        except Exception as err:  # the chunk the hit cost: when and how the engine reported it
            if self.hit is not None and "seen_at" not in self.hit:
                self.hit.update(seen_at=time.monotonic(), seen=str(err))
            raise
        finally:
            chunk_over.set()
            if striker is not None:
                striker.join(timeout=FAULT_TEST_HOLD_LIMIT_S + 60)
        if n_rounds:
            self.chunks.append((self.rounds, res.rounds))
        self.rounds = res.round_index
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def sabotaged(box: list[Saboteur], flag: Path, victim: int, after: int, sig: int = signal.SIGKILL):
    def factory(config: Any) -> Saboteur:
        box.append(Saboteur(make_engine(config), victim, after, sig, flag))
        return box[-1]
    return factory


def assert_hit_inside_chunk(hit: dict[str, Any]) -> None:
    """The victim was parked with k of the chunk's n rounds done, 0 < k < n, when it was hit."""
    assert "error" not in hit, hit
    start, n = hit["chunk"]
    assert start < hit["rounds_done"] == hit["round"] < start + n, hit


def assert_same_history(history: dict[str, list[float]], reference: Any) -> None:
    # Restored exactly: the same losses round by round. (Two Ray runs agree to float32 rounding
    # only, not to the bit: tolerance at that level, far below what a wrong restore would give.)
    assert history.keys() == reference.history.keys()
    for key, values in reference.history.items():
        np.testing.assert_allclose(history[key], values, rtol=1e-4, atol=1e-5, err_msg=key)
