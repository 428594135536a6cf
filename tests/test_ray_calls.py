"""The coordinator's calls to its workers: a chunk cut short by a loss leaves no unread results.

Ray prints an "Unhandled error" with a traceback for each failed result that is dropped unread;
after a worker loss, a chunk's other calls fail a little later (when Ray declares the node dead),
so `get_chunk` keeps them and reads them once they have ended.
"""

from __future__ import annotations

import time

import pytest
import ray

from ganray.orchestrator.job import ray_calls


@ray.remote(num_cpus=0)
def _fail_after(seconds: float) -> None:
    time.sleep(seconds)
    raise RuntimeError("the worker's peer is gone")


@ray.remote(num_cpus=0)
def _answer() -> int:
    return 42


def test_a_chunk_cut_short_keeps_its_other_calls_and_reads_them_once_they_end(ray_session) -> None:
    ray_calls._given_up.clear()
    fast, slow = _fail_after.remote(0.0), _fail_after.remote(2.0)
    with pytest.raises(RuntimeError, match="peer is gone"):
        ray_calls.get_chunk([fast, slow], 60, "a chunk of 2 rounds")
    assert slow in ray_calls._given_up  # still running when the chunk gave up: kept, not dropped
    ray.wait([slow], timeout=60)
    assert ray_calls.get_chunk([_answer.remote()], 60, "the next chunk") == [42]
    assert ray_calls._given_up == []  # read at the next chunk, their errors known and handled
