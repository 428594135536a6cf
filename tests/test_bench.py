"""`ganray bench`: the plain reference loop, the GPU settings logic, and a --quick pass of the CLI.

No test asserts a timing threshold: speed is for the benchmark itself; here we check that the
harness measures, compares and reports (JSON keys, positive finite ratios, sane quality figures).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

from bench_helpers import FixedContender, ratio_items
from ganray.bench.cases import case_config, case_tree
from ganray.bench.harness import REPO, SUITES, Report, fmt, machine_info
from ganray.bench.overhead import gpu_engine_config
from ganray.bench.plain import GPU_VARIANTS, PlainGAN, gpu_variant_cfg, resolve_runtime
from ganray.bench.quality import _vae_scores, best_point, first_time, meets_target, stats, worst
from ganray.bench.scaling import worker_counts
from ganray.bench.timing import alternate, paired_ratios, summary
from ganray.models.errors import ConfigError
from ganray.workers.data import load_dataset
from ganray.workers.settings import StepSettings


# -- settings: the plain loop and the engine must resolve device/autocast/memory format alike ----


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True, None])
def test_runtime_matches_engine_settings_on_cpu(device: str, precision: str, channels_last: Optional[bool]) -> None:
    cfg = case_config("dcgan32", resources={"device": device, "precision": precision,
                                            "channels_last": channels_last}).model_dump()
    rt, st = resolve_runtime(cfg["resources"]), StepSettings.from_config(cfg)
    assert (rt.device, rt.autocast_bf16, rt.channels_last) == (st.device, st.autocast_bf16, st.channels_last)
    if not torch.cuda.is_available():
        # No GPU: bf16 autocast is CUDA-only; channels_last is as asked, and on when unset.
        assert rt.device.type == "cpu" and not rt.autocast_bf16
        assert rt.channels_last == (True if channels_last is None else channels_last)


@pytest.mark.parametrize("precision,channels_last", GPU_VARIANTS)
def test_gpu_rows_resolve_identically_with_a_visible_gpu(monkeypatch: pytest.MonkeyPatch, precision: str,
                                                         channels_last: bool) -> None:
    """The GPU rows' configuration logic, on a CPU machine: pretend CUDA is visible and check that
    the plain loop and ganray's step settings pick the same device, autocast and memory format."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    base = case_config("dcgan64").model_dump(mode="json")
    cfg = gpu_variant_cfg(base, precision, channels_last)
    engine_cfg = gpu_engine_config(cfg)
    assert engine_cfg.topology.kind == "replicated" and engine_cfg.layout.count("replica") == 1
    assert engine_cfg.resources.gpus_per_worker == 1.0 and engine_cfg.data.resolution == 64
    for tree in (cfg, engine_cfg.model_dump()):
        rt, st = resolve_runtime(tree["resources"]), StepSettings.from_config(tree)
        assert rt.device == st.device == torch.device("cuda", 0)
        assert rt.autocast_bf16 == st.autocast_bf16 == (precision == "bf16")
        assert rt.channels_last == st.channels_last == channels_last
    assert base["resources"]["precision"] == "fp32"  # the variant is a copy, the base is untouched


def test_cuda_requested_without_gpu_fails_in_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = case_config("dcgan64").model_dump()
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_runtime(cfg["resources"])
    with pytest.raises(RuntimeError, match="cuda"):
        StepSettings.from_config(cfg)


# -- the plain loop and the timer ---------------------------------------------------------------


def _all(data: dict[str, Any], seed: int, split: str) -> torch.Tensor:
    source = load_dataset(data, seed, split)
    return source.get(np.arange(len(source)))


