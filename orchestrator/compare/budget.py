"""A wall-clock budget for one training job, kept outside the training loop.

`ganray compare` gives every learner the same seconds of training. The Trainer takes an engine
factory; `BudgetEngine` wraps the engine `make_engine` builds and answers "no rounds" once the
budget is spent, which the loop treats as the end of training (a final evaluation, a final
checkpoint, the run closed as FINISHED, `stopped_early` set). Chunks are shortened to the time
left from the measured seconds per round, so a learner overshoots its budget only by what its
last chunk took beyond that estimate (about a round on a quiet machine; more when other work
shares the cores); chunk sizes never change what a round computes, only how often the loop looks up.

It also keeps the sampling module's state at fixed image counts (`capture_at`): chunks end there,
and since training is deterministic whatever the chunking, the state after N images of a longer
run is the state a run stopped at N images ends with (the learning-rate schedule and the EMA
count images, not the run's length). That gives the "same number of images seen" table without
training anything twice.

The clock starts at the first chunk that trains (after the engine holds its start state) and
`train_s` is the wall time from there to the end of the last chunk, so start-up (Ray actors,
imports) and the final evaluation are not training time, while whatever the loop does between
chunks (metric points, sample plots, checkpoints) is, as it is for `ganray train`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

from ganray.orchestrator.job.engine import ChunkResult, Engine, make_engine


class BudgetEngine:
    """An engine that trains for at most `budget_s` seconds (None: no limit), timing itself."""

    def __init__(self, inner: Engine, budget_s: Optional[float], capture_at: tuple[int, ...] = ()) -> None:
        self._inner = inner
        self.budget_s = budget_s
        self._capture_at = sorted(set(int(n) for n in capture_at if n > 0))
        self.captures: dict[int, tuple[int, dict[str, Any]]] = {}  # wanted images -> (images seen, state)
        self._images_per_round: Optional[float] = None
        self._started: Optional[float] = None
        self._ended: Optional[float] = None
        self._per_round: Optional[float] = None
        self._last: Optional[ChunkResult] = None
        self.out_of_time = False

    def __getattr__(self, name: str) -> Any:
        # Everything but `run` is the wrapped engine's (state, generator_state, actors, close...).
        return getattr(self._inner, name)

    @property
    def train_s(self) -> float:
        """Wall seconds from the first training chunk to the end of the last one."""
        if self._started is None or self._ended is None:
            return 0.0
        return self._ended - self._started

    def _left(self, now: float) -> Optional[float]:
        if self.budget_s is None or self._started is None:
            return None
        return self.budget_s - (now - self._started)

    def run(self, n_rounds: int, stop_at_images: Optional[int] = None) -> ChunkResult:
        if n_rounds <= 0:  # the loop asks where the engine stands: not training
            self._last = self._inner.run(n_rounds, stop_at_images)
            return self._last
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        left = self._left(now)
        if left is not None and left <= 0 and self._last is not None:
            self.out_of_time = True
            return ChunkResult(rounds=0, images_seen=self._last.images_seen, round_index=self._last.round_index)
        if left is not None and self._per_round is not None:
            n_rounds = max(1, min(n_rounds, math.ceil(left / self._per_round)))
        n_rounds = self._to_next_capture(n_rounds)
        before = self._last
        res = self._inner.run(n_rounds, stop_at_images)
        self._ended = time.perf_counter()
        if res.rounds > 0:
            now_per_round = (self._ended - now) / res.rounds
            self._per_round = now_per_round if self._per_round is None else 0.5 * (self._per_round + now_per_round)
            if before is not None:
                self._images_per_round = (res.images_seen - before.images_seen) / res.rounds
        self._last = res
        self._capture(res.images_seen)
        return res

    def _to_next_capture(self, n_rounds: int) -> int:
        """End the chunk where the next capture is due."""
        if not self._capture_at or self._last is None:
            return n_rounds
        if not self._images_per_round:
            return 1  # one round measures the images per round (the Trainer's first chunk is one anyway)
        upcoming = [n for n in self._capture_at if n > self._last.images_seen]
        if not upcoming:
            return n_rounds
        return max(1, min(n_rounds, math.ceil((upcoming[0] - self._last.images_seen) / self._images_per_round)))

    def _capture(self, images_seen: int) -> None:
        # The state of the first round boundary at or past each wanted count (no capture is
        # skipped: a chunk ends at the next one once the images per round are known).
        passed = [n for n in self._capture_at if n <= images_seen]
        if not passed:
            return
        state = {k: v.detach().cpu().clone() for k, v in self._inner.generator_state().items()}
        for wanted in passed:
            self.captures[wanted] = (images_seen, state)
        self._capture_at = [n for n in self._capture_at if n > images_seen]


def budget_engine_factory(budget_s: Optional[float], capture_at: tuple[int, ...],
                          keep: Callable[[BudgetEngine], None]) -> Callable[[Any], BudgetEngine]:
    """An engine factory for `Trainer(engine_factory=...)`: the config's engine under a budget;
    `keep` receives the wrapper so the caller can read `train_s` and `captures` after the run."""

    def factory(config: Any) -> BudgetEngine:
        engine = BudgetEngine(make_engine(config), budget_s, capture_at)
        keep(engine)
        return engine

    return factory
