"""Exact resume (issue 4): a run to K kimg equals a run stopped at K/2 and resumed to K."""

from __future__ import annotations

import pytest

from ganray.orchestrator.job.trainer import Trainer
from helpers import small_config


def _config(kind: str):
    topology = {"kind": kind} if kind == "local" else {"kind": kind, "num_workers": 2}
    return small_config(topology=topology,
                        schedule={"total_kimg": 4, "batch_size": 64, "sync_kimg": 0.5,
                                  "checkpoint_kimg": 100, "sample_kimg": 100},
                        resources={"num_cpus": None})


@pytest.mark.parametrize("kind", ["local", "replicated"])
def test_stop_and_resume_gives_identical_losses(kind, mlflow_store, request):
    if kind == "replicated":
        request.getfixturevalue("ray_session")
    cfg = _config(kind)
    full = Trainer(cfg, progress=False).run()
    first = Trainer(cfg, progress=False, stop_at_kimg=2).run()
    assert first.stopped_early and first.images_seen == 2048
    rest = Trainer(cfg, progress=False, resume=first.run_id).run()
    assert rest.run_id == first.run_id and rest.images_seen == full.images_seen
    done = len(first.history["loss/D"])
    assert done == 32
    assert rest.history["loss/D"] == full.history["loss/D"][done:]
    assert rest.history["loss/G"] == full.history["loss/G"][done:]

    from mlflow import MlflowClient

    client = MlflowClient(rest_uri(mlflow_store))
    steps = [m.step for m in client.get_metric_history(rest.run_id, "loss/D")]
    assert steps == sorted(set(steps)), "a metric step was logged twice after resume"
    assert steps[-1] == full.images_seen


def rest_uri(store):
    return f"sqlite:///{store}/mlflow.db"


def test_a_run_from_before_a_new_config_key_resumes(mlflow_store):
    """A run whose stored config and checkpoint predate a key (here `loss.r2_gamma`, at its
    default) resumes; a checkpoint of another config is still refused."""
    import json
    from pathlib import Path
    from urllib.parse import urlparse

    import yaml
    from mlflow import MlflowClient

    from ganray.models.errors import CheckpointError
    from ganray.orchestrator.job.config import RESUME_ALLOWED, flatten

    cfg = _config("local")
    full = Trainer(cfg, progress=False).run()
    first = Trainer(cfg, progress=False, stop_at_kimg=2).run()
    client = MlflowClient(rest_uri(mlflow_store))
    artifacts = Path(urlparse(client.get_run(first.run_id).info.artifact_uri).path)
    stored = yaml.safe_load((artifacts / "config.yaml").read_text())
    del stored["loss"]["r2_gamma"]
    (artifacts / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    old_keys = frozenset(flatten(stored))
    assert list(artifacts.rglob("manifest.json")), "the stopped run wrote no checkpoint"

    def stamp(config_hash: str) -> None:
        for path in artifacts.rglob("manifest.json"):  # the resumed run adds checkpoints
            manifest = json.loads(path.read_text())
            manifest["config_hash"] = config_hash
            path.write_text(json.dumps(manifest))

    stamp(cfg.config_hash(ignore=RESUME_ALLOWED, only=old_keys))
    assert cfg.config_hash(ignore=RESUME_ALLOWED, only=old_keys) != cfg.config_hash(ignore=RESUME_ALLOWED)
    rest = Trainer(cfg, progress=False, resume=first.run_id).run()
    done = len(first.history["loss/D"])
    assert rest.history["loss/D"] == full.history["loss/D"][done:]

    stamp("0" * 64)
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(cfg, progress=False, resume=first.run_id).run()
