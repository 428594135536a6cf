"""`ganray bench`'s contenders (issue 16): the tuned loop as the reference, the minimal loop as an
extra row, the pairings of the suites, the GPU rows' labels, and the two Ray Train peers run for
real (1 worker). No test asserts a timing threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench_helpers import FixedContender, ratio_items
from ganray.bench.cases import case_config
from ganray.bench.plain import PlainGAN, gpu_variant_cfg, training_set


def test_tuned_plain_loop_follows_the_minimal_one() -> None:
    """The tuned reference (the default: data on the device, fused Adam, foreach EMA) is a faster
    way to do the same thing: same seed, same batches, the same parameters after a few rounds."""
    cfg = case_config("mlp", data={"size": 512}, model={"hidden": 16, "depth": 2},
                      schedule={"batch_size": 64, "ema_half_life_kimg": 0.1}).model_dump()
    data = torch.randn(512, 2)
    torch.manual_seed(5)
    minimal = PlainGAN(cfg, data, threads=1, tuned=False)
    minimal.run(4)
    torch.manual_seed(5)
    tuned = PlainGAN(cfg, data, threads=1)
    tuned.run(4)
    assert tuned.opt_G.defaults["fused"] and not minimal.opt_G.defaults.get("fused")
    assert tuned.settings["adam"] == "fused" and tuned.settings["ema"] == "foreach lerp"
    assert minimal.settings["adam"] == "default (for-loop)" and minimal.settings["contender"].endswith("minimal")
    for a, b in zip(list(minimal.G_ema.parameters()) + list(minimal.D.parameters()),
                    list(tuned.G_ema.parameters()) + list(tuned.D.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tuned_loop_runs_conv_nets_channels_last_on_cpu_and_only_the_bench_loss() -> None:
    """channels_last where ganray resolves it (conv nets on CPU), recorded in its settings; a loss
    the loop does not implement is refused rather than timed as something else."""
    cfg = case_config("dcgan32", model={"base_width": 8, "z_dim": 8}, data={"size": 64}).model_dump()
    loop = PlainGAN(cfg, training_set(cfg), threads=1)
    assert loop.settings["channels_last"] is True
    conv_weights = [p for p in loop.D.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert loop.run(1) == 64
    mlp = PlainGAN(case_config("mlp", data={"size": 1024}).model_dump(), torch.randn(1024, 2), threads=1)
    assert mlp.settings["channels_last"] is False
    with pytest.raises(ValueError, match="non-saturating"):
        PlainGAN(case_config("mlp", loss={"r1_gamma": 0.1}).model_dump(), torch.randn(1024, 2), threads=1)


def test_gpu_rows_time_the_in_process_round_against_the_tuned_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU rows' assembly, run on CPU (the variants' device forced to cpu): the tuned loop is
    the reference, the minimal loop an extra row, and each row says what its ganray column times."""
    from ganray.bench import plain

    def on_cpu(base: dict[str, Any], precision: str, channels_last: bool) -> dict[str, Any]:
        cfg = gpu_variant_cfg(base, precision, channels_last)
        cfg["resources"]["device"] = "cpu"
        return cfg

    monkeypatch.setattr(plain, "gpu_variant_cfg", on_cpu)
    base = case_config("mlp", data={"size": 512}, model={"hidden": 16, "depth": 2},
                       schedule={"batch_size": 64}).model_dump(mode="json")
    rows = plain.gpu_rows(base, reps=1, target_s=0.01, warmup_rounds=1)
    assert list(rows) == ["dcgan64_fp32", "dcgan64_fp32_cl", "dcgan64_bf16", "dcgan64_bf16_cl"]
    for row in rows.values():
        assert row["reference"] == "tuned" and set(row["samples_per_s"]) == {"tuned", "minimal", "ganray"}
        assert row["ratio"] == row["ganray_ratio"] > 0 and row["vs_minimal_ratio"] > 0
        assert row["timed"] == plain.IN_PROCESS and "no Ray" in row["settings"]["ganray"]["contender"]
        assert row["settings"]["tuned"]["adam"] == "fused" and row["settings"]["minimal"]["adam"] != "fused"


