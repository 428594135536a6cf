"""ganray's engines and the plain loops as timing contenders (`ganray.bench.timing.Contender`),
each with the `settings` a suite records beside its figures."""

from __future__ import annotations

import time
from typing import Any

import torch


def engine_settings(config: Any) -> dict[str, Any]:
    """How a ganray engine runs `config`: the topology and the step settings every replica resolves."""
    from ganray.workers.settings import StepSettings

    tree = config.model_dump()
    topo = {k: v for k, v in tree["topology"].items() if v is not None}
    out: dict[str, Any] = {"contender": f"ganray {config.topology.kind}", "topology": topo,
                           "threads_per_worker": int(config.resources.threads_per_worker),
                           "batch": int(config.schedule.batch_size), "n_critic": int(config.schedule.n_critic),
                           "loss": config.loss.kind, "adam": "fused", "ema": "foreach lerp",
                           "batches": "index_select from a tensor (on the device when it fits)"}
    try:
        st = StepSettings.from_config(tree)
    except RuntimeError:  # a CUDA config resolved on a driver without a GPU: the workers resolve it
        return out
    conv = config.model.generator != "mlp"  # the bench cases: an MLP on 2D points or a conv net on images
    return {**out, "device": str(st.device), "autocast_bf16": st.autocast_bf16,
            "channels_last": st.channels_last and conv}


class EngineContender:
    """A ganray engine (`make_engine`) as a timing contender: images consumed per `run(n)`.

    Also sums the engine's own time split (compute / comm / wait) so a report can say where the
    time goes when a ratio misses its target.
    """

    def __init__(self, config: Any) -> None:
        from ganray.orchestrator.job.engine import make_engine

        self.threads = int(config.resources.threads_per_worker)
        self.local = config.topology.kind == "local"
        self.settings = engine_settings(config)
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


def plain_contender(config: Any, threads: int, tuned: bool = True) -> Any:
    """The plain loop on the same data, networks and batch as `config`: the tuned loop (the
    reference of every suite) unless `tuned=False` (the minimal loop, an extra row)."""
    from ganray.bench.plain import PlainGAN, training_set

    cfg = config.model_dump()
    return PlainGAN(cfg, training_set(cfg), threads, tuned=tuned)


def time_split(contenders: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The engines' own wall/compute/comm/wait sums over the timed and warm-up rounds."""
    return {name: {k: round(v, 3) for k, v in c.split.items()}
            for name, c in contenders.items() if isinstance(c, EngineContender)}
