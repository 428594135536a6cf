"""The gradient all-reduce among worker processes (gloo on CPU), outside Ray: the exchange path
for power-of-two worlds, gloo's all_reduce otherwise, and the same-node shared-memory slots give
the mean, identical on every rank, and leave the tensors alone until the pending reduce is waited
for; the shared slots and gloo notice a dead rank at once, and the slots a hung one, instead of
waiting for the group's timeout (tests/test_collective_gloo.py: `resources.collective` on Ray)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ganray.workers.shared_slots import supported as shared_memory_supported
from helpers import free_port


def _run_ranks(target, world: int, *args, results: int, clean_exit: bool = True) -> list:
    """Start `world` spawned processes running target(rank, port, *args, queue); return the
    first `results` items they put on the queue, after every process has ended (with status 0,
    unless `clean_exit` is off)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in range(results)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0 or not clean_exit, f"a rank exited with {p.exitcode}"
    return got


def _rank_main(rank: int, port: int, world: int, shared: bool, out: "mp.Queue") -> None:
    from ganray.workers.collective import Collective

    torch.set_num_threads(1)
    group = Collective(rank, world, torch.device("cpu"))
    group.join("127.0.0.1", port, timeout_s=60, shared_numel=118 if shared else 0)
    assert (group.slots is not None) == shared  # every rank of this host maps the segment
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):  # more reduces than the shared slots' two buffers
        # Gradient-like tensors and a None (a parameter without a gradient), as the steps pass
        # them; the last is strided like a channels_last conv weight's gradient.
        grads = [torch.randn(3, 5, generator=gen), None, torch.randn(7, generator=gen) * 1e3,
                 torch.randn(2, 3, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)]
        original = [g.clone() if g is not None else None for g in grads]
        pending = group.start_all_reduce_mean(grads)
        # In flight, the tensors keep their local values (a replica runs other work meanwhile).
        assert all(torch.equal(g, o) for g, o in zip(grads, original) if g is not None)
        pending.wait()
        pending.wait()  # a second wait changes nothing
        assert grads[3].is_contiguous(memory_format=torch.channels_last)  # the mean kept its layout
    # Plain lists, not tensors: a tensor sent through the queue is shared memory that needs this
    # process alive until the parent reads it, and the rank exits right after.
    as_lists = lambda ts: [t.tolist() if t is not None else None for t in ts]  # noqa: E731
    out.put((rank, as_lists(original), as_lists(grads), group.path()))
    group.leave()


needs_shm = pytest.mark.skipif(not shared_memory_supported(), reason="shared slots need x86-64 and /dev/shm")


@pytest.mark.parametrize("world,shared", [(2, False), (3, False), (4, False),
                                          pytest.param(2, True, marks=needs_shm),
                                          pytest.param(3, True, marks=needs_shm)])
def test_all_reduce_mean_is_the_mean_and_identical_on_every_rank(world: int, shared: bool) -> None:
    results = sorted(_run_ranks(_rank_main, world, world, shared, results=world), key=lambda item: item[0])
    paths = {r[3] for r in results}
    assert len(paths) == 1  # every rank took the same path
    assert ("shared memory" in paths.pop()) == shared
    results = [(rank, [torch.tensor(t) if t is not None else None for t in orig],
                [torch.tensor(t) if t is not None else None for t in red]) for rank, orig, red, _ in results]
    for index in (0, 2, 3):
        expected = torch.stack([r[1][index] for r in results]).mean(dim=0)
        for _, _, reduced in results:
            torch.testing.assert_close(reduced[index], expected, rtol=1e-6, atol=1e-4)
            assert torch.equal(reduced[index], results[0][2][index])  # bit-identical replicas
    assert all(r[2][1] is None for r in results)


def _absent_peer_main(rank: int, port: int, out: "mp.Queue") -> None:
    from ganray.workers.collective import Collective

    group = Collective(rank, 2, torch.device("cpu"))
    group.join("127.0.0.1", port, timeout_s=2, shared_numel=4)
    if rank == 1:
        time.sleep(8)  # alive but never reduces: a replica that hangs
        return
    try:
        group.all_reduce_mean([torch.ones(4)])
        out.put("returned")
    except RuntimeError as err:
        out.put(str(err))


def _dying_peer_main(rank: int, port: int, collective: str, numel: int, out: "mp.Queue") -> None:
    from ganray.workers.collective import Collective

    group = Collective(rank, 2, torch.device("cpu"))
    group.join("127.0.0.1", port, timeout_s=600, shared_numel=4, collective=collective)
    if rank == 1:
        os._exit(1)  # dies without leaving the group, as a killed replica
    t0 = time.monotonic()
    try:
        group.all_reduce_mean([torch.ones(numel)])
        out.put(("returned", 0.0))
    except RuntimeError as err:
        out.put((str(err), time.monotonic() - t0))


@needs_shm
def test_shared_slots_notice_a_dead_rank_at_once() -> None:
    [(message, waited)] = _run_ranks(_dying_peer_main, 2, "auto", 4, results=1, clean_exit=False)
    assert "rank 1" in message and "exited" in message
    assert waited < 60  # long before the 600 s timeout


def test_gloo_notices_a_dead_rank_at_once() -> None:
    """The path ranks on different hosts take: the dead peer's kernel closes its sockets, and
    gloo raises on the survivor instead of waiting for the group's timeout. (gloo's ring
    all_reduce here; tests/test_collective_gloo.py kills a replica inside the pairwise exchange.)"""
    [(message, waited)] = _run_ranks(_dying_peer_main, 2, "gloo", 2 << 20, results=1, clean_exit=False)
    assert "Connection closed by peer" in message or "Connection reset by peer" in message, message
    assert waited < 60  # long before the 600 s timeout


@needs_shm
def test_shared_slots_give_up_on_a_rank_that_never_arrives() -> None:
    before = set(Path("/dev/shm").glob("ganray-allreduce-*"))
    [message] = _run_ranks(_absent_peer_main, 2, results=1)
    assert "rank 1 did not arrive within 2 s" in message  # it is alive (sleeping), so only the timeout tells
    # The segment's name was removed as soon as both ranks had mapped it.
    assert set(Path("/dev/shm").glob("ganray-allreduce-*")) == before
