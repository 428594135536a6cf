"""Where the training loop stands: progress, the per-round history, and the window of the next metric point.

A metric point holds the mean over its rounds of every statistic the engine returned, under the
name the round gave it (`ganray.workers.stats`: "loss/D", "D/real_score", ...): the loop keeps
no list of names. The loop adds its own timings and throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ganray.orchestrator.job.engine import ChunkResult


@dataclass
class LoopState:
    """Progress, per-round history (what `TrainResult.history` returns) and the open metric window."""

    images_seen: int
    rounds: int
    start_round: int
    history: dict[str, list[float]] = field(default_factory=dict)
    window: dict[str, list[float]] = field(default_factory=dict)
    window_rounds: int = 0   # rounds in `window` (the last ones before `rounds`)
    exec_rounds: int = 0     # rounds executed since the last point, redone ones included (throughput)
    dt: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0
    last_logged_step: int = -1

    def absorb(self, res: ChunkResult, dt: float) -> None:
        for key, values in res.metrics.items():
            self.history.setdefault(key, []).extend(values)
            self.window.setdefault(key, []).extend(values)
        self.window_rounds += res.rounds
        self.exec_rounds += res.rounds
        self.dt += dt
        self.compute_s += res.time_compute_s
        self.comm_s += res.time_comm_s
        self.wait_s += res.time_wait_s or max(0.0, dt - res.time_compute_s - res.time_comm_s)
        self.images_seen, self.rounds = res.images_seen, res.round_index

    def rewind(self, round_index: int, images_seen: int) -> None:
        """Back to `round_index` (a restored snapshot): later rounds' records are dropped."""
        keep = max(0, round_index - self.start_round)
        for values in self.history.values():
            del values[keep:]
        keep_window = max(0, round_index - (self.rounds - self.window_rounds))
        for values in self.window.values():
            del values[keep_window:]
        self.window_rounds = keep_window
        self.rounds, self.images_seen = round_index, images_seen

    def take_point(self, images_per_round: int) -> Optional[dict[str, float]]:
        """Close the window: its metric point at `images_seen`, or None when there is nothing new
        to log (an empty window, or redone rounds of an interval already logged)."""
        window, rounds, exec_rounds, dt = self.window, self.window_rounds, self.exec_rounds, self.dt
        timings = {"time/compute_s": self.compute_s, "time/comm_s": self.comm_s, "time/wait_s": self.wait_s}
        self.window, self.window_rounds, self.exec_rounds = {}, 0, 0
        self.dt = self.compute_s = self.comm_s = self.wait_s = 0.0
        if not rounds or self.images_seen <= self.last_logged_step:
            return None
        point = {key: sum(values) / len(values) for key, values in window.items() if values}
        point["perf/samples_per_s"] = exec_rounds * images_per_round / max(dt, 1e-9)
        point.update(timings)
        point["kimg"] = self.images_seen / 1000.0
        self.last_logged_step = self.images_seen
        return point
