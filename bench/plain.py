"""The zero-overhead reference of `ganray bench`: a plain PyTorch GAN loop (tuned, and minimal as an
extra row), ganray's round run in the same process, and the GPU rows that time them side by side.

`PlainGAN` is the same GAN written by hand: the same networks (built by `ganray.models.registry`
from the same config), the same global batch, Adam for both, the non-saturating loss and the same
phase table as a ganray round (`n_critic` D steps on fakes made without a graph, one G step with D
frozen, an EMA update of G_ema), in one process, with nothing else: no gradient-norm checks, no
per-round metrics, no noise streams. Any gap between it and an engine is ganray's overhead.

Two ways of writing it (BENCHMARKS.md). The *tuned* loop, every suite's reference, is what a
performance-minded engineer writes: batches indexed from a tensor already on the device, fused
Adam, one foreach lerp for the EMA, channels_last where ganray resolves it (conv nets on CPU).
The *minimal* loop (default for-loop Adam, a per-parameter Python EMA, each batch copied to the
device) is shown as an extra row only: what those settings buy is not orchestration.

This module needs only torch, numpy, the standard library (`ganray.bench.timing`),
`ganray.models` and `ganray.workers` (no pydantic, Ray or MLflow; tests/test_bench.py checks it):
configs arrive as plain dicts (`TrainConfig.model_dump()`), so the GPU rows can run on a machine
that has nothing but PyTorch (`python -m ganray.bench.plain`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ganray.bench.timing import Contender, add_ratio, compare
from ganray.models.ema import EmaPair
from ganray.models.registry import build_discriminator, build_generator
from ganray.workers.data import load_dataset
from ganray.workers.stepper import build_replica

# ---------------------------------------------------------------------------------------------
# Device, autocast and memory format, resolved from the `resources` section


@dataclass(frozen=True)
class Runtime:
    """Where and how the plain loop computes; must agree with `workers.steps.StepSettings`."""

    device: torch.device
    autocast_bf16: bool
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        # CUDA kernels run asynchronously: a timer must wait for them before it stops.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_runtime(resources: dict[str, Any]) -> Runtime:
    """The device (`resources.device`: auto | cpu | cuda), bf16 autocast (`resources.precision`,
    CUDA only) and channels_last (`resources.channels_last`; unset: on for CPU, off on CUDA) a job
    runs with.

    Written out independently of the engine's resolution on purpose: the tests check the two agree
    on every combination, so a benchmark never compares different numerics by accident.
    """
    requested = resources.get("device", "auto")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("resources.device is 'cuda' but no GPU is visible; use resources.device: cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return Runtime(device=device,
                   autocast_bf16=use_cuda and resources.get("precision", "fp32") == "bf16",
                   channels_last=(not use_cuda) if resources.get("channels_last") is None
                   else bool(resources["channels_last"]))


# ---------------------------------------------------------------------------------------------
# The plain loop


def training_set(cfg: dict[str, Any]) -> torch.Tensor:
    """Every training sample of the job `cfg` describes, as one tensor: the plain loop's data."""
    source = load_dataset(cfg["data"], int(cfg["seed"]), "train")
    return torch.as_tensor(source.get(np.arange(len(source))))


