"""The `peer` suite: the same GAN hand-written on Ray Train's TorchTrainer (DDP), against ganray.

The peer is what a Ray user writes today with Ray Train V2: a `train_loop_per_worker` that builds
G and D, wraps each with `ray.train.torch.prepare_model` (DDP when there is more than one
worker), feeds a `DataLoader` over an in-memory `TensorDataset` through
`prepare_data_loader` (a `DistributedSampler`), keeps two Adam optimizers and an EMA of G, and
runs ganray's phase table (`n_critic` D steps on fakes made without a graph, one G step on
fresh noise with D frozen, the EMA update). It is written carefully, not naively: G's step calls
`D.module` with D's parameters frozen, so no D gradient is computed or all-reduced there.

The tuned plain loop (fused Adam, foreach EMA) runs beside them too: its ratio to the peer is
the most any engine at zero overhead could show here, which tells a miss of ganray's own
overhead apart from a peer that is simply close to the plain loop on this machine.

Throughput is measured inside the train loop: after a warm-up, rank 0 times `windows` spans of
`rounds` rounds and reports global samples/s per span (to the driver through a small "baton"
actor as each window ends, and at the end through `ray.train.report`). ganray's `replicated`
engine with the same workers, threads and global batch, and the two plain loops, are timed in
the driver between the peer's windows: all four take turns, so drift of a shared machine hits all.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ganray.bench.contenders import EngineContender, plain_contender
from ganray.bench.harness import BenchContext, Report, ratio_cell, spread
from ganray.bench.timing import add_ratio, close_all, rounds_for, summary

# BENCHMARKS.md: ganray replicated / Ray Train DDP, same GAN and workers.
PEER_TARGETS = {("mlp", 1): 1.15, ("mlp", 2): 1.15, ("dcgan32", 1): 1.0, ("dcgan32", 2): 1.15}


def peer_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the GAN by hand on DDP (runs in each worker)."""
    import copy

    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from ganray.models.registry import build_discriminator, build_generator
    from ganray.workers.data import load_dataset

    cfg = config["cfg"]
    torch.set_num_threads(int(cfg["resources"]["threads_per_worker"]))
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    sched = cfg["schedule"]
    batch = int(sched["batch_size"]) // world
    n_critic = int(sched["n_critic"])
    betas = (float(sched["betas"][0]), float(sched["betas"][1]))
    source = load_dataset(cfg["data"], int(cfg["seed"]), "train")
    real_all = source.get(np.arange(len(source)))
    shape = tuple(real_all.shape[1:])
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(TensorDataset(real_all), batch_size=batch, shuffle=True, drop_last=True))

    torch.manual_seed(int(cfg["seed"]))
    G = ray.train.torch.prepare_model(build_generator(cfg["model"], shape))
    D = ray.train.torch.prepare_model(build_discriminator(cfg["model"], shape))
    G_plain = getattr(G, "module", G)
    D_plain = getattr(D, "module", D)
    G_ema = copy.deepcopy(G_plain).eval().requires_grad_(False)
    opt_G = torch.optim.Adam(G.parameters(), lr=float(sched["g_lr"]), betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=float(sched["d_lr"]), betas=betas)
    half_life = float(sched["ema_half_life_kimg"])
    beta = 0.5 ** (int(sched["batch_size"]) / (half_life * 1000.0)) if half_life > 0 else 0.0
    z_dim = int(G_plain.z_dim)

    def batches():
        epoch = 0
        while True:
            if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for (real,) in loader:
                yield real
            epoch += 1

    stream = batches()

    def one_round() -> None:
        for _ in range(n_critic):
            real = next(stream)
            z = torch.randn(batch, z_dim)
            with torch.no_grad():
                fake = G(z)
            loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()
            opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_D.step()
        D_plain.requires_grad_(False)
        loss_g = F.softplus(-D_plain(G(torch.randn(batch, z_dim)))).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        D_plain.requires_grad_(True)
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G_plain.parameters()):
                p_ema.lerp_(p, 1.0 - beta)
            for b_ema, b in zip(G_ema.buffers(), G_plain.buffers()):
                b_ema.copy_(b)

    for _ in range(int(config["warmup_rounds"])):
        one_round()
    baton = config["baton"]
    rank = ctx.get_world_rank()
    if rank == 0:
        ray.get(baton.set.remote("ready"))
    images = int(config["rounds"]) * n_critic * int(sched["batch_size"])  # global images per window
    rates = []
    for i in range(int(config["windows"])):
        # Every rank waits for the driver's go, so the peer is idle while the driver times ganray
        # and the plain loop, and busy only inside its own window.
        ray.get(baton.wait.remote(f"go{i}"))
        t0 = time.perf_counter()
        for _ in range(int(config["rounds"])):
            one_round()
        rates.append(images / (time.perf_counter() - t0))
        if rank == 0:
            ray.get(baton.put.remote(f"done{i}", rates[-1]))
    # Ray Train V2 keeps only metrics that come with a checkpoint in the Result: rank 0 attaches a
    # tiny one (after the timed windows, so it costs the measurement nothing).
    metrics = {"samples_per_s": rates, "world_size": world}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "rates.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _baton_class() -> Any:
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class Baton:
        """Named one-shot events (with a value) between the driver and the peer's workers."""

        def __init__(self) -> None:
            self.events: dict[str, asyncio.Event] = {}
            self.values: dict[str, float] = {}

        def _event(self, key: str) -> asyncio.Event:
            return self.events.setdefault(key, asyncio.Event())

        async def set(self, key: str) -> None:
            self._event(key).set()

        async def put(self, key: str, value: float) -> None:
            self.values[key] = value
            self._event(key).set()

        async def wait(self, key: str) -> Optional[float]:
            await self._event(key).wait()
            return self.values.get(key)

    return Baton


