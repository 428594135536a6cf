"""The `peer` suite: the same GAN hand-written on Ray Train's TorchTrainer (DDP), against ganray.

The peer is what a Ray user writes today with Ray Train V2: a `train_loop_per_worker` that builds
G and D, wraps each with `ray.train.torch.prepare_model` (DDP when there is more than one
worker), feeds a `DataLoader` over an in-memory `TensorDataset` through
`prepare_data_loader` (a `DistributedSampler`), keeps two Adam optimizers and an EMA of G, and
runs ganray's phase table (`n_critic` D steps on fakes made without a graph, one G step on
fresh noise with D frozen, the EMA update). It is written carefully, not naively: G's step calls
`D.module` with D's parameters frozen, so no D gradient is computed or all-reduced there.

Throughput is measured inside the train loop: after a warm-up, rank 0 times `windows` spans of
`rounds` rounds and reports global samples/s per span through `ray.train.report`. ganray's
`replicated` engine with the same workers, threads and global batch is timed the same way in
the driver, before and after the peer (so drift of a shared machine hits both).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ganray.orchestrator.bench import BenchContext, EngineContender, Report, plain_contender
from ganray.orchestrator.bench_plain import rounds_for, summary

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
    rates = []
    images = int(config["rounds"]) * n_critic * int(sched["batch_size"])  # global images per window
    for _ in range(int(config["windows"])):
        t0 = time.perf_counter()
        for _ in range(int(config["rounds"])):
            one_round()
        rates.append(images / (time.perf_counter() - t0))
    # Ray Train V2 keeps only metrics that come with a checkpoint in the Result: rank 0 attaches a
    # tiny one (after the timed windows, so it costs the measurement nothing).
    metrics = {"samples_per_s": rates, "world_size": world}
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "rates.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def run_peer(cfg: dict[str, Any], workers: int, rounds: int, windows: int, warmup_rounds: int,
             storage: str) -> list[float]:
    """samples/s of each timed window of the Ray Train peer (rank 0's clock; DDP keeps ranks in step)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = float(cfg["resources"]["threads_per_worker"])
    trainer = TorchTrainer(
        peer_train_loop,
        train_loop_config={"cfg": cfg, "rounds": rounds, "windows": windows, "warmup_rounds": warmup_rounds},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(storage_path=storage, name=f"ganray-bench-peer-{workers}w-{int(time.time())}"),
    )
    result = trainer.fit()
    return [float(x) for x in result.metrics["samples_per_s"]]


def _windows(contender: EngineContender, rounds: int, windows: int) -> list[float]:
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        images = contender.run(rounds)
        out.append(images / (time.perf_counter() - t0))
    return out


def peer(ctx: BenchContext) -> Report:
    """ganray `replicated` against Ray Train TorchTrainer + DDP, 1 and 2 workers, MLP and DCGAN-32."""
    ctx.ensure_ray()
    data: dict[str, Any] = {}
    rows: list[list[Any]] = []
    windows = ctx.reps
    with tempfile.TemporaryDirectory(prefix="ganray-bench-peer-") as storage:
        for case in ctx.models():
            for workers in (1, 2):
                cfg = ctx.config(case, topology={"kind": "replicated", "num_workers": workers})
                plain = plain_contender(ctx.config(case), workers)
                ganray = EngineContender(cfg)
                try:
                    ganray.run(ctx.warmup_rounds)
                    rounds = rounds_for(ganray, ctx.rep_seconds(case), max(1, ctx.warmup_rounds), 10_000)
                    # ganray, then the peer, then ganray again: the peer sits between two samples.
                    before = _windows(ganray, rounds, (windows + 1) // 2)
                    peer_rates = run_peer(cfg.model_dump(), workers, rounds, windows, ctx.warmup_rounds, storage)
                    after = _windows(ganray, rounds, windows // 2 or 1)
                    plain.run(ctx.warmup_rounds)
                    plain_rates = []
                    for _ in range(windows):
                        t0 = time.perf_counter()
                        plain_rates.append(plain.run(rounds) / (time.perf_counter() - t0))
                finally:
                    ganray.close()
                ganray_rates = before + after
                g_med, p_med = statistics.median(ganray_rates), statistics.median(peer_rates)
                plain_med = statistics.median(plain_rates)
                row = {"workers": workers, "threads_per_worker": 1, "batch": cfg.schedule.batch_size,
                       "rounds_per_window": rounds,
                       "samples_per_s": {"ganray": ganray_rates, "peer": peer_rates, f"plain_{workers}t": plain_rates},
                       "summary": {"ganray": summary(ganray_rates), "peer": summary(peer_rates),
                                   f"plain_{workers}t": summary(plain_rates)},
                       "ratio": g_med / p_med, "peer_plain_ratio": p_med / plain_med,
                       "ganray_plain_ratio": g_med / plain_med, "target": PEER_TARGETS[(case, workers)]}
                data[f"{case}_{workers}w"] = row
                rows.append([case, workers, f"{p_med:,.0f}", f"{g_med:,.0f}", f"{plain_med:,.0f}",
                             f"{row['ratio']:.2f}", f"{row['peer_plain_ratio']:.2f}",
                             f">= {PEER_TARGETS[(case, workers)]}"])
    return Report(data, ["model", "workers", "Ray Train DDP", "ganray replicated", f"plain loop (N threads)",
                         "ganray / Ray Train", "Ray Train / plain", "target"], rows,
                  ["Medians of timed windows after warm-up; the peer measures inside its train loop (rank 0), "
                   "ganray in the driver around engine.run (Ray call included). 1 thread per worker; the plain "
                   "loop runs with as many threads as there are workers."])
