"""A torch.distributed process group among Ray actors: one flat-buffer all-reduce per phase.

Each actor is its own process, so each joins the default process group of that process. Rank 0
picks a free TCP port on its node; the coordinator passes (address, port) to every rank through
Ray, and all ranks call `join` at once (init blocks until the whole world has arrived). gloo on
CPU, nccl when the tensors live on a GPU.

The gradients of a phase are packed into one contiguous buffer and all-reduced in a single call:
on small models the per-call latency dominates, so one call per phase instead of one per
parameter tensor is what makes a per-step collective affordable. On CPU with a power-of-two world
small buffers are summed by pairwise exchanges (recursive doubling: log2(world) rounds of
isend/irecv) instead of gloo's all_reduce, whose per-call latency is larger on small buffers, a
cost a small MLP pays twice a round (docs/performance.md has the measurements).

Ranks that share a node (every rank could map one /dev/shm segment) sum through shared memory
instead, with a spinning wait: see workers/shared_slots.py for why a sleeping receive costs
milliseconds on a small VM. All paths are asynchronous (`start_all_reduce_mean` returns a
`PendingMean`): the replica starts a phase's reduce right after its backward pass and waits only
when the optimizer step needs the result, doing the other network's work in between
(workers/stepper.py, `ReplicaStepper`). `resources.collective: gloo` turns the shared memory off
(`join(collective="gloo")`; gloo also on GPUs), so a test on one host runs the path of ranks on
different hosts.

Each call adds the logical payload this rank sends to `sent_bytes` (docs/scaling.md derives it
per round): what the algorithm sends, not what the wire carries (no TCP or gloo headers). Ring
all-reduce (gloo's all_reduce, and nccl's ring): 2(w-1)/w of the buffer, rounded down;
recursive doubling: the whole buffer in each of its log2(w) swaps; shared memory: the buffer
written once into this rank's slot (the w-1 peers' slots it then reads are not counted as sent).
The broadcast on joining, once per group, is not counted.

A peer's loss: a survivor must not sit in a collective until the group's timeout, which is
`resources.step_timeout_s` because it has to allow for the slowest step. It does not: gloo's TCP
pairs report "Connection closed by peer" as soon as the peer's process is gone (its kernel closes
the sockets), so a survivor blocked in an exchange or an all_reduce raises at once, and the shared
slots watch their peers' pids. A peer whose host vanishes without closing its connections is the
one loss a survivor cannot see; the coordinator does not wait for such a survivor: the chunk's
`ray.get` fails on the first dead worker, the liveness probe (`ray_calls.lost_workers`) counts a
survivor that does not answer as lost, and the recovery kills it.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from ganray.workers.shared_slots import SharedSlots, open_shared_slots


def node_address() -> str:
    """This node's IP as Ray knows it (reachable by the other actors of the job)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it; the store binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def backend_for(device: torch.device, shared_gpu: bool = False) -> str:
    """gloo on CPU; nccl on CUDA unless ranks may share one GPU (fractional GPUs per worker),
    which NCCL refuses ("duplicate GPU"): gloo all-reduces CUDA tensors too, through the host."""
    return "nccl" if device.type == "cuda" and not shared_gpu else "gloo"


# `resources.collective`: "auto" sums through shared memory when every rank is on this host,
# "gloo" always goes through torch.distributed's gloo.
COLLECTIVES = ("auto", "gloo")