class PeerRun:
    """The Ray Train peer in a background thread, timed window by window when the driver says go."""

    def __init__(self, cfg: dict[str, Any], workers: int, rounds: int, windows: int, warmup_rounds: int,
                 storage: str) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self.baton = _baton_class().remote()
        threads = float(cfg["resources"]["threads_per_worker"])
        self.trainer = TorchTrainer(
            peer_train_loop,
            train_loop_config={"cfg": cfg, "rounds": rounds, "windows": windows, "warmup_rounds": warmup_rounds,
                               "baton": self.baton},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=storage, name=f"ganray-bench-peer-{workers}w-{int(time.time())}"),
        )
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._fit, name="ray-train-peer", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the driver thread
            self.error = err

    def _await(self, key: str, timeout_s: float) -> Optional[float]:
        import ray

        ref = self.baton.wait.remote(key)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _ = ray.wait([ref], timeout=1.0)
            if ready:
                return ray.get(ref)
            if not self.thread.is_alive():
                raise RuntimeError(f"the Ray Train peer stopped before '{key}': {self.error!r}")
        raise TimeoutError(f"the Ray Train peer did not reach '{key}' within {timeout_s:g} s")

    def ready(self, timeout_s: float = 900.0) -> None:
        self._await("ready", timeout_s)

    def window(self, i: int, timeout_s: float = 900.0) -> float:
        import ray

        ray.get(self.baton.set.remote(f"go{i}"))
        value = self._await(f"done{i}", timeout_s)
        assert value is not None
        return float(value)

    def finish(self, timeout_s: float = 300.0) -> None:
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error


def peer(ctx: BenchContext) -> Report:
    """ganray `replicated` against Ray Train TorchTrainer + DDP, 1 and 2 workers, MLP and DCGAN-32.

    ganray, the peer and the two plain loops take turns window by window (the peer waits on a baton
    actor between its windows), so a shared machine's drift hits all four alike.
    """
    ctx.ensure_ray()
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    windows = ctx.reps
    with tempfile.TemporaryDirectory(prefix="ganray-bench-peer-") as storage:
        for case in ctx.models():
            for workers in (1, 2):
                cfg = ctx.config(case, topology={"kind": "replicated", "num_workers": workers})
                contenders = {"plain": plain_contender(ctx.config(case), workers),
                              "tuned": plain_contender(ctx.config(case), workers, tuned=True),
                              "ganray": EngineContender(cfg)}
                rates: dict[str, list[float]] = {"ganray": [], "peer": [], "plain": [], "tuned": []}
                try:
                    for c in contenders.values():
                        c.run(ctx.warmup_rounds)
                    rounds = rounds_for(contenders["ganray"], ctx.rep_seconds(case), max(1, ctx.warmup_rounds), 10_000)
                    run = PeerRun(cfg.model_dump(), workers, rounds, windows, ctx.warmup_rounds, storage)
                    run.ready()
                    order = ("ganray", "peer", "plain", "tuned")
                    for i in range(windows):
                        for name in order[i % len(order):] + order[:i % len(order)]:
                            if name == "peer":
                                rates["peer"].append(run.window(i))
                            else:
                                t0 = time.perf_counter()
                                rates[name].append(contenders[name].run(rounds) / (time.perf_counter() - t0))
                    run.finish()
                finally:
                    close_all(contenders)
                row: dict[str, Any] = {"workers": workers, "threads_per_worker": 1, "batch": cfg.schedule.batch_size,
                                       "rounds_per_window": rounds, "samples_per_s": rates,
                                       "summary": {k: summary(v) for k, v in rates.items()},
                                       "target": PEER_TARGETS[(case, workers)]}
                add_ratio(row, "ratio", "ganray", "peer")
                add_ratio(row, "peer_plain_ratio", "peer", "plain")
                add_ratio(row, "ganray_plain_ratio", "ganray", "plain")
                add_ratio(row, "tuned_peer_ratio", "tuned", "peer")  # the zero-overhead ceiling
                data[f"{case}_{workers}w"] = row
                rows.append([case, workers, spread(row, "peer"), spread(row, "ganray"), spread(row, "plain"),
                             ratio_cell(row, "ratio"), ratio_cell(row, "peer_plain_ratio"),
                             ratio_cell(row, "tuned_peer_ratio"), f">= {PEER_TARGETS[(case, workers)]}"])
    return Report(data, ["model", "workers", "Ray Train DDP", "ganray replicated", "plain loop (N threads)",
                         "ganray / Ray Train", "Ray Train / plain", "tuned loop / Ray Train", "target"], rows,
                  ["samples/s: median (min-max) of timed windows after warm-up, ganray, the peer, the plain "
                   "loop and the tuned plain loop (fused Adam, foreach EMA: the ceiling of any engine) taking "
                   "turns; the peer times inside its train loop (rank 0), ganray in the driver around "
                   "engine.run (the Ray call included). 1 thread per worker; the plain loops run with as many "
                   "threads as there are workers."])
