"""Released generators: pt2 model in the registry, digest-checked state beside it, URIs resolved."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import small_config
from ganray.orchestrator.errors import TrackingError
from ganray.models.registry import build_generator
from ganray.orchestrator.job.checkpoint import CheckpointManager
from ganray.orchestrator.tracking.release import log_released_generator
from ganray.orchestrator.tracking.released_model import load_release, resolve_model_uri
from ganray.orchestrator.tracking.run_logger import RunLogger
from ganray.orchestrator.tracking.store import prepare_store, resolve_tracking_uri

from mlflow_server import template_db

MODEL = "ganray-test-gen"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory):
    """One release (torch.export + registration cost ~10 s) shared by the tests of this module."""
    import shutil

    folder = tmp_path_factory.mktemp("release-store")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), folder / "mlflow.db")
    uri = resolve_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}", None)
    config = small_config()
    torch.manual_seed(0)
    generator = build_generator(config.model.model_dump(), (2,))
    logger = RunLogger(uri, prepare_store(uri, "release"))
    logger.log_text(config.to_yaml(), "config.yaml")
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    mv = log_released_generator(logger, logger.run_id, generator, config, MODEL, images_seen=4096)
    env_after = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    logger.close()
    return {"uri": uri, "config": config, "generator": generator, "logger": logger, "mv": mv,
            "env": (env_before, env_after), "folder": folder}


def test_release_registers_a_tagged_version_without_alias(released) -> None:
    mv, logger = released["mv"], released["logger"]
    assert mv.name == MODEL and str(mv.version) == "1" and mv.run_id == logger.run_id
    assert mv.tags["ganray.config_hash"] == released["config"].config_hash()
    assert mv.tags["ganray.images_seen"] == "4096" and len(mv.tags["ganray.state_sha256"]) == 64
    assert not logger.client.get_registered_model(MODEL).aliases  # promotion is not the release's job
    assert not mv.aliases
    assert released["env"][0] == released["env"][1]  # the fluent scope restored MLflow's globals
    import mlflow

    assert mlflow.active_run() is None
    # Nothing landed in ./mlruns: the logged model lives under the experiment's mlartifacts.
    assert not (released["folder"] / "mlruns").exists() and not Path("mlruns").exists()


def test_exported_model_runs_at_another_batch_size(released) -> None:
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch

    generator = released["generator"].eval()
    z = torch.randn(7, generator.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = generator(z)
    mlflow.set_tracking_uri(released["uri"])
    try:
        exported = mlflow.pytorch.load_model(f"models:/{MODEL}/1")
        assert torch.allclose(exported(z), expected, atol=1e-6)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
        out = np.asarray(pyfunc.predict(z.numpy()))
        assert out.shape == (7, 2) and np.allclose(out, expected.numpy(), atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


def test_resolve_model_uri_by_version_alias_and_errors(released) -> None:
    client, run_id = released["logger"].client, released["logger"].run_id
    assert resolve_model_uri(f"models:/{MODEL}/1", client) == (run_id, "1")
    assert resolve_model_uri(f"models:/{MODEL}/latest", client) == (run_id, "1")
    client.set_registered_model_alias(MODEL, "candidate", "1")
    assert resolve_model_uri(f"models:/{MODEL}@candidate", client) == (run_id, "1")
    for bad, named in ((f"models:/{MODEL}/9", "version 9"), (f"models:/{MODEL}@missing", "alias 'missing'"),
                       ("models:/no-such-model/1", "no-such-model"), ("runs:/abc/model", "models:/NAME/VERSION")):
        with pytest.raises(TrackingError, match=named) as err:
            resolve_model_uri(bad, client)
        assert "\n" not in str(err.value)
    # Each names the problem and the fix, in one line.
    fixes = {f"models:/{MODEL}/9": ("its versions are 1", "candidate (version 1)",
                                    f"use models:/{MODEL}/1 or models:/{MODEL}@candidate"),
             f"models:/{MODEL}@champion": ("no alias 'champion'", "its versions are 1",
                                           f"use models:/{MODEL}/1 or set the alias with `ganray promote {MODEL} 1`"),
             f"models:/{MODEL}@missing": (f"use models:/{MODEL}/1", f"set_registered_model_alias('{MODEL}', 'missing', 1)"),
             f"models:/{MODEL}x/1": (f"did you mean '{MODEL}'", f"models:/{MODEL}/VERSION"),
             "models:/zzz/1": ("no registered model 'zzz'", f"it has {MODEL}", "check the name", "--tracking-uri")}
    for bad, needles in fixes.items():
        with pytest.raises(TrackingError) as err:
            resolve_model_uri(bad, client)
        message = str(err.value)
        assert "\n" not in message and all(n in message for n in needles), message


def test_load_release_rebuilds_the_generator(released) -> None:
    client, generator = released["logger"].client, released["generator"]
    for source in (f"models:/{MODEL}/1", released["logger"].run_id):
        loaded = load_release(client, source)
        assert loaded.config.config_hash() == released["config"].config_hash()
        assert loaded.sample_shape == (2,)  # from the manifest: no data is read to rebuild G
        rebuilt = loaded.build()
        for key, value in generator.state_dict().items():
            assert torch.equal(loaded.state[key], value) and torch.equal(rebuilt.state_dict()[key], value)
    with pytest.raises(TrackingError, match="neither a models:/ URI nor a run id"):
        load_release(client, "0123456789abcdef0123456789abcdef")


def test_run_without_release_falls_back_to_its_latest_checkpoint(released) -> None:
    uri, config = released["uri"], released["config"]
    logger = RunLogger(uri, prepare_store(uri, "release"))
    with pytest.raises(TrackingError, match="neither a released generator nor a complete checkpoint"):
        load_release(logger.client, logger.run_id)
    logger.log_text(config.to_yaml(), "config.yaml")
    manager = CheckpointManager(logger, keep=1, workdir=released["folder"] / "work")
    weights = {"G_ema": {"w": torch.arange(3.0)}, "G": {"w": torch.zeros(3)}}
    manager.save(weights, {"images_seen": 1000}, 1.0, block=True)
    weights["G_ema"]["w"] += 1
    manager.save(weights, {"images_seen": 2000}, 2.0, block=True)
    loaded = load_release(logger.client, logger.run_id)
    assert torch.equal(loaded.state["w"], torch.arange(3.0) + 1) and loaded.config == config
    assert loaded.sample_shape is None  # this manifest does not record it: build() reads the data's shape
    manager.close()
    logger.close()
