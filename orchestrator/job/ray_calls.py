"""Calls from the coordinator to its worker actors: bounded waits that keep user errors one line,
liveness probes, killing, forming a worker group and checking that replicas agree."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from ganray.models.errors import GanrayError

log = logging.getLogger("ganray")


def get(refs: Any, timeout_s: float, what: str, limit: str = "resources.step_timeout_s") -> Any:
    """`ray.get` that turns a user error raised in a worker back into itself (one line, exit 2)
    and a hung worker into a TimeoutError naming the limit.

    Given a list, it raises as soon as any one call fails (`ray.get` does not wait for the others):
    a worker's death ends a chunk at once, even while its peers still sit in a collective."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise TimeoutError(f"{what} took longer than {limit}={timeout_s:g} s; "
                           "a worker is hung or too slow (raise the limit for very large chunks)") from None
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, GanrayError):
            raise cause from None
        raise


# Calls of chunks cut short by a lost worker, kept until they end and read then: Ray prints an
# "Unhandled error" with a traceback for every failed result dropped unread.
_given_up: list[Any] = []


def get_chunk(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    """`get` for a chunk's calls; when one fails, the others are kept and read as they end (at a
    later chunk), so the console shows ganray's one line about the loss, not Ray's tracebacks."""
    _given_up[:] = _settle(_given_up)
    try:
        return get(refs, timeout_s, what)
    except BaseException:
        _given_up.extend(refs)
        raise


def _settle(refs: list[Any]) -> list[Any]:
    """Read the calls of `refs` that have ended (their errors are known); return the others."""
    if not refs:
        return []
    ready, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the loss that failed them is handled already
            pass
    return running


def lost_workers(actors: list[Any], timeout_s: float) -> dict[int, str]:
    """Which of `actors` are dead or do not answer a probe within `timeout_s`: {index: why}.

    A worker stuck in a collective whose peer died cannot answer either; it is lost too (its
    group is broken and it would block until the collective's own timeout)."""
    refs = [a.process_info.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    lost: dict[int, str] = {}
    for i, ref in enumerate(refs):
        if ref not in done:
            lost[i] = f"no answer within {timeout_s:g} s"
            continue
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001 - dead actors raise several Ray error types
            lost[i] = type(err).__name__
    return lost


# Starting a worker (a process, a torch import, its data) is not a step: it may take as long as
# placing it (or, when recovering, as long as the wait for capacity).
START_LIMIT = "max(resources.step_timeout_s, resources.placement_timeout_s)"


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def kill(actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as err:  # already dead, or the cluster is gone
            log.debug("killing an actor failed: %s", err)


def form_group(actors: list[Any], gpus_each: float, timeout_s: float, role: str,
               collective: str) -> tuple[list[float], str]:
    """Form the torch.distributed group among `actors` (rank = position), its all-reduces taking
    the `collective` path (`resources.collective`); returns their checksums and how the group's
    all-reduces travel (`Collective.path`).

    Workers with a fraction of a GPU may share a device, which NCCL refuses: they use gloo. Logs
    how the all-reduces travel: shared memory, gloo or nccl make a large difference in speed,
    and a user tuning a job should not have to guess which one a group got."""
    address, port = get(actors[0].rendezvous.remote(), timeout_s, "group rendezvous")
    shared_gpu = 0 < gpus_each < 1
    joined = get([a.join_group.remote(address, port, timeout_s, shared_gpu, collective) for a in actors],
                 timeout_s, "joining the group")
    log.info("%s gradient all-reduce: %s", role, joined[0][1])
    return [checksum for checksum, _ in joined], joined[0][1]


def check_same(checksums: list[float], role: str) -> None:
    """Replicas apply identical averaged updates, so their parameters must agree to the bit
    (up to a float64 sum's rounding); anything else means the synchronisation broke."""
    ref = checksums[0]
    bad = [i for i, c in enumerate(checksums) if abs(c - ref) > 1e-9 * max(1.0, abs(ref))]
    if bad:
        detail = ", ".join(f"{role} {i}: {checksums[i]!r}" for i in bad)
        raise RuntimeError(f"parameter checksums differ across {role}s ({role} 0: {ref!r}; {detail}); "
                           "the replicas diverged, refusing to checkpoint")