class Collective:
    """This process's membership in the job's group: average-all-reduce and broadcast helpers."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world = int(rank), int(world)
        self.device = device
        self.backend = backend_for(device)
        self.joined = False
        self.slots: Optional[SharedSlots] = None  # same-node shared memory, when every rank has it
        # Logical payload sent and all-reduces run since construction (plain ints: a counter
        # read by the worker around a chunk, never a per-call log).
        self.sent_bytes = 0
        self.reduces = 0

    def join(self, address: str, port: int, timeout_s: float, shared_gpu: bool = False,
             shared_numel: int = 0, collective: str = "auto") -> None:
        """Join the group rank 0 hosts at (address, port); blocks until every rank has joined.

        With `shared_numel` (the largest buffer the caller will reduce) and `collective="auto"`,
        CPU ranks that share this node also map a shared-memory segment for their reduces
        (workers/shared_slots.py). `collective="gloo"` uses gloo whatever the device and hosts.
        `timeout_s` bounds the rendezvous and every collective call."""
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES} (got {collective!r})")
        if self.world == 1:
            return  # nothing to synchronise: no group, so one worker is exactly `local`
        self.backend = "gloo" if collective == "gloo" else backend_for(self.device, shared_gpu)
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(self.backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=float(timeout_s)))
        self.joined = True
        if collective == "auto" and self.backend == "gloo" and self.device.type == "cpu" and shared_numel > 0:
            self.slots = open_shared_slots(self.rank, self.world, shared_numel, timeout_s)

    def path(self) -> str:
        """How this group's all-reduces travel, in words (logged by the coordinator once formed)."""
        if not self.joined:
            return "none (one worker)"
        if self.slots is not None:
            return (f"shared memory on this node ({self.world} ranks; float32 buffers up to "
                    f"{self.slots.capacity:,} elements)")
        if self.backend == "nccl":
            return f"nccl ({self.world} ranks)"
        if self.device.type == "cpu" and _power_of_two(self.world):
            return (f"gloo ({self.world} ranks): pairwise exchange up to {EXCHANGE_MAX_NUMEL:,} elements, "
                    "ring all-reduce above")
        return f"gloo ring all-reduce ({self.world} ranks)"

    def all_reduce_mean(self, tensors: list[Optional[torch.Tensor]]) -> None:
        """Replace each tensor by its mean over the ranks, in place, with one collective call.

        `None` entries (parameters without a gradient) are skipped; every rank runs the same
        network, so the skipped set is the same on all of them.
        """
        self.start_all_reduce_mean(tensors).wait()

    def start_all_reduce_mean(self, tensors: list[Optional[torch.Tensor]]) -> "PendingMean":
        """Start `all_reduce_mean` and return at once; the tensors hold their means after `.wait()`.

        The tensors are copied into the send buffer here, so the caller may run any work that
        leaves them alone (a forward pass of the other network) while the bytes travel: that is
        how a replica hides the collective behind compute. Until `wait`, the tensors keep their
        local values.
        """
        present = [t for t in tensors if t is not None]
        if not self.joined or not present:
            return PendingMean(None, present, self.world)
        if (self.slots is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in present)
                and sum(t.numel() for t in present) <= self.slots.capacity):
            # Flattened straight into this rank's shared slot: no private copy first.
            self._count(sum(t.numel() * t.element_size() for t in present))
            return PendingMean(_SharedSum(self.slots, present), present, self.world)
        flat = torch.cat([t.reshape(-1) for t in present])
        nbytes = flat.numel() * flat.element_size()
        if (self.backend == "gloo" and flat.device.type == "cpu" and _power_of_two(self.world)
                and flat.numel() <= EXCHANGE_MAX_NUMEL):
            self._count(nbytes * (self.world.bit_length() - 1))  # the whole buffer in each of log2(w) swaps
            return PendingMean(_Exchange(flat, self.rank, self.world), present, self.world)
        self._count(2 * (self.world - 1) * nbytes // self.world)  # ring: reduce-scatter, then all-gather
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
        return PendingMean(_AsyncWork(work, flat), present, self.world)

    def _count(self, nbytes: int) -> None:
        self.sent_bytes += nbytes
        self.reduces += 1

    def broadcast(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite `tensors` on every rank with rank `src`'s values (one collective call)."""
        if not self.joined:
            return
        present = list(tensors)
        if not present:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in present])
        dist.broadcast(flat, src=src)
        _unflatten_into(flat, present)

    def leave(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        if self.joined and dist.is_initialized():
            dist.destroy_process_group()
        self.joined = False


# Above this size the transfer, not the call latency, dominates, and gloo's ring all_reduce is as
# fast as the exchange or faster.
EXCHANGE_MAX_NUMEL = 1 << 20


def _power_of_two(n: int) -> bool:
    return n > 1 and n & (n - 1) == 0


class _AsyncWork:
    """A torch.distributed async work whose sum lands in `flat`."""

    def __init__(self, work: Any, flat: torch.Tensor) -> None:
        self.work, self.flat = work, flat

    def finish_mean_into(self, tensors: list[torch.Tensor], world: int) -> None:
        self.work.wait()
        _mean_into(self.flat, tensors, world)


class _SharedSum:
    """A sum through the node's shared-memory slots (all ranks on this node), written straight
    into the tensors, not through a flat buffer."""

    def __init__(self, slots: SharedSlots, tensors: list[torch.Tensor]) -> None:
        self.slots = slots
        self.seq = slots.publish(tensors)

    def finish_mean_into(self, tensors: list[torch.Tensor], world: int) -> None:
        self.slots.sum_into(self.seq, tensors)
        torch._foreach_div_(tensors, float(world))


class _Exchange:
    """In-place sum over a power-of-two world by recursive doubling: in round k, rank r swaps its
    partial sum with rank r XOR 2^k and adds. Both partners add the same two tensors (a+b on one,
    b+a on the other, equal in IEEE arithmetic), so every rank ends with bit-identical sums and
    the replicas stay identical. The first swap starts on construction; later ones (worlds > 2)
    need its result, so they run in `finish_mean_into`."""

    def __init__(self, flat: torch.Tensor, rank: int, world: int) -> None:
        self.flat, self.rank, self.world = flat, rank, world
        self.other = torch.empty_like(flat)
        self.step = 1
        self.ops = self._swap()

    def _swap(self) -> tuple[Any, Any]:
        peer = self.rank ^ self.step
        return dist.isend(self.flat, peer), dist.irecv(self.other, peer)

    def finish_mean_into(self, tensors: list[torch.Tensor], world: int) -> None:
        while True:
            for op in self.ops:
                op.wait()
            self.flat.add_(self.other)
            self.step <<= 1
            if self.step >= self.world:
                break
            self.ops = self._swap()
        _mean_into(self.flat, tensors, world)


class PendingMean:
    """An all-reduce-mean in flight (`Collective.start_all_reduce_mean`); `wait` writes the means
    back into the tensors. Waiting twice is harmless; a pending mean with nothing to reduce (one
    rank, no group) is already done."""

    def __init__(self, transfer: Optional[Any], tensors: list[torch.Tensor], world: int) -> None:
        self.transfer, self.tensors, self.world = transfer, tensors, world

    def wait(self) -> None:
        if self.transfer is None:
            return
        transfer, self.transfer = self.transfer, None
        with torch.no_grad():
            transfer.finish_mean_into(self.tensors, self.world)


def _mean_into(flat: torch.Tensor, tensors: list[torch.Tensor], world: int) -> None:
    """Divide the flat sum by the world size and copy it back into `tensors`."""
    flat.div_(world)
    _unflatten_into(flat, tensors)


@torch.no_grad()
def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and floating buffer of `modules`, in a fixed order (what a broadcast covers)."""
    out: list[torch.Tensor] = []
    for module in modules:
        out.extend(p.data for p in module.parameters())
        out.extend(b for b in module.buffers() if b.is_floating_point())
    return out
