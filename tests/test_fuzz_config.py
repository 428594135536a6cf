"""Hostile configs: generated invalid configs through the CLI's entry function, in-process.

Every one must end with exit code 2 and exactly one `error: ...` line on stderr, no traceback.
A few true subprocess runs prove the console script behaves the same.
"""

from __future__ import annotations

import io
import os
import string
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganray.orchestrator.cli import main
from ganray.orchestrator.job.config import TrainConfig
from helpers import REPO

BASE = yaml.safe_load((REPO / "configs" / "grid25.yaml").read_text())
SECTIONS = {name: field.annotation for name, field in TrainConfig.model_fields.items() if name != "seed"}

# Fields with numeric lower bounds, and values below them: out of range by construction.
OUT_OF_RANGE = [
    ("seed", -1), ("data", "size", 3), ("model", "z_dim", 0), ("model", "hidden", 1),
    ("model", "depth", 0), ("loss", "r1_gamma", -0.5), ("loss", "r1_interval", 0),
    ("schedule", "total_kimg", 0), ("schedule", "batch_size", 0), ("schedule", "n_critic", 0),
    ("schedule", "g_lr", -1e-3), ("schedule", "d_lr", 0), ("schedule", "ema_half_life_kimg", -1),
    ("schedule", "sync_kimg", 0), ("schedule", "keep_checkpoints", 0),
    ("resources", "threads_per_worker", 0), ("resources", "placement_timeout_s", -5),
    ("eval", "num_samples", 1), ("fault", "lr_backoff", 2.0), ("data", "test_fraction", 1.5),
]
LITERALS = [("loss", "kind"), ("schedule", "lr_decay"), ("topology", "kind"), ("resources", "strategy"),
            ("resources", "device"), ("resources", "precision")]
NUMERIC = [("schedule", "batch_size"), ("schedule", "g_lr"), ("model", "hidden"), ("seed",),
           ("schedule", "total_kimg"), ("loss", "r1_gamma"), ("eval", "num_samples")]


def _valid_keys(section: str) -> set[str]:
    return set(SECTIONS[section].model_fields)


identifiers = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
not_numbers = st.one_of(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).filter(
    lambda s: s.lower() not in {"nan", "inf", "infinity", "true", "false", "yes", "no", "on", "off", "null", "e", "y", "n"}),
    st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(identifiers, st.integers(), min_size=1, max_size=2))


def _set(tree: dict, path: tuple, value) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(tree))
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return tree


@st.composite
def invalid_configs(draw) -> str:
    """YAML text of a config that is invalid by construction."""
    kind = draw(st.sampled_from(["unknown", "type", "range", "literal", "not_mapping", "bad_yaml", "section_type"]))
    if kind == "unknown":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(identifiers.filter(lambda k: k not in _valid_keys(section)))
        return yaml.safe_dump(_set(BASE, (section, key), draw(st.integers())))
    if kind == "type":
        path = draw(st.sampled_from(NUMERIC))
        return yaml.safe_dump(_set(BASE, path, draw(not_numbers)))
    if kind == "range":
        *path, value = draw(st.sampled_from(OUT_OF_RANGE))
        return yaml.safe_dump(_set(BASE, tuple(path), value))
    if kind == "literal":
        path = draw(st.sampled_from(LITERALS))
        return yaml.safe_dump(_set(BASE, path, draw(identifiers.map(lambda s: "x" + s))))
    if kind == "section_type":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        return yaml.safe_dump(_set(BASE, (section,), draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1)))))
    if kind == "not_mapping":
        return yaml.safe_dump(draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1), st.text(min_size=1).filter(str.strip))))
    return draw(st.sampled_from(["seed: [1, 2\n", "data: {name: grid25\n", "a: b: c\n", "\t- x\n:", "schedule:\n  - a\n  b: 2\n"]))


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _assert_one_line_error(code: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=invalid_configs(), command=st.sampled_from(["validate", "dry-run"]))
def test_generated_invalid_configs_exit_2(tmp_path_factory, text, command):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(text)
    argv = ["validate", str(path)] if command == "validate" else ["train", str(path), "--dry-run"]
    code, err = _run_in_process(argv)
    _assert_one_line_error(code, err)


@pytest.mark.parametrize("text", ["seed: [1, 2\n", "schedule:\n  batch_sise: 3\n", "- 1\n- 2\n"])
def test_console_script_behaves_the_same(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    exe = Path(sys.executable).with_name("ganray")
    proc = subprocess.run([str(exe), "validate", str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.stdout == ""