class PlainGAN:
    """The hand-written single-process loop; `run(n)` trains n rounds and returns images consumed."""

    def __init__(self, cfg: dict[str, Any], data: torch.Tensor, threads: int, tuned: bool = True) -> None:
        """`tuned` (the default, the reference): the data moved to the device once, fused Adam, one
        `_foreach_lerp_` for the EMA. `tuned=False` is the minimal loop, an extra row only."""
        loss = cfg["loss"]
        if loss["kind"] != "nonsaturating" or float(loss.get("r1_gamma", 0.0)) != 0.0:
            # The loop implements the bench cases' loss only; any other would time different work.
            raise ValueError(f"the plain loop runs the non-saturating loss without R1, not {loss['kind']!r} "
                             f"with r1_gamma {loss.get('r1_gamma')}")
        self.threads = int(threads)
        torch.set_num_threads(self.threads)
        self.rt = resolve_runtime(cfg["resources"])
        sched = cfg["schedule"]
        self.batch = int(sched["batch_size"])
        self.n_critic = int(sched["n_critic"])
        betas = (float(sched["betas"][0]), float(sched["betas"][1]))
        shape = tuple(int(s) for s in data.shape[1:])
        torch.manual_seed(int(cfg["seed"]))
        dev = self.rt.device
        self.G = build_generator(cfg["model"], shape).to(dev)
        self.D = build_discriminator(cfg["model"], shape).to(dev)
        if self.rt.channels_last and len(shape) == 3:
            self.G = self.G.to(memory_format=torch.channels_last)
            self.D = self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.ema = EmaPair(self.G_ema, self.G)
        self.tuned = bool(tuned)
        fused = {"fused": True} if self.tuned else {}
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=float(sched["g_lr"]), betas=betas, **fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=float(sched["d_lr"]), betas=betas, **fused)
        half_life = float(sched["ema_half_life_kimg"])
        self.ema_beta = 0.5 ** (self.batch / (half_life * 1000.0)) if half_life > 0 else 0.0
        self.z_dim = int(self.G.z_dim)
        self.data = data.to(dev) if self.tuned else data
        self.conv = len(shape) == 3
        self._batches = self._epochs()

    @property
    def settings(self) -> dict[str, Any]:
        """What this contender runs with, recorded beside its figures in the suite's JSON."""
        return {"contender": f"plain loop, {'tuned' if self.tuned else 'minimal'}", "threads": self.threads,
                "batch": self.batch, "n_critic": self.n_critic, "loss": "nonsaturating",
                "device": str(self.rt.device), "autocast_bf16": self.rt.autocast_bf16,
                "channels_last": self.rt.channels_last and self.conv,
                "adam": "fused" if self.opt_G.defaults.get("fused") else "default (for-loop)",
                "ema": "foreach lerp" if self.tuned else "per-parameter Python loop",
                "batches": ("index_select from a tensor on the device" if self.tuned
                            else "index_select on the host tensor, copied to the device per batch")}

    def _epochs(self) -> Iterator[torch.Tensor]:
        """Shuffled batches, the last partial batch of each epoch dropped (as ganray's sampler)."""
        n = self.data.shape[0]
        while True:
            perm = torch.randperm(n, device=self.data.device)
            for start in range(0, n - self.batch + 1, self.batch):
                yield self.data.index_select(0, perm[start:start + self.batch])

    def _round(self) -> None:
        dev, ac = self.rt.device, self.rt.autocast
        for _ in range(self.n_critic):
            real = next(self._batches).to(dev, non_blocking=True)
            z = torch.randn(self.batch, self.z_dim, device=dev)
            with torch.no_grad(), ac():
                fake = self.G(z)
            with ac():
                loss_d = F.softplus(-self.D(real).float()).mean() + F.softplus(self.D(fake).float()).mean()
            self.opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_D.step()
        z = torch.randn(self.batch, self.z_dim, device=dev)
        self.D.requires_grad_(False)  # G's step must not compute D's parameter gradients
        with ac():
            loss_g = F.softplus(-self.D(self.G(z)).float()).mean()
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_G.step()
        self.D.requires_grad_(True)
        with torch.no_grad():
            if self.tuned:  # ganray's own fused EMA update (one foreach lerp, buffers copied)
                self.ema.update(self.ema_beta)
                return
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
                p_ema.lerp_(p, 1.0 - self.ema_beta)
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
                b_ema.copy_(b)

    def run(self, n_rounds: int) -> int:
        torch.set_num_threads(self.threads)  # other contenders in this process may have changed it
        for _ in range(n_rounds):
            self._round()
        self.rt.synchronize()
        return n_rounds * self.n_critic * self.batch

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# ganray's round in this process