def test_random_images_shape_range_and_splits() -> None:
    """The image cases' data set, built into the data readers (no bench code in the workers)."""
    data = {"name": "random_images", "resolution": 16, "channels": 3, "size": 20}
    train, test = _all(data, 0, "train"), _all(data, 0, "test")
    assert train.shape == (20, 3, 16, 16) and float(train.min()) >= -1.0 and float(train.max()) <= 1.0
    assert not torch.equal(train, test) and not torch.equal(train, _all(data, 1, "train"))
    assert torch.equal(train, _all(data, 0, "train"))
    assert _all({**data, "channels": None}, 0, "train").shape == (20, 3, 16, 16)  # RGB unless told
    with pytest.raises(ConfigError, match="data.resolution is required"):
        load_dataset({**data, "resolution": None}, 0, "train")


def test_plain_loop_trains_the_registry_networks() -> None:
    cfg = case_config("mlp", data={"size": 2048}, model={"hidden": 16, "depth": 2},
                      schedule={"batch_size": 64, "n_critic": 2, "ema_half_life_kimg": 0.1}).model_dump()
    data = torch.randn(2048, 2)
    loop = PlainGAN(cfg, data, threads=1)
    g0 = [p.detach().clone() for p in loop.G.parameters()]
    d0 = [p.detach().clone() for p in loop.D.parameters()]
    ema0 = [p.detach().clone() for p in loop.G_ema.parameters()]
    assert loop.run(3) == 3 * 2 * 64  # n_critic real batches per round, as ganray counts images
    assert all(not torch.equal(a, p) for a, p in zip(g0, loop.G.parameters()))
    assert all(not torch.equal(a, p) for a, p in zip(d0, loop.D.parameters()))
    # G_ema moved from its start towards G, and D's gradients were re-enabled after G's step.
    assert any(not torch.equal(a, p) for a, p in zip(ema0, loop.G_ema.parameters()))
    assert all(p.requires_grad for p in loop.D.parameters())
    assert not any(p.requires_grad for p in loop.G_ema.parameters())


def test_alternate_runs_every_contender_each_rep_after_an_untimed_warmup() -> None:
    a, b = FixedContender(10), FixedContender(20)
    seen: list[int] = []
    out = alternate({"a": a, "b": b}, reps=3, rounds=4, warmup_rounds=2, on_rep=lambda rep, figs: seen.append(rep))
    assert a.calls == [2, 4, 4, 4] and b.calls == [2, 4, 4, 4]
    assert seen == [0, 1, 2] and len(out["a"]) == len(out["b"]) == 3
    assert all(x > 0 and math.isfinite(x) for x in out["a"] + out["b"])


def test_summary_and_paired_ratios() -> None:
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert paired_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    assert paired_ratios([1.0], [0.0]) == []


# -- reporting helpers ---------------------------------------------------------------------------


def test_report_markdown_and_formatting() -> None:
    table = Report({}, ["a", "b"], [[1234.5, 0.5], [None, True]], ["note"]).markdown().splitlines()
    assert table[:4] == ["| a | b |", "|---|---|", "| 1,234 | 0.500 |", "| - | yes |"]
    assert table[-1] == "note"
    assert fmt(1.234) == "1.23" and fmt(float("inf")) == "inf"


