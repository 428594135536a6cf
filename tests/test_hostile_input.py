"""Hostile input through the CLI: corrupt data, tampered checkpoints, unknown models.

Every case must end with exit code 2 and one `error: ...` line that names the problem and the
fix, no traceback; no registry alias may move and no partial checkpoint may become the latest.
Cases run in-process through `ganray.orchestrator.cli.main`; a few run the console script to
prove it behaves the same. (Generated invalid configs are covered by tests/test_fuzz_config.py.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from ganray.orchestrator.job.checkpoint import list_checkpoints
from ganray.orchestrator.job.config import config_from_dict
from ganray.orchestrator.job.trainer import Trainer
from helpers import REPO, small_tree, run_cli
from mlflow_server import template_db

GANRAY = Path(sys.executable).with_name("ganray")
MODEL = "hostile-gan"

TREE = small_tree(data={"size": 2048},
                  schedule={"total_kimg": 2, "sync_kimg": 0.5, "checkpoint_kimg": 1, "sample_kimg": 1000},
                  eval={"every_kimg": 1000, "num_samples": 200})


class Payload:
    """Pickled by reference: a weights-only load must refuse it, whatever its digest."""

    def __reduce__(self):  # what an attacker's file would run on a plain torch.load
        return (os.system, ("echo pwned",))


def _assert_refused(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# ---------------------------------------------------------------------------------------------
# A finished run with checkpoints and a registered, champion-aliased version


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("hostile")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = config_from_dict({**TREE, "tracking": {"model_name": MODEL}})
    (root / "job.yaml").write_text(cfg.to_yaml())
    result = Trainer(cfg, tracking_uri=uri, progress=False).run()
    client = MlflowClient(uri)
    client.set_registered_model_alias(MODEL, "champion", result.model_version)
    run = client.get_run(result.run_id)
    artifacts = Path(urlparse(run.info.artifact_uri).path)
    return {"root": root, "uri": uri, "client": client, "run_id": result.run_id, "config": root / "job.yaml",
            "artifacts": artifacts, "version": result.model_version}


def _snapshot(store: dict[str, Any]) -> tuple:
    """What a refused command must leave alone: checkpoints, their manifests, aliases, run status."""
    client, run_id = store["client"], store["run_id"]
    ckpt_dir = store["artifacts"] / "checkpoints"
    manifests = {p.parent.name: p.read_bytes() for p in sorted(ckpt_dir.glob("*/manifest.json"))}
    folders = sorted(p.name for p in ckpt_dir.iterdir())
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    return (list_checkpoints(client, run_id), folders, manifests, aliases, client.get_run(run_id).info.status)


@contextmanager
def tampered(store: dict[str, Any]) -> Iterator[Path]:
    """The run's latest checkpoint folder; every checkpoint is restored byte for byte afterwards."""
    folders = store["artifacts"] / "checkpoints"
    latest = store["artifacts"] / list_checkpoints(store["client"], store["run_id"])[-1]
    backup = store["root"] / "backup"
    shutil.copytree(folders, backup)
    try:
        yield latest
    finally:
        shutil.rmtree(folders)
        shutil.copytree(backup, folders)
        shutil.rmtree(backup)


def _rewrite(folder: Path, part: str, value: Any) -> None:
    """Replace a part and update the manifest so its digest matches (a careful attacker)."""
    path = folder / f"{part}.pt"
    torch.save(value, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                    "bytes": path.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _resume(store: dict[str, Any], *extra: str) -> tuple[int, str, str]:
    return run_cli(["train", str(store["config"]), "--resume", store["run_id"], "--tracking-uri", store["uri"],
                 "--no-progress", *extra])


# ---------------------------------------------------------------------------------------------
# Tampered checkpoints


def _flip_byte(folder: Path) -> None:
    path = folder / "G.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _pickled(folder: Path) -> None:
    _rewrite(folder, "progress", {"rounds": Payload()})


def _missing_part(folder: Path) -> None:
    (folder / "D.pt").unlink()


def _wrong_shapes(folder: Path) -> None:
    from ganray.models.registry import build_generator

    other = build_generator({**TREE["model"], "generator": "mlp", "discriminator": "mlp", "hidden": 16,
                             "base_width": 64, "spectral_norm": False, "batchnorm": True, "kwargs": {}}, (2,))
    _rewrite(folder, "G", other.state_dict())


def _no_manifests(folder: Path) -> None:
    for manifest in folder.parent.glob("*/manifest.json"):  # every checkpoint interrupted
        manifest.rename(manifest.with_name("manifest.json.gone"))


def _bad_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"format": "ganray-checkpoint/1", "files": {"../../x.pt": {}}}')