class _FakeEngine(FixedContender):
    """Stands in for a ganray engine in a suite's pairing logic (no Ray, no timing)."""

    def __init__(self, config: Any) -> None:
        super().__init__(64)
        self.settings = {"topology": config.topology.model_dump(exclude_none=True)}


def test_split_is_paired_with_the_tuned_loop_at_as_many_threads_as_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ganray.bench import split_suite
    from ganray.bench.harness import BenchContext, BenchOptions

    made: list[tuple[int, bool]] = []

    def fake_plain(config: Any, threads: int, tuned: bool = True) -> FixedContender:
        made.append((threads, tuned))
        loop = FixedContender(64)
        loop.settings = {"threads": threads, "tuned": tuned}  # type: ignore[attr-defined]
        return loop

    monkeypatch.setattr(split_suite, "plain_contender", fake_plain)
    monkeypatch.setattr(split_suite, "EngineContender", _FakeEngine)
    monkeypatch.setattr(BenchContext, "ensure_ray", lambda self: None)
    report = split_suite.split(BenchContext(BenchOptions(out=tmp_path, quick=True)))
    assert made == [(2, True), (3, True)]  # one tuned loop per process count, never the minimal one
    for name, processes in (("g1d1", 2), ("g1d1_overlap", 2), ("g1d2", 3), ("g1d2_overlap", 3)):
        row = report.data[name]
        assert row["reference"] == f"tuned_{processes}t" and row["processes"] == processes
        assert set(row["samples_per_s"]) == {f"tuned_{processes}t", "split"}
        assert row["settings"][f"tuned_{processes}t"] == {"threads": processes, "tuned": True}
        assert row["ratio"] == row["split_ratio"] > 0 and row["sized_on"] == "split"
    assert report.data["g1d1"]["target"] == 0.6 and report.data["g1d1_overlap"]["target"] == 0.8
    assert report.data["g1d2"]["target"] is None


def test_bench_peer_quick_runs_both_ray_train_peers(ray_session: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The peer suite with real Ray Train (1 worker): the fair peer and the example peer take turns
    with ganray and the two plain loops, and the workers report the settings they ran with."""
    from ganray.orchestrator.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "peer", "--quick", "--models", "mlp", "--workers", "1", "--out", str(out)]) == 0
    assert "## peer" in capsys.readouterr().out
    body = json.loads((out / "peer.json").read_text())
    assert set(body) >= {"mlp_1w"} and "mlp_2w" not in body
    row = body["mlp_1w"]
    assert set(row["samples_per_s"]) == {"ganray", "peer_fair", "peer_example", "tuned", "minimal"}
    assert all(len(v) == 2 for v in row["samples_per_s"].values())  # --quick: 2 windows each
    assert row["reference"] == "peer_fair" and row["target"] == 1.0
    fair, example = row["settings"]["peer_fair"], row["settings"]["peer_example"]
    assert fair["adam"] == "fused" and example["adam"] == "default (for-loop)"
    # What the Ray Train workers report they ran with, not only what was asked.
    assert fair["worker_report"]["fused_adam"] is True and example["worker_report"]["fused_adam"] is False
    assert fair["worker_report"]["world_size"] == 1 and fair["worker_report"]["channels_last"] is False
    assert row["settings"]["tuned"]["threads"] == 1 and row["settings"]["ganray"]["topology"]["num_workers"] == 1
    keys = {k for k, _ in ratio_items(body)}
    assert {"mlp_1w.ratio", "mlp_1w.example_ratio", "mlp_1w.tuned_fair_ratio", "mlp_1w.tuned_minimal_ratio"} <= keys
    for key, value in ratio_items(body):
        assert isinstance(value, float) and value > 0 and math.isfinite(value), (key, value)