def test_machine_info_names_the_machine() -> None:
    info = machine_info()
    import mlflow
    import ray

    assert info["cores"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["ray"] == ray.__version__ and info["mlflow"] == mlflow.__version__
    assert (info["gpu"] is None) == (not torch.cuda.is_available())


def test_cases_and_worker_counts() -> None:
    assert worker_counts(2) == [1, 2] and worker_counts(1) == [1, 2] and worker_counts(9) == [1, 2, 4, 8]
    tree = case_tree("mlp", topology={"kind": "replicated", "num_workers": 2})
    assert tree["topology"] == {"kind": "replicated", "num_workers": 2}
    assert case_tree("mlp")["loss"]["r1_gamma"] == 0.0  # the plain loop has no R1: neither may the engine
    cfg = case_config("dcgan32")
    assert cfg.data.resolution == 32 and cfg.model.generator == "dcgan" and cfg.schedule.batch_size == 64


def test_quality_helpers() -> None:
    timeline = [{"wall_s": 1.0, "modes": 7, "hq": 0.99, "kl": 0.1},
                {"wall_s": 2.0, "modes": 8, "hq": 0.90, "kl": 0.02},
                {"wall_s": 3.0, "modes": 8, "hq": 0.97, "kl": 0.01}]
    assert first_time(timeline, 8) == 2.0
    assert first_time(timeline, 8, hq=0.95, kl=0.03) == 3.0
    assert first_time(timeline, 25) is None
    s = stats([1.0, 3.0, None])
    assert s["mean"] == 2.0 and s["n"] == 2 and s["of"] == 3 and s["min"] == 1.0
    assert stats([None, float("inf")])["mean"] is None
    # The best evaluation (most modes, then hq, then KL) is reported beside the final one.
    assert best_point(timeline + [{"wall_s": 4.0, "modes": 8, "hq": 0.96, "kl": 0.02}])["wall_s"] == 3.0
    assert meets_target(timeline[2], 8) and not meets_target(timeline[1], 8) and not meets_target({}, 8)
    assert worst([0.9, None, 0.7]) == 0.7 and worst([0.01, 0.05], lower_is_better=True) == 0.05


# -- the package boundary -----------------------------------------------------------------------

# Installed as sitecustomize in a subprocess (and so in every process it spawns): the host has
# torch and numpy, and none of ganray's control-plane dependencies.
_REFUSE_HOOK = """
import importlib.abc, sys

REFUSED = ("ray", "mlflow", "pydantic", "typer", "ganray.orchestrator")


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == r or name.startswith(r + ".") for r in REFUSED):
            raise ModuleNotFoundError(f"{name} is not installed on this host", name=name)
        return None


sys.meta_path.insert(0, Refuse())
"""

# Trains the plain loop and ganray's in-process round side by side, as the GPU rows do.
_PLAIN_SCRIPT = """
import json, math, sys
from ganray.bench.plain import PlainGAN, StepperContender, training_set
from ganray.bench.timing import compare
cfg = json.load(open(sys.argv[1]))
row = compare(cfg, {"tuned": PlainGAN(cfg, training_set(cfg), 1), "ganray": StepperContender(cfg, 1)},
              reps=2, target_s=0.05, warmup_rounds=1, reference="tuned")
assert math.isfinite(row["ganray_ratio"]) and row["ganray_ratio"] > 0, row
assert row["reference"] == "tuned" and row["settings"]["tuned"]["adam"] == "fused", row["settings"]
assert "no Ray" in row["settings"]["ganray"]["contender"], row["settings"]
refused = [m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow", "pydantic", "typer")
           or m.startswith("ganray.orchestrator")]
assert not refused, refused
print("plain ok", row["ganray_ratio"])
"""


def _without_control_plane(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_REFUSE_HOOK)
    env = {**os.environ, "PYTHONPATH": str(hook), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tiny_mlp_json(tmp_path: Path) -> Path:
    cfg = case_config("mlp", data={"size": 2048}, model={"hidden": 16, "depth": 2},
                      schedule={"batch_size": 64}).model_dump(mode="json")
    path = tmp_path / "mlp.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_hook_refuses_what_a_bare_gpu_host_lacks(tmp_path: Path) -> None:
    """The check below can fail: under the hook, the control plane does not import."""
    done = _without_control_plane(tmp_path, "-c", "import ganray.orchestrator.job.config")
    assert done.returncode != 0 and "is not installed on this host" in done.stderr


def test_plain_loop_runs_without_ray_mlflow_or_the_orchestrator(tmp_path: Path) -> None:
    config = _tiny_mlp_json(tmp_path)
    done = _without_control_plane(tmp_path, "-c", _PLAIN_SCRIPT, str(config))
    assert done.returncode == 0 and "plain ok" in done.stdout, done.stderr[-3000:]
    # Its command line parses and stops at the missing GPU, not at an import.
    if not torch.cuda.is_available():
        done = _without_control_plane(tmp_path, "-m", "ganray.bench.plain", str(config), "--out", "gpu")
        assert done.returncode != 0 and "no GPU visible" in done.stderr, done.stderr[-3000:]


def test_cpu_scaling_runs_without_ray_mlflow_or_the_orchestrator(tmp_path: Path) -> None:
    config = _tiny_mlp_json(tmp_path)
    done = _without_control_plane(tmp_path, "-m", "ganray.bench.cpu_scaling", str(config), "--workers", "1,2",
                                  "--reps", "1", "--seconds", "0.05", "--out", "out", timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "cpu_scaling.json").read_text())["mlp"]
    assert set(rows) == {"1", "2"}
    for row in rows.values():
        assert row["replicated_ratio"] > 0 and math.isfinite(row["replicated_ratio"])


def test_nothing_outside_the_bench_names_it() -> None:
    """The control plane, the workers and the models never import ganray.bench, and no shipped
    config names bench code (a data loader, say) for the workers to import."""
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in ("orchestrator", "workers", "models", "configs")
                 for path in sorted((REPO / folder).rglob("*")) if path.suffix in (".py", ".yaml", ".json")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "ganray.bench" in line and not line.lstrip().startswith("#")]
    assert not offenders
    assert "ganray.bench" not in (REPO / "scripts" / "dcgan64-gpu.json").read_text()


