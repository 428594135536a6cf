"""Config loading, overrides and the one-line errors of `ganray validate` / `train --dry-run`."""

from __future__ import annotations

import pytest

from ganray.models.errors import ConfigError
from ganray.orchestrator.cli import main
from ganray.orchestrator.job.config import (RESUME_ALLOWED, TrainConfig, config_differences, config_from_dict,
                                        load_config, parse_override)
from tests.conftest import REPO

SHIPPED = ["grid25.yaml", "ring8.yaml", "digits.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.name == name.split(".")[0]
    assert cfg.schedule.total_kimg > 0


def test_override_parses_yaml_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1.0e-3") == (["a"], 1e-3)
    assert load_config(None, ["schedule.g_lr=1e-3"]).schedule.g_lr == 1e-3  # pydantic coerces YAML 1.1 strings
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[0.5, 0.9]") == (["a"], [0.5, 0.9])
    assert parse_override("a=hello") == (["a"], "hello")
    cfg = load_config(REPO / "configs/grid25.yaml", ["topology.kind=replicated", "topology.num_workers=2",
                                                     "schedule.betas=[0.0, 0.9]"])
    assert cfg.topology.workers == 2 and cfg.schedule.betas == (0.0, 0.9)


@pytest.mark.parametrize("overrides, needle", [
    (["schedule.batchsize=3"], "did you mean 'schedule.batch_size'"),
    (["sched.total_kimg=3"], "did you mean 'schedule'"),
    (["schedule.g_lr=-1"], "schedule.g_lr must be > 0"),
    (["schedule.batch_size=abc"], "schedule.batch_size"),
    (["topology.kind=ring"], "topology.kind must be one of"),
    (["topology.kind=split", "topology.num_workers=2"], "belongs to topology.kind 'replicated'"),
    (["topology.kind=replicated", "topology.overlap=true"], "belongs to topology.kind 'split'"),
    (["topology.kind=replicated", "topology.num_workers=3", "schedule.batch_size=64"], "does not divide"),
    (["schedule.lr_decay=cosine", "schedule.lr_decay_kimg=null"], "lr_decay_kimg is required"),
    (["data.resolution=12"], "data.resolution must be one of"),
    (["schedule.betas=[1.5, 0.9]"], "schedule.betas"),
    (["nokey"], "not of the form"),
])
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/grid25.yaml", overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_not_yaml_and_not_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("argv", [
    ["validate", "CONFIG", "--set", "model.hiden=3"],
    ["validate", "CONFIG", "--set", "seed=-4"],
    ["train", "CONFIG", "--dry-run", "--set", "loss.kind=wasserstein"],
    ["train", "CONFIG", "--dry-run", "--set", "data.name=nosuchset"],
    ["validate", "/nonexistent/config.yaml"],
])
def test_cli_errors_exit_2_one_line(argv, capsys):
    argv = [str(REPO / "configs/grid25.yaml") if a == "CONFIG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "Traceback" not in err[0]


def test_validate_prints_resolved_config(capsys):
    assert main(["validate", str(REPO / "configs/grid25.yaml"), "--set", "seed=7"]) == 0
    out = capsys.readouterr().out
    cfg = config_from_dict(__import__("yaml").safe_load(out))
    assert cfg.seed == 7 and cfg.data.name == "grid25"


def test_dry_run_builds_models(capsys):
    assert main(["train", str(REPO / "configs/digits.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sample_shape=1x8x8" in out and "params_G=" in out


def test_resume_differences_name_keys():
    a = TrainConfig()
    b = config_from_dict({"schedule": {"total_kimg": 999, "g_lr": 0.1}})
    assert config_differences(a, b) == ["schedule.g_lr"]
    assert "schedule.total_kimg" in RESUME_ALLOWED
    assert a.config_hash(ignore=RESUME_ALLOWED) == config_from_dict({"schedule": {"total_kimg": 999}}).config_hash(ignore=RESUME_ALLOWED)
