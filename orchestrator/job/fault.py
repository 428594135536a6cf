"""Fault tolerance for the training loop: state snapshots, divergence rollback, worker-loss recovery.

A cluster-scale job runs for days on machines that fail; it may lose at most one snapshot
interval of work and must never corrupt what it stored. The pieces here are driven by
`trainer.Trainer`, through the `Engine` interface only, so every topology gets them alike:

- `SnapshotKeeper`: every `fault.snapshot_rounds` rounds the loop keeps the latest good job state
  through `engine.snapshot()` (in the driver for `local`; in Ray's object store, owned by the
  driver, for Ray engines, where it survives the loss of any worker or worker node). The loop
  ends chunks exactly at snapshot boundaries (`plan_chunk`), so a failure redoes at most
  `snapshot_rounds` rounds.
- `FaultPolicy`: `fault.max_nonfinite` rounds in a row with a skipped (non-finite) step (the
  round statistic `SKIPPED`) roll the job back to the last snapshot with learning rates scaled
  by `fault.lr_backoff`; lost workers are recreated up to `fault.max_restarts` times. Past either budget the job stops with `FaultError`
  (one line, exit 2) after saving a resumable checkpoint.
- `is_worker_loss` / `recover_workers`: which exceptions mean "a worker is gone or hung" (Ray's
  actor/node death errors, a step timeout, `WorkerLostError` raised by an engine), and recovery
  through `engine.restart_workers(wait_s)`, waiting for capacity up to `fault.capacity_wait_s`.
- `ChunkClock`: bounds a chunk's wall time, so a SIGTERM is noticed well within `fault.grace_s`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ganray.models.errors import GanrayError
from ganray.workers.stats import SKIPPED

log = logging.getLogger("ganray")

# Exception class names (Ray's, matched by name so `local` never imports Ray) that mean a worker
# process or its node is gone: the work in flight is lost, the job itself is fine.
_LOSS_NAMES = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError",
    "NodeDiedError", "WorkerCrashedError", "OwnerDiedError", "ObjectLostError",
    "ObjectReconstructionFailedError", "ObjectFetchTimedOutError", "GetTimeoutError",
    "LocalRayletDiedError",
})
# Chunk wall time as a fraction of `fault.grace_s`: the rest of the grace period is for the
# final checkpoint and its upload.
_GRACE_SHARE = 0.25
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WorkerLostError(RuntimeError):
    """Raised by an engine when one of its workers died or hung (the job can be recovered)."""


class FaultError(GanrayError):
    """The job cannot continue (workers lost or divergence past the configured budget)."""


def is_worker_loss(exc: BaseException) -> bool:
    """True when `exc` means a worker died, its node went away or it hung (not a user/code error).

    A `TimeoutError` is what the coordinator raises for a call slower than
    `resources.step_timeout_s` (a hung worker). A `RayTaskError` counts when its cause is itself
    a loss (a surviving worker whose collective broke because its peer died is reported by
    the engine as `WorkerLostError`).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (WorkerLostError, TimeoutError)):
            return True
        if any(cls.__name__ in _LOSS_NAMES for cls in type(exc).__mro__):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__  # RayTaskError keeps the original in .cause
    return False


@dataclass
class Snapshot:
    """One kept state: where it was taken, and the engine's handle to it (`engine.snapshot()`)."""

    round_index: int
    images_seen: int
    handle: Any
    taken_at: float


class SnapshotLostError(RuntimeError):
    """The kept snapshot cannot be read back (its object was lost with the node that held it)."""


class SnapshotKeeper:
    """Keeps the latest good engine state every `every_rounds` rounds (one snapshot at a time).

    Where a snapshot lives is the engine's business (`Engine.snapshot` / `read_snapshot`): a
    plain dict in the driver for `local`, an object in Ray's object store owned by the driver
    (so it outlives any worker) for the Ray engines.
    """

    def __init__(self, every_rounds: int) -> None:
        self.every = max(1, int(every_rounds))
        self.latest: Optional[Snapshot] = None
        self.taken = 0
        self.seconds = 0.0  # time spent taking snapshots (reported as an overhead)

    @property
    def round_index(self) -> int:
        return self.latest.round_index if self.latest else 0

    @property
    def images_seen(self) -> int:
        return self.latest.images_seen if self.latest else 0

    def due(self, round_index: int) -> bool:
        """A snapshot boundary (an absolute multiple of `every`) not yet snapshotted."""
        return round_index % self.every == 0 and (self.latest is None or round_index != self.latest.round_index)

    def take(self, engine: Any, round_index: int, images_seen: int) -> Snapshot:
        t0 = time.perf_counter()
        handle = engine.snapshot()
        # Dropping the previous handle frees its object-store copy (reference counting).
        self.latest = Snapshot(round_index, images_seen, handle, time.time())
        self.taken += 1
        self.seconds += time.perf_counter() - t0
        return self.latest

    def state(self, engine: Any) -> dict[str, Any]:
        """The kept state as a dict (e.g. to save it as a checkpoint)."""
        if self.latest is None:
            raise SnapshotLostError("no snapshot was taken")
        try:
            return engine.read_snapshot(self.latest.handle)
        except SnapshotLostError as lost:
            raise SnapshotLostError(f"the snapshot at round {self.latest.round_index}: {lost}") from lost

    def restore(self, engine: Any, keep_hyper: bool = True) -> Snapshot:
        """Load the kept state into `engine` (all workers); returns the snapshot restored."""
        if self.latest is None:
            raise SnapshotLostError("no snapshot was taken")
        engine.load_state(self.state(engine), keep_hyper=keep_hyper)
        return self.latest