def test_every_suite_resolves_to_its_own_module() -> None:
    modules = {target.partition(":")[0] for target in SUITES.values()}
    assert len(modules) == len(SUITES)  # one file per suite
    for name, target in SUITES.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_gpu_script_config_is_the_dcgan64_case() -> None:
    """scripts/dcgan64-gpu.json feeds `python -m ganray.bench.plain` on hosts without pydantic;
    it must be the resolved case, every key present (regenerate it with
    `python -m ganray.bench.cases dcgan64 > scripts/dcgan64-gpu.json`)."""
    shipped = json.loads((REPO / "scripts" / "dcgan64-gpu.json").read_text())
    assert shipped == case_config("dcgan64").model_dump(mode="json")


# -- the CLI, --quick ------------------------------------------------------------------------------


def test_unknown_suite_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ganray.orchestrator.cli import main

    assert main(["bench", "warp", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark suite 'warp'" in capsys.readouterr().err
    assert main(["bench", "overhead", "--models", "resnet", "--out", str(tmp_path)]) == 2


def test_bench_quick_writes_reports(ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ganray.orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    code = main(["bench", "overhead", "tracking", "compile", "quality", "--quick", "--models", "mlp", "--datasets",
                 "ring8", "--kimg", "4", "--seeds", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "## overhead" in printed and "| mlp |" in printed and "## quality" in printed and "## compile" in printed
    suites = ("overhead", "tracking", "compile", "quality")
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in suites}
    for name, body in reports.items():
        assert body["suite"] == name and body["quick"] is True and body["date"][:2] == "20"
        assert {"cpu", "cores", "torch", "ray", "mlflow", "gpu"} <= set(body["machine"])
        assert (out / f"{name}.md").read_text().startswith("| ")
    overhead = reports["overhead"]
    assert set(overhead["mlp"]["samples_per_s"]) == {"tuned", "minimal", "replicated", "local"}
    assert all(len(v) == 2 for v in overhead["mlp"]["samples_per_s"].values())  # --quick: 2 repetitions
    # The tuned loop is the reference; every contender's settings are recorded beside its figures.
    settings = overhead["mlp"]["settings"]
    assert overhead["mlp"]["reference"] == "tuned" and set(settings) == set(overhead["mlp"]["samples_per_s"])
    assert settings["tuned"]["adam"] == settings["replicated"]["adam"] == "fused"
    assert settings["minimal"]["adam"] == "default (for-loop)" and settings["minimal"]["ema"] != "foreach lerp"
    assert settings["tuned"]["threads"] == settings["replicated"]["threads_per_worker"] == 1
    assert settings["replicated"]["topology"] == {"kind": "replicated", "num_workers": 1}
    assert reports["tracking"]["settings"]["on"]["tracking.enabled"] is True
    assert "dcgan32" not in overhead  # --models mlp
    assert reports["tracking"]["ring8"]["ratio"] > 0
    # compile: the compiled worker against the tuned eager loop and eager ganray, after a check
    # that the compiled rounds give the eager weights (--quick traces with aot_eager).
    compiled = reports["compile"]["mlp"]
    assert reports["compile"]["backend"] == "aot_eager" and compiled["reference"] == "tuned"
    assert set(compiled["samples_per_s"]) == {"tuned", "eager", "compiled"}
    assert compiled["equality"]["equal"] is True and compiled["equality"]["rounds"] == 1
    assert set(compiled["first_chunk_s"]) == {"eager", "compiled"} and compiled["aim"] == 1.1
    assert math.isfinite(compiled["equality"]["cold_compile_s"])
    ratios = ratio_items(overhead) + ratio_items(reports["tracking"]) + ratio_items(reports["compile"])
    assert {"mlp.ratio", "mlp.local_ratio", "mlp.minimal_ratio", "ring8.ratio", "ring8.wall_ratio",
            "mlp.compiled_vs_eager_ratio"} <= {k for k, _ in ratios}
    for key, value in ratios:
        assert isinstance(value, float) and value > 0 and math.isfinite(value), (key, value)
    quality = reports["quality"]["ring8"]
    assert [s["seed"] for s in quality["seeds"]] == [1000, 1001]  # held out from the recipes' choice
    assert reports["quality"]["held_out"] is True
    assert quality["misses_final"] == sum(not s["final_meets_target"] for s in quality["seeds"])
    assert quality["worst_final"]["modes"] == min(s["modes"] for s in quality["seeds"])
    for seed in quality["seeds"]:
        assert 3.9 <= seed["kimg"] <= 5.0
        # The reported figures are the final evaluation's: the last probe of the timeline, taken
        # at the run's end; probes every kimg (--kimg 4 probes at 1 kimg), wall time increasing.
        timeline = seed["timeline"]
        assert [round(p["kimg"]) for p in timeline] == [1, 2, 3, 4] and timeline[-1]["kimg"] == seed["kimg"]
        assert {k: timeline[-1][k] for k in ("modes", "hq", "kl")} == {k: seed[k] for k in ("modes", "hq", "kl")}
        assert float(seed["modes"]).is_integer()
        walls = [p["wall_s"] for p in timeline]
        assert walls[0] > 0 and all(b > a for a, b in zip(walls, walls[1:])), walls
        # The VAE baseline is seeded: recomputed here it gives the same figures.
        # (The JSON report writes a reverse KL of inf, no sample near any mode, as null.)
        vae = _vae_scores("ring8", seed["seed"], 200)
        vae["kl"] = vae["kl"] if math.isfinite(vae["kl"]) else None
        assert {k: seed["vae"][k] for k in ("modes", "hq", "kl")} == {k: vae[k] for k in ("modes", "hq", "kl")}
    assert quality["ganray"]["modes"]["mean"] == pytest.approx(sum(s["modes"] for s in quality["seeds"]) / 2)
    assert quality["published"]["PacGAN4"]["modes"] == 7.8 and quality["ganray"]["modes"]["of"] == 2
    assert "grid25" not in reports["quality"] and "digits" not in reports["quality"]


def test_startup_reports_the_cold_and_the_warm_run_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ganray.bench import startup as suite
    from ganray.bench.harness import BenchContext, BenchOptions

    # Cold and warm of each topology, in the order the suite launches them: what the timer saw.
    seen = iter([10.9, 7.0, 21.5, 13.2])
    monkeypatch.setattr(suite, "time_to_first_metric", lambda *args, **kwargs: next(seen))
    report = suite.startup(BenchContext(BenchOptions(out=tmp_path)))
    local = report.data["local"]
    assert {k: local[k] for k in ("runs_s", "cold_s", "warm_s", "target_s", "met_cold", "met_warm")} == {
        "runs_s": [10.9, 7.0], "cold_s": 10.9, "warm_s": 7.0, "target_s": 20.0, "met_cold": True, "met_warm": True}
    assert [label.split(":")[0] for label in local["labels"]] == ["cold", "warm"]
    assert "topology.kind=local" in local["settings"]["command"]
    assert report.data["replicated"]["met_cold"] is False and report.data["replicated"]["met_warm"] is True
    assert [row[-1] for row in report.rows] == ["yes", "no (cold)"]
    assert report.header[1:3] == ["cold first run (s)", "warm second run (s)"]


def test_collective_micro_benchmark_writes_every_repetition(tmp_path: Path) -> None:
    """`python -m ganray.bench.micro_collective` with tiny settings, on a host without the control
    plane: both parts run in two processes, the shared-memory contender really went through
    shared memory, and the JSON keeps each repetition of both ranks beside the machine and load."""
    done = _without_control_plane(tmp_path, "-m", "ganray.bench.micro_collective", "--out", "micro.json",
                                  "--exchange-reps", "3", "--all-reduce-reps", "2", "--compute-ms", "0.5",
                                  "--exchange-sizes", "64", "--buffers", "4096,mlp:G", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads((tmp_path / "micro.json").read_text())
    assert {"cpu", "cores", "torch"} <= set(body["machine"])
    assert len(body["loadavg_before"]) == len(body["loadavg_after"]) == 3
    assert body["settings"]["buffer_numel"] == {"4096": 4096, "mlp:G": 35_458}  # the MLP generator's gradient
    assert body["paths"]["shared"].startswith("shared memory") and body["paths"]["gloo"].startswith("gloo")
    assert body["matmuls"] >= 1 and len(body["ranks"]) == 2
    for rank in body["ranks"]:
        assert all(len(rank["exchange"][c]["64"]) == 3 for c in ("back_to_back", "after_sleep", "after_compute",
                                                                   "recv_posted_before_compute",
                                                                   "gloo_all_reduce_back_to_back"))
        for mode in ("gloo", "shared"):
            for spec in ("4096", "mlp:G"):
                ops = [rank["all_reduce"][mode][spec][c] for c in ("back_to_back", "after_compute")]
                assert all(len(o) == 2 and all(end >= start for start, end in o) for o in ops)
    headline = body["summary"]["all_reduce"]["shared mlp:G after_compute"]["after_last_arrival_ms"]
    assert headline["n"] == 2 and 0 <= headline["min"] <= headline["median"] <= headline["max"]
    assert "all_reduce mlp:G after_compute: gloo / shared" in body["summary"]["ratios"]


def test_image_quality_targets_and_best_evaluations() -> None:
    from ganray.bench.quality_images import IMAGE_SETS, best_of, first_met

    stacked, conditional = IMAGE_SETS["stacked-digits"], IMAGE_SETS["digits-conditional"]
    timeline = [{"wall_s": 100.0, "kimg": 50, "modes": 990, "kl": 0.05, "confidence": 0.9},
                {"wall_s": 200.0, "kimg": 100, "modes": 1000, "kl": 0.2, "confidence": 0.9},
                {"wall_s": 300.0, "kimg": 150, "modes": 1000, "kl": 0.08, "confidence": 0.9}]
    assert first_met(timeline, stacked) == 300.0  # every mode AND KL <= 0.1
    assert not stacked.target({"modes": 1000, "kl": float("nan")})
    # The most modes first, a tie going to the lower KL; reported beside the final one.
    assert best_of(timeline, stacked)["kimg"] == 150
    assert best_of(timeline[:2] + [{**timeline[2], "kl": float("nan")}], stacked)["kimg"] == 100
    assert conditional.target({"class_acc_min": 0.95}) and not conditional.target({"class_acc": 0.99})


def test_quality_runs_the_conditional_digits_row_with_its_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ganray.orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["bench", "quality", "--quick", "--datasets", "digits-conditional", "--kimg", "0.256",
                 "--set", "topology.kind=local", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    body = json.loads((tmp_path / "quality.json").read_text())["digits-conditional"]
    assert body["overrides"] == ["topology.kind=local"] and body["topology"]["kind"] == "local"
    (seed,) = body["seeds"]
    assert seed["seed"] == 1000 and seed["kimg"] >= 0.256  # held out from the recipe's choice
    assert 0.0 <= seed["class_acc_min"] <= seed["class_acc"] <= 1.0
    assert body["misses_final"] == int(not seed["final_meets_target"])
    assert "digits-conditional (topology.kind=local), seed 1000" in printed
    assert main(["bench", "quality", "--set", "topology.num_workrs=2", "--out", str(tmp_path)]) == 2
    assert "did you mean 'topology.num_workers'" in capsys.readouterr().err


def test_quality_runs_of_separate_seeds_merge_into_one_report(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Seeds trained by separate `bench quality` runs (`--first-seed N --seeds 1`) report as one:
    statistics and misses over all seeds, best and time to target from each timeline; runs of
    another recipe or a repeated seed are refused in one line, writing nothing."""
    from ganray.bench.quality_images import summarize
    from ganray.bench.quality_merge import main as merge_main

    header = {"config": "configs/stacked-digits.yaml", "overrides": [], "topology": {"kind": "replicated"},
              "total_kimg": 3000.0, "probe_kimg": 250.0}

    def run(seed: int, final_kl: float, overrides: tuple[str, ...] = (), probe_kimg: float = 250.0) -> Path:
        timeline = [{"wall_s": 100.0, "kimg": 250.0, "modes": 1000.0, "kl": 0.09, "confidence": 0.6},
                    {"wall_s": 200.0, "kimg": 500.0, "modes": 1000.0, "kl": final_kl, "confidence": 0.7}]
        record = {"seed": seed, "kimg": 500.0, "wall_s": 220.0, "modes": 1000.0, "kl": final_kl, "confidence": 0.7,
                  "final_meets_target": final_kl <= 0.1, "time_to_target_s": None, "best": {}, "timeline": timeline}
        body = {"suite": "quality", "date": "2026-12-08T00:00:00+00:00", "wall_s": 250.0, "seeds": [seed],
                "stacked-digits": summarize("stacked-digits", {**header, "overrides": list(overrides),
                                                               "probe_kimg": probe_kimg}, [record])}
        path = tmp_path / f"run-{seed}-{len(overrides)}" / "quality.json"
        path.parent.mkdir()
        path.write_text(json.dumps(body))
        return path

    a, b = run(1001, 0.08), run(1000, 0.12, probe_kimg=25.0)  # evaluated more often: it merges
    assert merge_main(["--out", str(tmp_path / "merged"), str(a), str(b)]) == 0
    merged = json.loads((tmp_path / "merged" / "quality.json").read_text())
    body = merged["stacked-digits"]
    assert [s["seed"] for s in body["seeds"]] == [1000, 1001] and merged["held_out"] is True
    assert body["misses_final"] == 1 and body["ganray"]["kl"]["mean"] == pytest.approx(0.10)
    assert [s["time_to_target_s"] for s in body["seeds"]] == [100.0, 100.0]  # from the timelines
    assert body["seeds"][0]["best"]["kl"] == 0.09 and body["misses_within_budget"] == 0
    assert [m["path"] for m in merged["merged_from"]] == [str(a), str(b)]
    assert body["probe_kimg"] == [25.0, 250.0] and [s["probe_kimg"] for s in body["seeds"]] == [25.0, 250.0]
    assert "stacked-digits, seeds 1000-1001" in capsys.readouterr().out
    for bad, message in [([a, run(1002, 0.05, ("topology.num_workers=2",))], "another overrides"),
                         ([a, a], "seed 1001 of stacked-digits appears in more than one input"),
                         ([tmp_path / "missing.json"], "cannot read")]:
        assert merge_main(["--out", str(tmp_path / "refused"), *map(str, bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()
