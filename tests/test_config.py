"""Config loading, overrides and the one-line errors of `ganray validate` / `train --dry-run`."""

from __future__ import annotations

import pytest

from ganray.models.errors import ConfigError
from ganray.orchestrator.cli import main
from ganray.orchestrator.job.config import (RESUME_ALLOWED, TrainConfig, config_differences, config_from_dict,
                                        load_config, parse_override)
from helpers import REPO

SHIPPED = ["grid25.yaml", "ring8.yaml", "digits.yaml", "stacked-digits.yaml", "digits-conditional.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.name == name.split(".")[0].removesuffix("-conditional")
    # Every key the file sets is what the validated config holds (no default overrode it).
    import yaml

    written = yaml.safe_load((REPO / "configs" / name).read_text())
    for section, keys in written.items():
        if not isinstance(keys, dict):
            assert getattr(cfg, section) == keys, section
            continue
        held = getattr(cfg, section).model_dump()
        for key, value in keys.items():
            actual = list(held[key]) if isinstance(held[key], tuple) else held[key]  # betas: a tuple
            assert actual == value, f"{section}.{key}"


def test_override_parses_yaml_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1.0e-3") == (["a"], 1e-3)
    assert load_config(None, ["schedule.g_lr=1e-3"]).schedule.g_lr == 1e-3  # pydantic coerces YAML 1.1 strings
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[0.5, 0.9]") == (["a"], [0.5, 0.9])
    assert parse_override("a=hello") == (["a"], "hello")
    cfg = load_config(REPO / "configs/grid25.yaml", ["topology.kind=replicated", "topology.num_workers=2",
                                                     "schedule.betas=[0.0, 0.9]"])
    assert cfg.layout.count("replica") == 2 and cfg.schedule.betas == (0.0, 0.9)


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
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "Traceback" not in err[0]
    assert captured.out == ""  # the error alone: nothing of the config is printed before it


# What `train` resolves before it starts, `validate` and `--dry-run` resolve too (first problem, one line).
RESOLVE_CASES = {
    "unknown-data": (["data.name=nosuchdata"], "data.name 'nosuchdata' is not a dataset"),
    "missing-folder": (["data.name=imagefolder", "data.path=/nonexistent/ganray/images", "data.resolution=8"],
                       "data.path '/nonexistent/ganray/images' for data.name 'imagefolder' does not exist"),
    "folder-without-path": (["data.name=imagefolder", "data.resolution=8"], "data.path is required"),
    "folder-without-resolution": (["data.name=imagefolder", "data.path=/tmp"], "data.resolution is required"),
    "unknown-torchvision": (["data.name=torchvision:NoSuchSet", "data.path=/tmp"], "torchvision.datasets has no dataset"),
    "missing-torchvision": (["data.name=torchvision:MNIST", "data.path=/nonexistent/mnist"], "never downloads"),
    "loader-not-importable": (["data.name=no_such_module_xyz:load"], "cannot import the loader"),
    "generator-not-importable": (["model.generator=no_such_module_xyz:G"], "model.generator 'no_such_module_xyz:G'"),
    "discriminator-missing-attr": (["model.discriminator=ganray.models.nets:NoSuchD"], "has no attribute 'NoSuchD'"),
    "unknown-discriminator": (["model.discriminator=resnet"], "unknown model.discriminator 'resnet'"),
    "layout": (["topology.kind=split", "topology.num_discriminators=3"], "topology.num_discriminators=3"),
}


@pytest.mark.parametrize("case", sorted(RESOLVE_CASES))
@pytest.mark.parametrize("command", [["validate"], ["train", "--dry-run"]])
def test_validate_resolves_what_train_resolves(case, command, capsys):
    sets, needle = RESOLVE_CASES[case]
    argv = [*command, str(REPO / "configs/grid25.yaml")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], captured.err
    assert captured.out == ""


def test_validate_accepts_an_importable_model(capsys):
    argv = ["validate", str(REPO / "configs/grid25.yaml"), "--set", "model.generator=ganray.models.nets:MLPGenerator"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "generator: ganray.models.nets:MLPGenerator" in capsys.readouterr().out


def test_switching_kind_from_set_drops_the_files_keys_of_other_kinds(caplog):
    grid = REPO / "configs/grid25.yaml"
    assert load_config(grid).topology.num_workers == 1  # the file sets a replicated key
    with caplog.at_level("WARNING", logger="ganray"):
        local = load_config(grid, ["topology.kind=local"])
    notes = [r.getMessage() for r in caplog.records if "topology.num_workers" in r.getMessage()]
    assert len(notes) == 1 and "dropped" in notes[0] and "\n" not in notes[0]
    assert local.topology.num_workers is None and local.layout.kind == "local"
    # Out of the resolved config and its hash: as if the file had never set it.
    tree = __import__("yaml").safe_load(grid.read_text())
    del tree["topology"]["num_workers"]
    tree["topology"]["kind"] = "local"
    assert local.config_hash() == config_from_dict(tree).config_hash()
    split = load_config(grid, ["topology.kind=split", "topology.num_discriminators=4"])
    assert split.layout.describe() == "split 1G+4D (mean)" and split.topology.num_workers is None


def test_switching_kind_through_the_cli(capsys, caplog):
    grid = str(REPO / "configs/grid25.yaml")
    with caplog.at_level("WARNING", logger="ganray"):
        assert main(["validate", grid, "--set", "topology.kind=local"]) == 0
    out = capsys.readouterr().out
    resolved = config_from_dict(__import__("yaml").safe_load(out))
    assert resolved.topology.kind == "local" and resolved.topology.num_workers is None
    assert any("topology.num_workers" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sets, needle", [
    (["topology.kind=local", "topology.num_workers=2"], "topology.num_workers belongs to topology.kind 'replicated'"),
    (["topology.kind=replicated", "topology.overlap=true"], "topology.overlap belongs to topology.kind 'split'"),
])
def test_conflicting_set_keys_still_fail(sets, needle, capsys):
    with pytest.raises(ConfigError, match=needle):
        load_config(REPO / "configs/grid25.yaml", sets)
    argv = ["validate", str(REPO / "configs/grid25.yaml")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_a_file_that_mixes_kinds_still_fails(tmp_path):
    bad = tmp_path / "mixed.yaml"
    bad.write_text("topology:\n  kind: local\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match="belongs to topology.kind 'replicated'"):
        load_config(bad)


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


def test_eval_samples_default_to_the_papers_count_for_stacked_digits():
    assert config_from_dict({"data": {"name": "stacked-digits"}}).eval.num_samples == 26_000
    assert config_from_dict({}).eval.num_samples == 2_500
    given = config_from_dict({"data": {"name": "stacked-digits"}, "eval": {"num_samples": 300}})
    assert given.eval.num_samples == 300 and given.flat()["eval.num_samples"] == 300