@pytest.mark.parametrize("tamper, needles", [
    (_flip_byte, ("digest mismatch", "G.pt", "use another checkpoint")),
    (_pickled, ("pickled object", "progress.pt", "use a checkpoint written by ganray")),
    (_missing_part, ("lacks D.pt", "use another checkpoint")),
    (_wrong_shapes, ("does not fit this config", "size mismatch", "resume with the run's config")),
    (_bad_manifest, ("invalid file name", "use another checkpoint")),
    (_no_manifests, ("no complete checkpoint", "start a new run")),
], ids=["one-byte", "pickled", "missing-part", "shape-mismatch", "bad-manifest", "no-manifest"])
def test_tampered_checkpoint_is_refused(store: dict[str, Any], tamper: Any, needles: tuple[str, ...]) -> None:
    with tampered(store) as folder:
        tamper(folder)
        before = _snapshot(store)
        code, out, err = _resume(store)
        _assert_refused(code, err, *needles)
        assert _snapshot(store) == before  # nothing uploaded, nothing marked latest, status kept
        assert "images_seen=" not in out


def test_resume_with_another_model_is_refused_by_name(store: dict[str, Any]) -> None:
    before = _snapshot(store)
    code, _, err = _resume(store, "--set", "model.hidden=64")
    _assert_refused(code, err, "model.hidden", "resume with the run's config")
    code, _, err = run_cli(["train", str(store["config"]), "--resume", "0123456789abcdef0123456789abcdef",
                         "--tracking-uri", store["uri"]])
    _assert_refused(code, err, "no such run", "pass a run id")
    assert _snapshot(store) == before


# ---------------------------------------------------------------------------------------------
# Unknown models and aliases


@pytest.mark.parametrize("command, target, needles", [
    ("sample", "models:/hostile-gan@nosuch", ("no alias 'nosuch'", "its versions are 1", "use models:/hostile-gan/1",
                                              "set_registered_model_alias('hostile-gan', 'nosuch', 1)")),
    ("evaluate", "models:/hostile-gan@nosuch", ("no alias 'nosuch'", "use models:/hostile-gan/1")),
    ("sample", "models:/hostile-gan/99", ("registered model 'hostile-gan' has no version 99", "its versions are 1",
                                          "champion (version 1)", "use models:/hostile-gan/1 or models:/hostile-gan@champion")),
    ("sample", "models:/no-such-model/1", ("no registered model 'no-such-model'", "it has hostile-gan", "check the name",
                                           "--tracking-uri")),
    ("evaluate", "models:/no-such-model@champion", ("no registered model 'no-such-model'",)),
    ("sample", "models:/hostile-gann/1", ("no registered model 'hostile-gann'", "did you mean 'hostile-gan'",
                                          "models:/hostile-gan/VERSION")),
    ("sample", "models:/hostile-gan/one", ("not a number",)),
    ("sample", "models:/", ("models:/NAME/VERSION",)),
    ("evaluate", "not-a-run-id", ("neither a models:/ URI nor a run id",)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unknown_models_and_aliases(store: dict[str, Any], command: str, target: str,
                                    needles: tuple[str, ...]) -> None:
    before = _snapshot(store)
    out_file = store["root"] / f"{command}-out.npy"
    flag = "--model" if target.startswith("models:/") else "--run"
    argv = [command, flag, target, "--tracking-uri", store["uri"]]
    if command == "sample":
        argv += ["--out", str(out_file)]
    code, _, err = run_cli(argv)
    line = _assert_refused(code, err, *needles)
    assert "Traceback" not in line and not out_file.exists()
    assert not list(store["root"].glob("*.part*"))  # no half-written output either
    assert _snapshot(store) == before and before[3] == {"champion": store["version"]}


def test_tampered_release_is_refused_and_alias_stays(store: dict[str, Any]) -> None:
    released = [p for p in store["artifacts"].rglob("G_ema.pt") if "checkpoints" not in p.parts]
    assert released, "the release holds a digest-checked G_ema"
    path = released[0]
    original = path.read_bytes()
    try:
        data = bytearray(original)
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
        before = _snapshot(store)
        code, _, err = run_cli(["sample", "--model", f"models:/{MODEL}@champion", "--out",
                             str(store["root"] / "s.npy"), "--tracking-uri", store["uri"]])
        _assert_refused(code, err, "G_ema.pt")
        assert _snapshot(store) == before and not (store["root"] / "s.npy").exists()
    finally:
        path.write_bytes(original)


# ---------------------------------------------------------------------------------------------
# Corrupt and missing data


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 255 - color, 7)).save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root: Path, bad_name: str, bad: bytes) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i:02d}.png").write_bytes(_png(i * 40))
    (root / "a" / bad_name).write_bytes(bad)
    return root


