"""Helpers the tests share: the small job config, free ports, the repository root.

Import them as `from helpers import small_config` (pytest puts tests/ on sys.path; tests/ is not
a package). conftest.py holds only fixtures.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]

# A tiny 2D job: trains in seconds on one core, every schedule boundary within a few kimg.
_SMALL_TREE: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "grid25", "size": 4096},
    "model": {"z_dim": 4, "hidden": 32, "depth": 2},
    "schedule": {"total_kimg": 4, "batch_size": 64, "sync_kimg": 1, "checkpoint_kimg": 2,
                 "sample_kimg": 100, "ema_half_life_kimg": 1},
    "topology": {"kind": "local"},
    "eval": {"every_kimg": 100, "num_samples": 500},
}


def small_tree(**sections: Any) -> dict[str, Any]:
    """The small job's config tree; a dict argument updates that section's keys, anything else
    replaces the section."""
    tree = copy.deepcopy(_SMALL_TREE)
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


def small_config(**sections: Any) -> Any:
    """The small job as a validated `TrainConfig` (see `small_tree`)."""
    from ganray.orchestrator.job.config import config_from_dict

    return config_from_dict(small_tree(**sections))


def ray_rounds(config: Any, rounds: int) -> Any:
    """`rounds` rounds of a fresh `RayEngine` on `config` (its ChunkResult); the engine is closed after."""
    from ganray.orchestrator.job.coordinator import RayEngine

    engine = RayEngine(config)
    try:
        return engine.run(rounds)
    finally:
        engine.close()


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 (all held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`ganray ARGV` in this process: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from ganray.orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def processes_of(temp_dir: str, env_key: Optional[str] = None) -> list[Any]:
    """Processes a test started under `temp_dir` (a Ray instance's temp dir): every one naming it
    on its command line, or (with `env_key`) inheriting it in that environment variable, plus
    all their descendants; never this process. Ray's workers rename themselves and sit in
    process groups of their own, so a worker whose raylet is gone is found by its environment."""
    import os

    import psutil

    me = os.getpid()
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != me and (any(temp_dir in arg for arg in proc.info["cmdline"] or ())
                                   or (env_key is not None and proc.environ().get(env_key) == temp_dir)):
                roots.append(proc)
    found = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in root.children(recursive=True)})
    found.pop(me, None)
    return list(found.values())


class ThreadMean:
    """The replicas' all-reduce hook for replicas running in threads of this process: every
    rank's tensors replaced by their mean over the ranks (what `Collective` does across actors)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[list] = [[] for _ in range(world)]
        self.means: list = []

    def hook(self, rank: int):
        def start(tensors: list) -> "ThreadMean":
            self.slots[rank] = tensors
            if self.barrier.wait() == 0:
                import torch  # helpers stays importable without torch for the tests that need none

                self.means = [None if t is None else torch.stack([s[i] for s in self.slots]).mean(dim=0)
                              for i, t in enumerate(tensors)]
            self.barrier.wait()
            for t, mean in zip(tensors, self.means):
                if t is not None:
                    t.copy_(mean)
            self.barrier.wait()
            return self
        return start

    def wait(self) -> None:
        return None
