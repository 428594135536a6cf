"""ganray's engines and the plain loop as timing contenders (`ganray.bench.timing.Contender`)."""

from __future__ import annotations

import time
from typing import Any

import torch


class EngineContender:
    """A ganray engine (`make_engine`) as a timing contender: images consumed per `run(n)`.

    Also sums the engine's own time split (compute / comm / wait) so a report can say where the
    time goes when a ratio misses its target.
    """

    def __init__(self, config: Any) -> None:
        from ganray.orchestrator.job.engine import make_engine

        self.threads = int(config.resources.threads_per_worker)
        self.local = config.topology.kind == "local"
        self.engine = make_engine(config)
        self.images = self.engine.run(0).images_seen
        self.split = {"wall_s": 0.0, "compute_s": 0.0, "comm_s": 0.0, "wait_s": 0.0}

    def run(self, n_rounds: int) -> int:
        if self.local:
            torch.set_num_threads(self.threads)  # LocalEngine sets it only when built
        t0 = time.perf_counter()
        res = self.engine.run(n_rounds)
        self.split["wall_s"] += time.perf_counter() - t0
        self.split["compute_s"] += res.time_compute_s
        self.split["comm_s"] += res.time_comm_s
        self.split["wait_s"] += res.time_wait_s
        done, self.images = res.images_seen - self.images, res.images_seen
        return done

    def close(self) -> None:
        self.engine.close()


def plain_contender(config: Any, threads: int, tuned: bool = False) -> Any:
    """The plain loop on the same data, networks and batch as `config` (`tuned`: fused Adam,
    foreach EMA, the data on the device: `PlainGAN`'s performance-minded variant)."""
    from ganray.bench.plain import PlainGAN, training_set

    cfg = config.model_dump()
    return PlainGAN(cfg, training_set(cfg), threads, tuned=tuned)


def time_split(contenders: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The engines' own wall/compute/comm/wait sums over the timed and warm-up rounds."""
    return {name: {k: round(v, 3) for k, v in c.split.items()}
            for name, c in contenders.items() if isinstance(c, EngineContender)}
