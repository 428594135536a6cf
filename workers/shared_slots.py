"""A same-node sum for the replicas' gradient all-reduce: one shared-memory segment, a slot per
rank, and a spinning wait instead of a sleeping one.

Why: a gloo exchange between ranks that have just computed costs far more than one back to back,
whatever its size: the cost of waking the sleeping threads of a blocking receive, paid twice a
round by every replica (the figures are in docs/performance.md). The plain loop's intra-op threads do not pay it:
OpenMP workers spin before they sleep. Here each rank writes its buffer into its slot, publishes
a sequence number, and reads the others' slots once their numbers arrive, yielding the core
between checks so that nothing else on it starves.

Every rank adds the slots in rank order, so every rank ends with bit-identical sums. Slots are
double-buffered by the parity of the sequence number: rank r can only write reduce k+2 after it
finished reduce k+1, which needed every rank's k+1 write, made after that rank finished reading
reduce k. So no slot is overwritten while someone may still read it, and no lock is needed.

Only on x86-64, where stores become visible to other cores in program order (the data before
the sequence number that announces it), and only when every rank could open the segment and
sees every other rank's process (one node, one pid namespace). Otherwise the caller keeps using
gloo.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
# The largest buffer (in float32 elements) this path takes: a DCGAN-32 network is 3.5M.
SHARED_MAX_NUMEL = 8 << 20
# Sequence numbers are int64, one per 64-byte cache line so that ranks do not share a line.
_SEQ_STRIDE = 8
_HEADER_BYTES = 4096


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


class SharedSlots:
    """Rank `rank`'s view of the segment; built by `open_shared_slots` on every rank at once."""

    def __init__(self, path: Path, rank: int, world: int, capacity: int, timeout_s: float) -> None:
        self.rank, self.world, self.capacity = rank, world, capacity
        self.timeout_s = float(timeout_s)
        with open(path, "r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), _segment_bytes(world, capacity))
        self._seqs = torch.frombuffer(self._map, dtype=torch.int64, count=world * _SEQ_STRIDE)
        data = torch.frombuffer(self._map, dtype=torch.float32, offset=_HEADER_BYTES,
                                count=2 * world * capacity)
        self._slots = data.view(2, world, capacity)
        self.seq = 0
        self.peer_pids: list[int] = [os.getpid()] * world  # set by open_shared_slots

    def publish(self, tensors: list[torch.Tensor]) -> int:
        """Write `tensors`, flattened, into this rank's slot for the next reduce and announce it;
        returns that reduce's number."""
        self.seq += 1
        n = sum(t.numel() for t in tensors)
        torch.cat([t.reshape(-1) for t in tensors], out=self._slots[self.seq % 2, self.rank, :n])
        self._seqs[self.rank * _SEQ_STRIDE] = self.seq  # after the data: announces it
        return self.seq

    @torch.no_grad()
    def sum_into(self, seq: int, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` (the ones `publish` flattened for reduce `seq`, same order) with the
        sum of every rank's values, added in rank order.

        Written straight into the tensors, one parameter-sized piece at a time: no buffer of the
        whole size is allocated (7 MB of fresh pages per reduce for DCGAN-32) and no second pass
        copies a flat result back."""
        slots = self._slots[seq % 2]
        for r in range(self.world):
            if r != self.rank:
                self._wait_for(r, seq)
        offset = 0
        for t in tensors:
            n = t.numel()
            # `out=` keeps t's own strides (channels_last gradients stay channels_last).
            piece = slots[:, offset:offset + n]
            torch.add(piece[0].view(t.shape), piece[1].view(t.shape), out=t)
            for r in range(2, self.world):
                t.add_(piece[r].view(t.shape))
            offset += n

    def _wait_for(self, peer: int, seq: int) -> None:
        index = peer * _SEQ_STRIDE
        if int(self._seqs[index]) >= seq:
            return
        deadline = time.monotonic() + self.timeout_s
        checks = 0
        while int(self._seqs[index]) < seq:
            # Yield, do not sleep: a sleeping thread is what costs milliseconds to wake here.
            os.sched_yield()
            checks += 1
            if checks % 2048 == 0:
                # A dead peer never writes: notice it as fast as a reset TCP connection would tell
                # gloo, so the coordinator's fault handling starts now, not at the timeout.
                if not _alive(self.peer_pids[peer]):
                    raise RuntimeError(f"all-reduce #{seq}: rank {peer} (pid {self.peer_pids[peer]}) exited")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"all-reduce #{seq}: rank {peer} did not arrive within {self.timeout_s:g} s "
                                       "(the replica hangs)")

    def close(self) -> None:
        self._seqs = self._slots = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor view is still alive somewhere; the mapping goes with the process


def _segment_bytes(world: int, capacity: int) -> int:
    return _HEADER_BYTES + 2 * world * capacity * 4


def open_shared_slots(rank: int, world: int, capacity: int, timeout_s: float) -> Optional[SharedSlots]:
    """Every rank of the (already initialised) default group calls this together. Returns the
    slots where every rank could map the segment (all on one node), else None on every rank.

    Rank 0 creates the segment and unlinks its name as soon as every rank has mapped it, so a
    crash never leaves it behind in /dev/shm."""
    capacity = int(capacity)
    ok = supported() and 0 < capacity <= SHARED_MAX_NUMEL
    size = _segment_bytes(world, capacity)
    name = [None]
    if rank == 0 and ok:
        path = SHM_DIR / f"ganray-allreduce-{uuid.uuid4().hex}"
        try:
            # Room for the segment twice over: Ray's object store lives in /dev/shm too.
            stat = os.statvfs(SHM_DIR)
            if stat.f_bavail * stat.f_frsize < 2 * size:
                raise OSError("not enough free space in /dev/shm")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            name = [str(path)]
        except OSError:
            name = [None]
    dist.broadcast_object_list(name, src=0)
    slots: Optional[SharedSlots] = None
    if ok and name[0] is not None:
        try:
            slots = SharedSlots(Path(name[0]), rank, world, capacity, timeout_s)
        except OSError:
            slots = None  # another node: its /dev/shm has no such file
    everyone = torch.tensor([1 if slots is not None else 0], dtype=torch.int32)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
    if rank == 0 and name[0] is not None:
        os.unlink(name[0])  # every rank has mapped it or given up: the name is no longer needed
    if int(everyone) == 0:
        if slots is not None:
            slots.close()
        return None
    pids: list[Optional[int]] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    # The spin tells a dead peer by its pid, so every peer must be visible in this pid namespace
    # (containers can share /dev/shm but not their pids): otherwise gloo it is, on every rank.
    visible = torch.tensor([int(all(_alive(int(p)) for p in pids))], dtype=torch.int32)
    dist.all_reduce(visible, op=dist.ReduceOp.MIN)
    if int(visible) == 0:
        slots.close()  # type: ignore[union-attr]
        return None
    slots.peer_pids = [int(p) for p in pids]  # type: ignore[union-attr]
    return slots


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc: os.kill's answer stands