class FaultPolicy:
    """Counts the job's fault events against `fault.*` budgets and keeps the learning-rate scale.

    Rollbacks: `max_nonfinite` skipped rounds in a row trigger one. Rolling back to the same
    snapshot again and again means the divergence is not a fluke the lower learning rate cures;
    after `max_restarts + 1` rollbacks with no new good snapshot in between, the job stops.
    Restarts (worker loss): at most `max_restarts` over the whole job.
    """

    def __init__(self, fault_cfg: Any) -> None:
        self.cfg = fault_cfg
        self.rollbacks = 0
        self.restarts = 0
        self.rounds_redone = 0
        self.resizes = 0  # elastic shrinks and grows: never counted against max_restarts
        self.lr_scale = 1.0
        self.streak = 0  # rounds in a row with a skipped (non-finite) step
        self._rollbacks_here = 0
        self._rollback_round: Optional[int] = None

    def observe(self, rounds: int, metrics: dict[str, list[float]], nonfinite_run: int) -> bool:
        """Update the streak of rounds with a skipped step from one chunk; True when it diverged.

        The streak is counted here from the chunk's per-round `SKIPPED` statistic (not the
        workers' own counter) so that a restore resets it: the replayed rounds start a fresh count.
        """
        skipped = metrics.get(SKIPPED)
        if skipped is None or len(skipped) != rounds:  # an engine without the per-round record
            self.streak = nonfinite_run
        else:
            tail = 0
            for value in reversed(skipped):
                if not value:
                    break
                tail += 1
            self.streak = self.streak + tail if tail == rounds else tail
        return self.streak >= self.cfg.max_nonfinite

    def reset_streak(self) -> None:
        self.streak = 0

    def on_snapshot(self) -> None:
        """A new good snapshot: training got past whatever diverged."""
        self._rollbacks_here = 0
        self._rollback_round = None

    def note_rollback(self, snapshot_round: int, redone: int) -> None:
        if self._rollback_round != snapshot_round:
            self._rollback_round, self._rollbacks_here = snapshot_round, 0
        self._rollbacks_here += 1
        if self._rollbacks_here > self.cfg.max_restarts + 1:
            raise FaultError(
                f"training diverged {self._rollbacks_here} times in a row from the snapshot at round {snapshot_round} "
                f"even with learning rates scaled to {self.lr_scale:g}x; lower schedule.g_lr/d_lr, check the data "
                f"for NaNs, or raise fault.max_restarts; resume from the last checkpoint with --resume")
        self.rollbacks += 1
        self.rounds_redone += redone
        self.lr_scale *= self.cfg.lr_backoff

    def note_restart(self, redone: int) -> None:
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts:
            raise FaultError(
                f"workers were lost {self.restarts} times, more than fault.max_restarts={self.cfg.max_restarts}; "
                "the last snapshot is saved as a checkpoint: fix the cluster and continue with "
                "`ganray train CONFIG --resume RUN_ID`")
        self.rounds_redone += redone

    def metrics(self) -> dict[str, float]:
        return {"fault/rollbacks": float(self.rollbacks), "fault/restarts": float(self.restarts),
                "fault/rounds_redone": float(self.rounds_redone), "fault/lr_scale": float(self.lr_scale),
                "fault/resizes": float(self.resizes)}


def brief(err: BaseException) -> str:
    """The informative line of an exception (torch's load_state_dict puts it on the second line)."""
    # Ray colours the task name in its error text: no terminal codes in a log line or a tag.
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line if len(line) <= 300 else line[:297] + "..."


