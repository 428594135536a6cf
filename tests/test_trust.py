"""Configs are code: a stored config is pinned by the release's digest and may import nothing
the user has not vouched for (`orchestrator/job/trust.py`, `tracking/released_model.py`).

The releases here are made with ganray's built-in MLP generator but a config that *names* an
import path, `trust_probe:make_g`, a module on sys.path that creates a marker file when it is
imported. So the tests see whether ganray imported it, not only what it printed.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from helpers import small_config, run_cli
from mlflow_server import template_db
from ganray.models.registry import build_generator
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.trust import TRUST_ENV, UntrustedCodeError, check_imports, import_paths
from ganray.orchestrator.tracking.release import log_released_generator
from ganray.orchestrator.tracking.released_model import load_release
from ganray.orchestrator.tracking.run_logger import RunLogger
from ganray.orchestrator.tracking.store import prepare_store

PROBE = "trust_probe"
IMPORT_PATH = f"{PROBE}:make_g"
CUSTOM, PLAIN = "trust-custom", "trust-plain"

_PROBE_MODULE = '''
from pathlib import Path

Path(__file__).with_suffix(".imported").touch()  # the proof that ganray imported this module


def make_g(sample_shape, z_dim, **kwargs):
    from ganray.models.registry import build_generator

    return build_generator({"generator": "mlp", "z_dim": z_dim, "hidden": 16, "depth": 1}, sample_shape)
'''


def _refused(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err


def _release(uri: str, config: Any, name: str) -> tuple[str, Any]:
    torch.manual_seed(0)
    generator = build_generator({"generator": "mlp", "z_dim": config.model.z_dim, "hidden": 16, "depth": 1}, (2,))
    logger = RunLogger(uri, prepare_store(uri, "trust"))
    logger.log_text(config.to_yaml(), "config.yaml")
    mv = log_released_generator(logger, logger.run_id, generator, config, name, images_seen=64)
    logger.close()
    return logger.run_id, mv


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("trust")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code_dir = root / "code"
    code_dir.mkdir()
    (code_dir / f"{PROBE}.py").write_text(textwrap.dedent(_PROBE_MODULE))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(code_dir))
        patch.delenv(TRUST_ENV, raising=False)
        custom_cfg = small_config(model={"generator": IMPORT_PATH, "hidden": 16, "depth": 1})
        # Data that is not there: sampling must not need it (the shape is in the release).
        plain_cfg = small_config(data={"name": "parquet", "path": str(root / "gone.parquet")},
                                 model={"hidden": 16, "depth": 1})
        custom_run, custom_mv = _release(uri, custom_cfg, CUSTOM)
        plain_run, plain_mv = _release(uri, plain_cfg, PLAIN)
        yield {"root": root, "uri": uri, "marker": code_dir / f"{PROBE}.imported", "custom_run": custom_run,
               "custom_mv": custom_mv, "plain_run": plain_run, "plain_mv": plain_mv}
    sys.modules.pop(PROBE, None)


def test_import_paths_and_who_may_vouch_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)
    custom = small_config(model={"generator": "a.b:G", "discriminator": "mlp"}, data={"name": "c.d:load"})
    assert import_paths(custom) == ["model.generator=a.b:G", "data.name=c.d:load"]
    assert import_paths(small_config(data={"name": "torchvision:MNIST", "path": "/x"})) == []
    with pytest.raises(UntrustedCodeError, match="model.generator=a.b:G, data.name=c.d:load"):
        check_imports(custom, "run r")
    check_imports(custom, "run r", trust_code=True)
    check_imports(custom, "run r", trusted_config=custom)  # the user's own config names the same code
    partly = small_config(model={"generator": "a.b:G"})
    with pytest.raises(UntrustedCodeError, match="data.name=c.d:load") as err:
        check_imports(custom, "run r", trusted_config=partly)
    assert "model.generator" not in str(err.value)
    for value, trusted in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(TRUST_ENV, value)
        if trusted:
            check_imports(custom, "run r")
        else:
            with pytest.raises(UntrustedCodeError):
                check_imports(custom, "run r")


def test_the_release_pins_its_config(store: dict[str, Any], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"])
    for run_id, mv in ((store["custom_run"], store["custom_mv"]), (store["plain_run"], store["plain_mv"])):
        local = Path(client.download_artifacts(run_id, "release/config.yaml", str(tmp_path / run_id)))
        assert mv.tags["ganray.config_sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()


def test_a_stored_config_that_imports_code_needs_trust(store: dict[str, Any], tmp_path: Path) -> None:
    uri, marker = store["uri"], store["marker"]
    out = tmp_path / "s.npy"
    for source in (["--model", f"models:/{CUSTOM}/1"], ["--run", store["custom_run"]]):
        code, stdout, err = run_cli(["sample", *source, "--out", str(out), "--tracking-uri", uri])
        _refused(code, err, IMPORT_PATH, "--trust-code")
        assert stdout == "" and not out.exists()
    code, _, err = run_cli(["evaluate", "--model", f"models:/{CUSTOM}/1", "--tracking-uri", uri])
    _refused(code, err, IMPORT_PATH)
    code, _, err = run_cli(["promote", CUSTOM, "1", "--tracking-uri", uri])
    _refused(code, err, IMPORT_PATH)  # a champion is loaded by every unattended retrain
    assert not marker.exists() and PROBE not in sys.modules, "the module was imported before the refusal"

    code, stdout, err = run_cli(["sample", "--model", f"models:/{CUSTOM}/1", "--out", str(out), "--tracking-uri", uri,
                              "--trust-code", "-n", "5"])
    assert code == 0, err
    assert marker.exists() and np.load(out).shape == (5, 2)
    code, stdout, err = run_cli(["promote", CUSTOM, "1", "--tracking-uri", uri, "--trust-code"])
    assert code == 0 and "champion=1" in stdout, err


def test_sampling_needs_no_data_and_a_changed_config_is_refused(store: dict[str, Any], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri, client = store["uri"], MlflowClient(store["uri"])
    out = tmp_path / "s.npy"
    assert not (store["root"] / "gone.parquet").exists()
    code, stdout, err = run_cli(["sample", "--model", f"models:/{PLAIN}/1", "--out", str(out), "--tracking-uri", uri])
    assert code == 0 and "shape=64x2" in stdout, err

    # Whoever can write the run's artifacts rewrites its release config: the version's digest says no.
    changed = tmp_path / "release" / "config.yaml"
    changed.parent.mkdir()
    changed.write_text(small_config(model={"generator": IMPORT_PATH}).to_yaml())
    client.log_artifact(store["plain_run"], str(changed), "release")
    out.unlink()
    code, stdout, err = run_cli(["sample", "--model", f"models:/{PLAIN}/1", "--out", str(out), "--tracking-uri", uri,
                              "--trust-code"])
    _refused(code, err, f"model '{PLAIN}' version 1", "does not match the digest")
    assert not out.exists()

    # A version without the config digest (an older ganray's) cannot be verified.
    client.delete_model_version_tag(PLAIN, "1", "ganray.config_sha256")
    with pytest.raises(TrackingError, match="without a config digest"):
        load_release(client, f"models:/{PLAIN}/1", trust_code=True)