CORRUPT_IMAGES = {
    "text-as-png": ("zz.png", b"this is not an image at all"),
    "truncated-png": ("zz.png", _png(99)[:40]),
    "empty-jpeg": ("zz.jpg", b""),
    "png-header-only": ("zz.png", b"\x89PNG\r\n\x1a\n"),
    "garbage-jpeg": ("zz.jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
}


def _image_config(tmp_path: Path, path: Path, **data: Any) -> Path:
    tree = {**TREE, "data": {"name": "imagefolder", "path": str(path), "resolution": 8, "channels": 3,
                             "test_fraction": 0.2, **data},
            "model": {"z_dim": 4, "hidden": 16, "depth": 1},
            "schedule": {**TREE["schedule"], "batch_size": 4, "total_kimg": 0.1},
            "eval": {"every_kimg": 1000, "num_samples": 16, "metrics": ["fid"]},
            "tracking": {"enabled": False}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


@pytest.mark.parametrize("case", sorted(CORRUPT_IMAGES))
def test_corrupt_image_stops_training_with_one_line(tmp_path: Path, case: str) -> None:
    name, data = CORRUPT_IMAGES[case]
    root = _image_folder(tmp_path / "images", name, data)
    config = _image_config(tmp_path, root)
    code, _, err = run_cli(["train", str(config), "--no-progress"])
    _assert_refused(code, err, name, "skip_corrupt")


def test_corrupt_images_are_skipped_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root, "zz.png", b"junk")
    (root / "b" / "yy.jpg").write_bytes(b"")
    code, out, err = run_cli(["train", str(_image_config(tmp_path, root, skip_corrupt=True)), "--no-progress"])
    assert code == 0, err
    assert "images_seen=" in out


def _parquet_cases(tmp_path: Path) -> dict[str, tuple[dict, tuple[str, ...]]]:
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"label": [1, 2, 3], "name": ["a", "b", "c"]}), wrong)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"img": pa.array([], type=pa.binary())}), empty)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 definitely not parquet " * 10)
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"img": pa.array([{"x": 1}, {"x": 2}])}), nested)
    (tmp_path / "emptydir").mkdir()
    return {
        "missing-column": ({"path": str(wrong), "column": "img"}, ("'img' is not in", "set data.column")),
        "wrong-type": ({"path": str(wrong), "column": "label"}, ("has type int64",)),
        "no-rows": ({"path": str(empty), "column": "img"}, ("has no rows",)),
        "not-parquet": ({"path": str(junk), "column": "img"}, ("not a readable Parquet dataset",)),
        "struct-column": ({"path": str(nested), "column": "img"}, ("data.column 'img'",)),
        "missing-path": ({"path": str(tmp_path / "nope.parquet"), "column": "img"}, ("does not exist",)),
        "empty-folder": ({"path": str(tmp_path / "emptydir"), "column": "img"},
                         ("emptydir", "is a folder with no *.parquet files", "point data.path at a Parquet file")),
    }


PARQUET_CASES = ["missing-column", "wrong-type", "no-rows", "not-parquet", "struct-column", "missing-path",
                 "empty-folder"]


@pytest.mark.parametrize("case", PARQUET_CASES)
@pytest.mark.parametrize("command", ["dry-run", "train"])
def test_bad_parquet_is_refused(tmp_path: Path, case: str, command: str) -> None:
    data, needles = _parquet_cases(tmp_path)[case]
    config = tmp_path / "job.yaml"
    tree = {**TREE, "data": {"name": "parquet", "resolution": 8, **data}, "tracking": {"enabled": False}}
    config.write_text(yaml.safe_dump(tree))
    argv = ["train", str(config), "--no-progress"] + (["--dry-run"] if command == "dry-run" else [])
    code, out, err = run_cli(argv)
    _assert_refused(code, err, *needles)