def roll_back(engine: Any, keeper: SnapshotKeeper, policy: FaultPolicy, backoff: float, rounds_now: int,
              images_now: int) -> int:
    """Divergence: restore the last good snapshot and scale the learning rates; returns rounds redone."""
    redone = rounds_now - keeper.round_index
    policy.note_rollback(keeper.round_index, redone)
    log.warning("%d rounds in a row skipped a non-finite step (at %.1f kimg): rolling back %d rounds to the "
                "snapshot at %.1f kimg with learning rates x%g (rollback %d)", policy.streak, images_now / 1000,
                redone, keeper.images_seen / 1000, backoff, policy.rollbacks)
    keeper.restore(engine, keep_hyper=True)
    engine.scale_lr(backoff)
    policy.reset_streak()
    return redone


def recover_workers(engine: Any, keeper: SnapshotKeeper, policy: FaultPolicy, fault_cfg: Any, exc: BaseException,
                    rounds_now: int, images_now: int,
                    fallback: Callable[[BaseException], tuple[int, int]]) -> tuple[int, int, Optional[Any]]:
    """Worker loss: shrink onto the survivors when the job is elastic and enough survive (a
    resize: not a restart), else recreate every worker (a restart, counted against
    `fault.max_restarts`); then restore them all from the snapshot (or `fallback(lost)`, the last
    checkpoint, when the snapshot itself is gone) and re-apply the learning-rate scale. A loss
    during recovery is handled the same way again. Returns (round_index, images_seen, the
    `elastic.Resize` when the job shrank)."""
    redone = rounds_now - keeper.round_index
    while True:
        t0 = time.perf_counter()
        resize = None
        try:
            resize = engine.shrink()
            if resize is None:
                policy.note_restart(redone)
                log.warning("worker lost at %.1f kimg (%s): recreating the workers (restart %d of %d) and "
                            "restoring the snapshot at %.1f kimg", images_now / 1000, brief(exc), policy.restarts,
                            fault_cfg.max_restarts, keeper.images_seen / 1000)
                engine.restart_workers(fault_cfg.capacity_wait_s)
            else:
                policy.resizes += 1
                log.warning("worker lost at %.1f kimg (%s): %s; restoring the snapshot at %.1f kimg",
                            images_now / 1000, brief(exc), resize.line(), keeper.images_seen / 1000)
            try:
                snap = keeper.restore(engine, keep_hyper=True)
                rounds, images = snap.round_index, snap.images_seen
            except SnapshotLostError as lost:
                rounds, images = fallback(lost)
            if policy.lr_scale != 1.0:  # fresh workers start from the config's learning rates
                engine.scale_lr(policy.lr_scale)
        except FaultError:
            raise
        except Exception as again:  # noqa: BLE001 - a loss during recovery is another loss
            if not is_worker_loss(again):
                raise FaultError(f"recovering from a lost worker failed ({brief(again)}); the last snapshot is "
                                 "saved as a checkpoint: continue with `ganray train CONFIG --resume RUN_ID`") from None
            exc, redone = again, 0
            continue
        policy.reset_streak()
        log.warning("%s in %.1f s; continuing from %.1f kimg (%d rounds redone)",
                    "training on the survivors" if resize else "workers recreated", time.perf_counter() - t0,
                    images / 1000, rounds_now - rounds)
        return rounds, images, resize


class ChunkClock:
    """Seconds per round, measured, to cap chunks at a share of `fault.grace_s`.

    The loop can only notice a SIGTERM between chunks; keeping each chunk to a quarter of the
    grace period leaves the rest for the final checkpoint. The first chunk is a single round
    (nothing is measured yet); chunk sizes never change results (rounds are the same whatever
    the chunking), only how often the driver looks up.
    """

    def __init__(self, grace_s: float, share: float = _GRACE_SHARE) -> None:
        self.budget_s = max(1e-3, float(grace_s) * share)
        self.per_round: Optional[float] = None

    def observe(self, rounds: int, seconds: float) -> None:
        if rounds <= 0:
            return
        now = seconds / rounds
        self.per_round = now if self.per_round is None else 0.7 * self.per_round + 0.3 * now

    def cap(self) -> int:
        if self.per_round is None:
            return 1
        return max(1, int(self.budget_s / max(self.per_round, 1e-9)))


def plan_chunk(round_index: int, sync_rounds: int, snapshot_rounds: int, rounds_left: int, cap: int) -> int:
    """Rounds for the next chunk: up to the next sync boundary, the next snapshot boundary
    (both absolute multiples, so a resumed run chunks like an uninterrupted one), the end of
    the job and the time cap, whichever comes first; at least one."""
    to_sync = sync_rounds - round_index % sync_rounds
    to_snapshot = snapshot_rounds - round_index % snapshot_rounds
    return max(1, min(to_sync, to_snapshot, rounds_left, cap))
