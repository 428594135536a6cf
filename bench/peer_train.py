"""The Ray Train peer: the same GAN hand-written on Ray Train's `TorchTrainer` (DDP), in two styles,
and `PeerRun`, which lets the `peer` suite time it window by window between the other contenders.

Both styles build G and D from ganray's registry, wrap each with `ray.train.torch.prepare_model`
(DDP when there is more than one worker), keep two Adam optimizers and an EMA of G, and run
ganray's phase table (`n_critic` D steps on fakes made without a graph, one G step on fresh noise
with D frozen, the EMA update). Where they differ is `PEER_STYLES`:

- `fair`: what a performance-minded engineer writes on TorchTrainer, with ganray's settings:
  fused Adam, one foreach lerp for the EMA, channels_last where ganray resolves it (conv nets on
  CPU), batches indexed from a tensor on the worker (each rank its `DistributedSampler`-style
  share of a per-epoch permutation), fakes for D's step made by G's module (no DDP forward
  under no_grad), and DDP without buffer broadcasts (ganray's replicas keep their own BatchNorm
  statistics too).
- `example`: as in Ray Train's examples: a `DataLoader` over a `TensorDataset` through
  `prepare_data_loader` (a `DistributedSampler`, per-sample collation), default Adam, a Python
  loop for the EMA, NCHW, DDP's defaults.

Throughput is measured inside the train loop: after a warm-up, each rank times `windows` spans of
`rounds` rounds when the driver says go (through a small "baton" actor), and rank 0 reports global
samples/s per span; the peer is idle while the driver times the other contenders.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

PEER_STYLES: dict[str, dict[str, Any]] = {
    "fair": {"adam": "fused", "ema": "foreach lerp", "channels_last": "as ganray resolves it (conv nets on CPU)",
             "batches": "index_select from a tensor on the worker, per-rank share of a per-epoch permutation",
             "fake_forward": "G's module under no_grad", "ddp": {"broadcast_buffers": False},
             "prepare_model": "one DDP per network"},
    "example": {"adam": "default (for-loop)", "ema": "per-parameter Python loop", "channels_last": False,
                "batches": "DataLoader(TensorDataset) through prepare_data_loader (DistributedSampler)",
                "fake_forward": "the DDP-wrapped G under no_grad", "ddp": {},
                "prepare_model": "one DDP per network"},
}


def peer_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the GAN by hand on DDP (runs in each worker)."""
    import copy

    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from ganray.bench.plain import resolve_runtime
    from ganray.models.registry import build_discriminator, build_generator
    from ganray.workers.data import load_dataset

    cfg, style = config["cfg"], PEER_STYLES[config["style"]]
    fair = config["style"] == "fair"
    torch.set_num_threads(int(cfg["resources"]["threads_per_worker"]))
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    sched = cfg["schedule"]
    batch = int(sched["batch_size"]) // world
    n_critic = int(sched["n_critic"])
    betas = (float(sched["betas"][0]), float(sched["betas"][1]))
    source = load_dataset(cfg["data"], int(cfg["seed"]), "train")
    real_all = torch.as_tensor(source.get(np.arange(len(source))))
    shape = tuple(real_all.shape[1:])
    channels_last = fair and resolve_runtime(cfg["resources"]).channels_last and len(shape) == 3

    def prepare(net: torch.nn.Module) -> torch.nn.Module:
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return ray.train.torch.prepare_model(net, parallel_strategy_kwargs=dict(style["ddp"]) or None)

    torch.manual_seed(int(cfg["seed"]))
    G = prepare(build_generator(cfg["model"], shape))
    D = prepare(build_discriminator(cfg["model"], shape))
    G_plain, D_plain = getattr(G, "module", G), getattr(D, "module", D)
    G_ema = copy.deepcopy(G_plain).eval().requires_grad_(False)
    fused = {"fused": True} if fair else {}
    opt_G = torch.optim.Adam(G.parameters(), lr=float(sched["g_lr"]), betas=betas, **fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=float(sched["d_lr"]), betas=betas, **fused)
    half_life = float(sched["ema_half_life_kimg"])
    beta = 0.5 ** (int(sched["batch_size"]) / (half_life * 1000.0)) if half_life > 0 else 0.0
    z_dim = int(G_plain.z_dim)
    ema_params, g_params = list(G_ema.parameters()), list(G_plain.parameters())
    ema_buffers, g_buffers = list(G_ema.buffers()), list(G_plain.buffers())

    def tensor_batches():
        # DistributedSampler's split, written on a tensor: one permutation per epoch (the same on
        # every rank), each rank takes every world-th index, batches are index_select slices.
        data, epoch = real_all.to(device), 0
        while True:
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(int(cfg["seed"]) + epoch))
            mine = perm[rank::world].to(device)
            for start in range(0, len(mine) - batch + 1, batch):
                yield data.index_select(0, mine[start:start + batch])
            epoch += 1

    def loader_batches():
        from torch.utils.data import DataLoader, TensorDataset

        loader = ray.train.torch.prepare_data_loader(
            DataLoader(TensorDataset(real_all), batch_size=batch, shuffle=True, drop_last=True))
        epoch = 0
        while True:
            if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for (real,) in loader:
                yield real
            epoch += 1

    stream = tensor_batches() if fair else loader_batches()
    fake_G = G_plain if fair else G

    def one_round() -> None:
        for _ in range(n_critic):
            real = next(stream)
            z = torch.randn(batch, z_dim, device=device)
            with torch.no_grad():
                fake = fake_G(z)
            loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()
            opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_D.step()
        # G's step through D's module with D frozen: no D gradient is computed or all-reduced.
        D_plain.requires_grad_(False)
        loss_g = F.softplus(-D_plain(G(torch.randn(batch, z_dim, device=device)))).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        D_plain.requires_grad_(True)
        with torch.no_grad():
            if fair:
                torch._foreach_lerp_(ema_params, g_params, 1.0 - beta)
                if ema_buffers:
                    torch._foreach_copy_(ema_buffers, g_buffers)
                return
            for p_ema, p in zip(ema_params, g_params):
                p_ema.lerp_(p, 1.0 - beta)
            for b_ema, b in zip(ema_buffers, g_buffers):
                b_ema.copy_(b)

    for _ in range(int(config["warmup_rounds"])):
        one_round()
    baton = config["baton"]
    if rank == 0:
        ray.get(baton.set.remote("ready"))
    images = int(config["rounds"]) * n_critic * int(sched["batch_size"])  # global images per window
    rates = []
    for i in range(int(config["windows"])):
        # Every rank waits for the driver's go, so the peer is idle while the driver times the
        # other contenders, and busy only inside its own window.
        ray.get(baton.wait.remote(f"go{i}"))
        t0 = time.perf_counter()
        for _ in range(int(config["rounds"])):
            one_round()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(images / (time.perf_counter() - t0))
        if rank == 0:
            ray.get(baton.put.remote(f"done{i}", rates[-1]))
    # Ray Train V2 keeps only metrics that come with a checkpoint in the Result: rank 0 attaches a
    # tiny one (after the timed windows, so it costs the measurement nothing).
    metrics = {"samples_per_s": rates, "world_size": world, "channels_last": channels_last,
               "fused_adam": bool(opt_G.defaults.get("fused")), "ddp": type(G).__name__}
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
    """One Ray Train peer in a background thread, timed window by window when the driver says go."""

    def __init__(self, cfg: dict[str, Any], style: str, workers: int, rounds: int, windows: int,
                 warmup_rounds: int, storage: str) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self.style = style
        self.settings = {"contender": f"Ray Train TorchTrainer, {style}", "workers": workers,
                         "threads_per_worker": int(cfg["resources"]["threads_per_worker"]),
                         "batch": int(cfg["schedule"]["batch_size"]), **PEER_STYLES[style]}
        self.baton = _baton_class().remote()
        threads = float(cfg["resources"]["threads_per_worker"])
        self.trainer = TorchTrainer(
            peer_train_loop,
            train_loop_config={"cfg": cfg, "style": style, "rounds": rounds, "windows": windows,
                               "warmup_rounds": warmup_rounds, "baton": self.baton},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=storage,
                                 name=f"ganray-bench-peer-{style}-{workers}w-{time.time_ns()}"),
        )
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._fit, name=f"ray-train-peer-{style}", daemon=True)
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
                raise RuntimeError(f"the Ray Train peer ({self.style}) stopped before '{key}': {self.error!r}")
        raise TimeoutError(f"the Ray Train peer ({self.style}) did not reach '{key}' within {timeout_s:g} s")

    def ready(self, timeout_s: float = 900.0) -> None:
        self._await("ready", timeout_s)

    def run_window(self, i: int, timeout_s: float = 900.0) -> float:
        """Let the peer time its window `i`; returns its global samples/s."""
        import ray

        ray.get(self.baton.set.remote(f"go{i}"))
        value = self._await(f"done{i}", timeout_s)
        assert value is not None
        return float(value)

    def finish(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Wait for `fit()`; returns rank 0's final report (its rates and what it ran with)."""
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.thread.is_alive():
            raise TimeoutError(f"the Ray Train peer ({self.style}) did not finish within {timeout_s:g} s")
        return dict(getattr(self.result, "metrics", None) or {})
