"""Checkpoints: tensor-only parts, digests checked before loading, manifest last, pruning in MLflow."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ganray.models.errors import CheckpointError
from ganray.orchestrator.job.checkpoint import (CheckpointManager, checkpoint_artifact_path, latest_checkpoint,
                                            list_checkpoints, read_checkpoint, write_checkpoint)

from mlflow_server import sqlite_store  # noqa: F401


class NotATensor:
    """A custom class: torch.save pickles it by reference, which a weights-only load refuses."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _trained_pair(seed: int = 0) -> tuple[nn.Module, torch.optim.Adam]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 3)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "G": model.state_dict(),
        "opt_G": opt.state_dict(),
        "progress": {"images_seen": 1234, "rounds": 7, "d_steps": 7},
        "sampler": [{"epoch": 0, "position": 128, "seed": 3}],
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "note": None, "ok": True},
    }


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    meta = {"config_hash": "abc", "kimg": 1.234, "images_seen": 1234}
    write_checkpoint(_state(model, opt), tmp_path / "ck", meta)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["format"] == "ganray-checkpoint/1"
    assert set(manifest["files"]) == {"G.pt", "opt_G.pt", "progress.pt", "sampler.pt", "rng.pt"}
    assert manifest["config_hash"] == "abc" and "created" in manifest

    state, got_meta = read_checkpoint(tmp_path / "ck")
    assert got_meta["images_seen"] == 1234 and got_meta["config_hash"] == "abc"
    assert state["progress"] == {"images_seen": 1234, "rounds": 7, "d_steps": 7}
    assert state["sampler"] == [{"epoch": 0, "position": 128, "seed": 3}]
    assert state["rng"]["note"] is None and state["rng"]["ok"] is True

    # A fresh model and optimizer loaded from the checkpoint take the very same next step.
    clone, clone_opt = _trained_pair(seed=99)
    clone.load_state_dict(state["G"])
    clone_opt.load_state_dict(state["opt_G"])
    assert clone_opt.param_groups[0]["betas"] == (0.5, 0.99)
    x = torch.randn(16, 3)
    for net, o in ((model, opt), (clone, clone_opt)):
        o.zero_grad()
        net(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_state_round_trips(tmp_path: Path) -> None:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    write_checkpoint({"rng": rng}, tmp_path, {})
    state, _ = read_checkpoint(tmp_path)
    assert torch.equal(state["rng"]["torch"], rng["torch"])
    random.setstate(state["rng"]["python"])  # a tuple that random accepts back
    expected = random.random()
    random.setstate(rng["python"])
    assert random.random() == expected


def test_one_changed_byte_is_a_digest_mismatch(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    write_checkpoint(_state(model, opt), tmp_path, {})
    part = tmp_path / "opt_G.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"digest mismatch: .*opt_G\.pt was modified or truncated"):
        read_checkpoint(tmp_path)


def test_truncated_part_is_a_digest_mismatch(tmp_path: Path) -> None:
    write_checkpoint({"G": {"w": torch.ones(64)}}, tmp_path, {})
    part = tmp_path / "G.pt"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="digest mismatch"):
        read_checkpoint(tmp_path)


def test_pickled_object_is_refused_even_with_a_matching_digest(tmp_path: Path) -> None:
    write_checkpoint({"G": {"w": torch.ones(2)}}, tmp_path, {})
    torch.save({"w": NotATensor()}, tmp_path / "G.pt")  # then forge the manifest to match it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    import hashlib

    data = (tmp_path / "G.pt").read_bytes()
    manifest["files"]["G.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="carries a pickled object and is refused"):
        read_checkpoint(tmp_path)


def test_missing_manifest_is_incomplete(tmp_path: Path) -> None:
    write_checkpoint({"G": {"w": torch.ones(2)}}, tmp_path, {})
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        read_checkpoint(tmp_path)


def test_manifest_cannot_point_outside_the_folder(tmp_path: Path) -> None:
    write_checkpoint({"G": {"w": torch.ones(2)}}, tmp_path / "ck", {})
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    manifest["files"]["../evil.pt"] = manifest["files"].pop("G.pt")
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="invalid file name"):
        read_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("bad", [NotATensor(), {"x": __import__("numpy").zeros(3)}, [1, {2.5}]])
def test_non_tensor_contents_are_rejected_before_writing(tmp_path: Path, bad: object) -> None:
    with pytest.raises(CheckpointError, match="checkpoints hold tensors"):
        write_checkpoint({"G": {"w": torch.ones(2)}, "extra": bad}, tmp_path / "ck", {})
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_artifact_path_format() -> None:
    assert checkpoint_artifact_path(0) == "checkpoints/kimg-000000"
    assert checkpoint_artifact_path(49.6) == "checkpoints/kimg-000050"
    assert checkpoint_artifact_path(123456) == "checkpoints/kimg-123456"


def test_manager_keeps_last_n_and_latest_ignores_incomplete(sqlite_store: Path) -> None:
    from ganray.orchestrator.tracking.run_logger import RunLogger
    from ganray.orchestrator.tracking.store import prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(None, None)
    logger = RunLogger(uri, prepare_store(uri, "ckpt"))
    manager = CheckpointManager(logger, keep=2, workdir=sqlite_store / "work")
    weights = torch.zeros(4)
    for kimg in (1, 2, 3, 4):
        weights += 1
        future = manager.save({"G_ema": {"w": weights}, "progress": {"images_seen": kimg * 1000}},
                              {"images_seen": kimg * 1000}, kimg, block=kimg < 4)
    weights += 100  # the state was copied at save(): changing it now must not reach the file
    assert manager.wait(timeout=60)
    assert future.result() == "checkpoints/kimg-000004" and manager.superseded == 0
    assert list_checkpoints(logger.client, logger.run_id) == ["checkpoints/kimg-000003", "checkpoints/kimg-000004"]
    assert not any((sqlite_store / "work").iterdir())  # local staging cleaned up

    # An interrupted save at a higher kimg: parts uploaded, no manifest.
    stray = sqlite_store / "stray"
    write_checkpoint({"G_ema": {"w": torch.full((4,), -1.0)}}, stray, {"images_seen": 9000})
    logger.log_artifact(stray / "G_ema.pt", "checkpoints/kimg-000009").result()
    assert logger.flush(30)
    assert "checkpoints/kimg-000009" in list_checkpoints(logger.client, logger.run_id, complete_only=False)

    found = latest_checkpoint(logger.client, logger.run_id, sqlite_store / "dl")
    assert found is not None
    state, meta = found
    assert meta["images_seen"] == 4000 and meta["kimg"] == 4.0
    assert torch.equal(state["G_ema"]["w"], torch.full((4,), 4.0))
    manager.close()

    # A resumed job's manager on the same run: it lists the store once, at its first prune, then
    # keeps track itself; the interrupted save below the newest complete one goes too.
    calls = {"list": 0}
    real_list = logger.client.list_artifacts

    def counting_list(*args: Any, **kwargs: Any) -> Any:
        calls["list"] += 1
        return real_list(*args, **kwargs)

    logger.client.list_artifacts = counting_list
    resumed = CheckpointManager(logger, keep=2, workdir=sqlite_store / "work2")
    for kimg in (10, 11, 12):
        resumed.save({"G_ema": {"w": torch.full((4,), float(kimg))}}, {"images_seen": kimg * 1000}, kimg, block=True)
    first_listing = 1 + 4  # the root, then each of the 4 folders there at the first prune
    assert calls["list"] == first_listing
    logger.client.list_artifacts = real_list
    assert list_checkpoints(logger.client, logger.run_id, complete_only=False) == [
        "checkpoints/kimg-000011", "checkpoints/kimg-000012"]
    resumed.close()
    logger.close()


def test_latest_checkpoint_of_a_run_without_any(sqlite_store: Path) -> None:
    from ganray.orchestrator.tracking.run_logger import RunLogger
    from ganray.orchestrator.tracking.store import prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(None, None)
    logger = RunLogger(uri, prepare_store(uri, "empty"))
    assert latest_checkpoint(logger.client, logger.run_id, sqlite_store / "dl") is None
    logger.close()