class StepperContender:
    """ganray's round in this process: the `ReplicaStepper` that `LocalEngine` and every replica
    run, built by the same `build_replica`.

    Used where no `TrainConfig` can be built (the GPU rows on a machine without pydantic/Ray); it
    is exactly what `LocalEngine.run` does, minus packing the result into a `ChunkResult`.
    """

    def __init__(self, cfg: dict[str, Any], threads: int) -> None:
        self.threads = int(threads)
        torch.set_num_threads(self.threads)
        self.stepper = build_replica(cfg)
        st = self.stepper.settings
        self.settings = {"contender": "ganray's round in this process (ReplicaStepper from build_replica; no Ray)",
                         "threads": self.threads, "batch": st.global_batch, "loss": st.loss_kind,
                         "device": str(st.device), "autocast_bf16": st.autocast_bf16,
                         "channels_last": st.channels_last and len(tuple(self.stepper.source.sample_shape)) == 3,
                         "adam": "fused", "ema": "foreach lerp"}

    def run(self, n_rounds: int) -> int:
        torch.set_num_threads(self.threads)
        before = self.stepper.images_seen
        self.stepper.run_rounds(n_rounds)  # ends with .tolist() of the metrics: a device sync
        return self.stepper.images_seen - before

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# GPU rows: DCGAN 64x64, bf16 autocast on and off, channels_last on and off


GPU_VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def gpu_variant_cfg(base: dict[str, Any], precision: str, channels_last: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    cfg["resources"].update({"device": "cuda", "precision": precision, "channels_last": channels_last})
    return cfg


# What a GPU row's ganray contender times, by how it was built.
IN_PROCESS = ("ganray's round in this process (the ReplicaStepper every replica runs); no Ray in the path: "
              "the Ray path adds only the driver's call per chunk, measured on CPU by `ganray bench overhead`")


def gpu_rows(base: dict[str, Any], reps: int, target_s: float, warmup_rounds: int,
             engine_factory: Optional[Callable[[dict[str, Any]], Contender]] = None,
             timed: str = IN_PROCESS) -> dict[str, Any]:
    """`dcgan64_<precision>[_cl]` rows: ganray against the tuned plain loop (the reference) and the
    minimal one (an extra row) on the same card, same settings, alternated.

    `engine_factory(cfg)` makes ganray's contender (a Ray replica where Ray is available; `timed`
    then says so); the default is the in-process `ReplicaStepper` (the `local` engine's round).
    """
    rows: dict[str, Any] = {}
    threads = int(base["resources"]["threads_per_worker"])
    for precision, cl in GPU_VARIANTS:
        cfg = gpu_variant_cfg(base, precision, cl)
        data = training_set(cfg)
        ganray = engine_factory(cfg) if engine_factory is not None else StepperContender(cfg, threads)
        try:
            contenders = {"tuned": PlainGAN(cfg, data, threads), "minimal": PlainGAN(cfg, data, threads, tuned=False),
                          "ganray": ganray}
            row = compare(cfg, contenders, reps, target_s, warmup_rounds, reference="tuned")
        finally:
            ganray.close()
        row["ratio"], row["ratio_range"] = row["ganray_ratio"], row["ganray_ratio_range"]
        add_ratio(row, "vs_minimal_ratio", "ganray", "minimal")
        row.update(reference="tuned", timed=timed, precision=precision, channels_last=cl)
        rows[f"dcgan64_{precision}{'_cl' if cl else ''}"] = row
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m ganray.bench.plain CONFIG.json --out DIR`: the GPU rows from a
    resolved config dict (written by `ganray bench` where pydantic is installed)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="target time of one timed repetition")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: the GPU rows need torch.cuda")
    base = json.loads(args.config.read_text())
    rows = gpu_rows(base, args.reps, args.seconds, warmup_rounds=5)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "timed": IN_PROCESS, **rows}
    (args.out / "overhead_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"ganray column: {IN_PROCESS}")
    for name, row in rows.items():
        s = row["summary"]
        print(f"{name}: tuned {s['tuned']['median']:.0f}/s minimal {s['minimal']['median']:.0f}/s "
              f"ganray {s['ganray']['median']:.0f}/s ganray/tuned {row['ratio']:.3f} "
              f"({row['ratio_range'][0]:.3f}-{row['ratio_range'][1]:.3f}) ganray/minimal {row['vs_minimal_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