@pytest.mark.parametrize("name, extra, needles", [
    ("imagefolder", {"path": "/nonexistent/ganray/images", "resolution": 8}, ("does not exist", "fix the path")),
    ("imagefolder", {"resolution": 8}, ("data.path is required",)),
    ("torchvision:MNIST", {"path": "/nonexistent/ganray/mnist"}, ("never downloads",)),
    ("no_such_module_xyz:load", {}, ("cannot import the loader",)),
], ids=["imagefolder-missing", "imagefolder-no-path", "torchvision-missing", "bad-loader"])
@pytest.mark.parametrize("command", [["train", "--dry-run"], ["validate"], ["train", "--no-progress"]])
def test_missing_data_is_refused(tmp_path: Path, name: str, extra: dict, needles: tuple[str, ...],
                                 command: list[str]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**TREE, "data": {"name": name, **extra}, "tracking": {"enabled": False}}))
    code, out, err = run_cli([*command, str(config)])
    _assert_refused(code, err, *needles)
    assert out == ""  # resolved before anything is printed or started


def test_failed_start_leaves_a_failed_run_without_checkpoints(tmp_path: Path,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """A data error after the MLflow run was opened: the run is closed FAILED, nothing is latest."""
    from mlflow import MlflowClient

    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = _image_folder(tmp_path / "images", "zz.png", b"junk")
    config = _image_config(tmp_path, root)
    tree = yaml.safe_load(config.read_text())
    tree["tracking"] = {"enabled": True}
    config.write_text(yaml.safe_dump(tree))
    code, out, err = run_cli(["train", str(config), "--no-progress", "--tracking-uri", uri])
    _assert_refused(code, err, "zz.png")
    run_id = out.split("run_id=", 1)[1].split()[0]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert list_checkpoints(client, run_id) == []


# ---------------------------------------------------------------------------------------------
# A layout that cannot fit the local Ray instance ganray starts


def test_layout_too_big_for_its_own_local_ray_fails_at_once(tmp_path: Path) -> None:
    """`train` starts its own local Ray (no RAY_ADDRESS): no capacity can arrive there, so a split
    job needing 3 CPUs on 1 logical CPU fails without waiting placement_timeout_s, naming the
    one-machine fixes. A subprocess: the session's shared Ray instance is never touched."""
    import time

    import ray

    before = ray.is_initialized()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    argv = ["train", str(REPO / "configs/grid25.yaml"), "--no-progress",
            "--set", "topology.kind=split", "--set", "resources.num_cpus=1",
            "--set", "resources.placement_timeout_s=900", "--set", "tracking.enabled=false"]
    t0 = time.monotonic()
    # A wait for placement would outlast this timeout (900 s asked), failing the test.
    proc = subprocess.run([str(GANRAY), *argv], capture_output=True, text=True, timeout=450, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - t0
    err = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    _assert_refused(proc.returncode, err, "local Ray instance ganray started", "(1 CPUs", "3 CPUs, 0 GPUs in all",
                    "resources.num_cpus=3", "logical CPUs may exceed the cores", "resources.cpus_per_worker")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "topology.num_workers" in proc.stderr  # the note: the file's replicated key was dropped
    assert elapsed < 300, f"took {elapsed:.0f} s: it waited for capacity"
    assert ray.is_initialized() == before


# ---------------------------------------------------------------------------------------------
# The console script behaves the same


def _console(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(GANRAY), *argv], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_console_script_refuses_the_same_way(store: dict[str, Any], tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images", "zz.png", b"junk")
    proc = _console(["train", str(_image_config(tmp_path, root)), "--no-progress"], tmp_path)
    _assert_refused(proc.returncode, proc.stderr, "zz.png", "skip_corrupt")

    before = _snapshot(store)
    proc = _console(["sample", "--model", f"models:/{MODEL}@nosuch", "--out", str(tmp_path / "x.npy"),
                     "--tracking-uri", store["uri"]], tmp_path)
    _assert_refused(proc.returncode, proc.stderr, "no alias 'nosuch'")
    assert proc.stdout == "" and not (tmp_path / "x.npy").exists()

    with tampered(store) as folder:
        _flip_byte(folder)
        before = _snapshot(store)
        proc = _console(["train", str(store["config"]), "--resume", store["run_id"], "--tracking-uri",
                         store["uri"], "--no-progress"], tmp_path)
        _assert_refused(proc.returncode, proc.stderr, "digest mismatch")
        assert _snapshot(store) == before
