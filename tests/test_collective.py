"""The gradient all-reduce among worker processes (gloo on CPU), outside Ray: the exchange path
for power-of-two worlds and gloo's all_reduce otherwise give the mean, identical on every rank,
and leave the tensors alone until the pending reduce is waited for."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, out: "mp.Queue") -> None:
    from ganray.workers.collective import Collective

    torch.set_num_threads(1)
    group = Collective(rank, world, torch.device("cpu"))
    group.join("127.0.0.1", port, timeout_s=60)
    gen = torch.Generator().manual_seed(rank)
    # Two gradient-like tensors and a None (a parameter without a gradient), as the steps pass them.
    grads = [torch.randn(3, 5, generator=gen), None, torch.randn(7, generator=gen) * 1e3]
    original = [g.clone() if g is not None else None for g in grads]
    pending = group.start_all_reduce_mean(grads)
    # In flight, the tensors keep their local values (a replica runs other work meanwhile).
    assert all(torch.equal(g, o) for g, o in zip(grads, original) if g is not None)
    pending.wait()
    pending.wait()  # a second wait changes nothing
    # Plain lists, not tensors: a tensor sent through the queue is shared memory that needs this
    # process alive until the parent reads it, and the rank exits right after.
    as_lists = lambda ts: [t.tolist() if t is not None else None for t in ts]  # noqa: E731
    out.put((rank, as_lists(original), as_lists(grads)))
    group.leave()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_mean_is_the_mean_and_identical_on_every_rank(world: int) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=120) for _ in range(world)), key=lambda item: item[0])
    results = [(rank, [torch.tensor(t) if t is not None else None for t in orig],
                [torch.tensor(t) if t is not None else None for t in red]) for rank, orig, red in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for index in (0, 2):
        expected = torch.stack([r[1][index] for r in results]).mean(dim=0)
        for _, _, reduced in results:
            torch.testing.assert_close(reduced[index], expected, rtol=1e-6, atol=1e-4)
            assert torch.equal(reduced[index], results[0][2][index])  # bit-identical replicas
    assert all(r[2][1] is None for r in results)
