"""`ganray retrain` / `ganray promote`: the champion/challenger gate, idempotent schedule keys,
the registry lock, rollback, and bad input that must leave every alias as it was.

Everything runs in-process through `cli.main` on tiny grid25 jobs (topology local) with an
embedded sqlite store per test. Creating MLflow's schema costs ~10 s here, so one empty,
migrated database is made per module and copied into each test's folder (it holds no
experiment, so every artifact location is still created beside the copy).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from ganray.models.errors import ConfigError

from ganray.orchestrator.errors import LockHeldError
from ganray.orchestrator.cli import main
from ganray.orchestrator.retrain.champion import decide, resolve_metric, warm_start_factory
from ganray.orchestrator.retrain.lock import RetrainLock, current_user, holder_id, lock_name

from helpers import small_config

NAME = "g25"
# A champion trained 4 kimg scores kl ~2.4 on grid25 (some 40 of 1000 samples high-quality):
# far from both 0 and inf, so the decisions below do not hinge on a sample or two.
BASE = {
    "seed": 0,
    "data": {"name": "grid25", "size": 8192},
    "model": {"z_dim": 8, "hidden": 64, "depth": 2},
    "schedule": {"total_kimg": 100, "batch_size": 64, "sync_kimg": 1, "checkpoint_kimg": 100,
                 "sample_kimg": 100, "ema_half_life_kimg": 0, "g_lr": 2e-3, "d_lr": 2e-3},
    "topology": {"kind": "local"},
    "eval": {"every_kimg": 100, "num_samples": 1000},
    "retrain": {"kimg": 4},
}
# Adam at learning rate 0.5 wrecks the warm-started nets within 2 kimg: a challenger that is
# worse on any data, deterministically.
WRECK = ["--set", "schedule.g_lr=0.5", "--set", "schedule.d_lr=0.5", "--set", "retrain.kimg=2"]


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments()  # creates and migrates the tracking tables
    client.search_registered_models()  # and the registry's
    return path


@pytest.fixture()
def store(mlflow_store, empty_db):
    """The test's embedded store (cwd = tmp_path, so it is also the CLI's default) and a client."""
    from mlflow import MlflowClient

    shutil.copy(empty_db, mlflow_store / "mlflow.db")
    return MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}")


@pytest.fixture()
def config_path(tmp_path) -> Path:
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def cli(capsys, *args: str) -> tuple[int, dict[str, str], str]:
    """Run `ganray ARGS` in-process: (exit code, its key=value stdout lines, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    lines = [m.groups() for m in map(re.compile(r"^([a-z_]+)=(.*)$").match, out.out.splitlines()) if m]
    keys = [k for k, _ in lines]
    if "run_id" in keys:
        assert keys[0] == "run_id", f"run_id must be the first key line: {keys}"
    return code, dict(lines), out.err


def retrain(capsys, config: Path, key: str | None, *extra: str) -> tuple[int, dict[str, str], str]:
    args = ["retrain", config, "--model-name", NAME, "--no-progress", *extra]
    return cli(capsys, *args, *(["--schedule-key", key] if key else []))


def all_runs(client) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def versions(client) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'"))


def lock_exists(client) -> bool:
    return bool(client.search_registered_models(f"name = '{lock_name(NAME)}'"))


def score(text: str) -> float:
    return math.inf if text in ("inf", "none") else float(text)


# ---------------------------------------------------------------------------------------------
# The gate and the metric, as functions


@pytest.mark.parametrize("challenger, champion, mode, min_imp, promoted, words", [
    (5.0, None, "min", 0.0, True, "no champion"),
    (1.0, 2.0, "min", 0.0, True, "better by 1"),
    (2.0, 1.0, "min", 0.0, False, "not better"),
    (1.5, 1.5, "min", 0.0, False, "not better"),         # a tie keeps the champion
    (1.9, 2.0, "min", 0.5, False, "min_improvement 0.5"),
    (1.4, 2.0, "min", 0.5, True, "better by 0.6"),
    (3.0, 2.0, "max", 0.5, True, "better by 1"),
    (1.0, 2.0, "max", 0.0, False, "not better"),
    (math.inf, 2.0, "min", 0.0, False, "not finite"),     # a diverged challenger
    (math.nan, 2.0, "max", 0.0, False, "not finite"),
    (3.0, math.inf, "min", 0.0, True, "champion score inf"),
])
def test_decide(challenger, champion, mode, min_imp, promoted, words):
    ok, reason = decide(challenger, champion, mode, min_imp)
    assert ok is promoted
    assert words in reason


def test_resolve_metric_defaults_and_refusals():
    assert resolve_metric(small_config(), "2d") == ("kl", "min")
    assert resolve_metric(small_config(retrain={"metric": "modes"}), "2d") == ("modes", "max")
    assert resolve_metric(small_config(retrain={"metric": "hq", "mode": "min"}), "2d") == ("hq", "min")
    assert resolve_metric(small_config(data={"name": "digits"}), "image") == ("fid", "min")
    with pytest.raises(ConfigError, match="retrain.metric 'fid'.*use one of modes, hq, kl"):
        resolve_metric(small_config(retrain={"metric": "fid"}), "2d")


def test_warm_start_loads_champion_nets_with_fresh_progress_and_optimizers():
    import torch

    from ganray.orchestrator.job.engine import make_engine

    cfg = small_config()
    donor = make_engine(small_config(seed=7))  # other seed: other initial weights
    donor.run(8)  # trained a little, so its optimizers and progress are not fresh
    champion = donor.state()
    engine = warm_start_factory({k: champion[k] for k in ("G", "D", "G_ema")})(cfg)
    state = engine.state()
    for part in ("G", "D", "G_ema"):
        assert all(torch.equal(state[part][k], champion[part][k]) for k in champion[part]), part
    assert state["progress"]["images_seen"] == 0 and champion["progress"]["images_seen"] > 0
    assert not state["opt_G"]["state"] and champion["opt_G"]["state"]  # Adam moments start afresh
    assert engine.run(2).images_seen == 2 * cfg.schedule.batch_size


def test_warm_start_refuses_weights_of_another_architecture():
    from ganray.models.errors import CheckpointError
    from ganray.orchestrator.job.engine import make_engine

    other = make_engine(small_config(model={"hidden": 16})).state()
    with pytest.raises(CheckpointError, match="do not fit this config's model"):
        warm_start_factory({k: other[k] for k in ("G", "D", "G_ema")})(small_config())


# ---------------------------------------------------------------------------------------------
# The lock


def test_lock_excludes_a_second_holder_until_released(store):
    first = RetrainLock(store, NAME, ttl_s=600)
    first.acquire()
    tags = store.get_registered_model(lock_name(NAME)).tags
    assert tags["holder"] == holder_id() and tags["token"] == first.token
    second = RetrainLock(store, NAME, ttl_s=600)
    with pytest.raises(LockHeldError, match=re.escape(holder_id())) as err:
        second.acquire()
    assert "expires " + tags["expires_at"] in str(err.value)
    first.release()
    assert not lock_exists(store)
    with second:
        assert store.get_registered_model(lock_name(NAME)).tags["token"] == second.token
    assert not lock_exists(store)


def test_expired_lock_of_a_crashed_holder_is_broken(store):
    past = datetime.now(timezone.utc) - timedelta(hours=2)
    store.create_registered_model(lock_name(NAME), tags={
        "holder": "ghost@gone:1", "token": "dead", "acquired_at": (past - timedelta(hours=1)).isoformat(),
        "expires_at": past.isoformat()})
    lock = RetrainLock(store, NAME, ttl_s=600)
    lock.acquire()
    tags = store.get_registered_model(lock_name(NAME)).tags
    assert tags["token"] == lock.token and tags["holder"] == holder_id()
    assert datetime.fromisoformat(tags["expires_at"]) > datetime.now(timezone.utc) + timedelta(seconds=500)
    lock.release()
    assert not lock_exists(store)


def test_heartbeat_extends_the_lease_and_takeover_is_detected(store):
    lock = RetrainLock(store, NAME, ttl_s=2, heartbeat_s=0.2)
    lock.acquire()
    first = datetime.fromisoformat(store.get_registered_model(lock_name(NAME)).tags["expires_at"])
    time.sleep(1.5)
    later = datetime.fromisoformat(store.get_registered_model(lock_name(NAME)).tags["expires_at"])
    assert later >= first + timedelta(seconds=1)  # a live holder is never broken
    # Someone breaks it anyway and takes over: the holder must notice, and leave theirs alone.
    store.delete_registered_model(lock_name(NAME))
    store.create_registered_model(lock_name(NAME), tags={"holder": "other@host:2", "token": "theirs",
                                                         "expires_at": later.isoformat()})
    with pytest.raises(LockHeldError, match="taken over by other@host:2"):
        lock.verify()
    lock.release()
    assert store.get_registered_model(lock_name(NAME)).tags["token"] == "theirs"


# ---------------------------------------------------------------------------------------------
# The command


def test_scheduled_ticks_promote_skip_keep_and_roll_back(store, config_path, capsys):
    # A crashed retrain left an expired lock behind: the first tick must break it, not wait.
    past = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
    store.create_registered_model(lock_name(NAME), tags={"holder": "ghost@gone:1", "token": "dead",
                                                         "expires_at": past})

    # Tick 1: no champion yet, so the challenger is promoted.
    code, out, err = retrain(capsys, config_path, "t1")
    assert code == 0, err
    assert out["decision"] == "promoted" and out["version"] == "1"
    assert out["champion_score"] == "none" and math.isfinite(score(out["challenger_score"]))
    assert aliases(store) == {"champion": "1"}
    assert not lock_exists(store)
    v1 = store.get_model_version(NAME, "1")
    assert v1.run_id == out["run_id"]
    assert v1.tags["ganray.retrain.decision"] == "promoted"
    assert v1.tags["ganray.retrain.schedule_key"] == "t1"
    run = store.get_run(out["run_id"])
    assert run.data.tags["ganray.retrain.decision"] == "promoted"
    assert run.data.params["retrain/metric_used"] == "kl"
    assert run.data.metrics["retrain/challenger_score"] == pytest.approx(float(out["challenger_score"]), rel=1e-5)
    champion_score = score(out["challenger_score"])
    runs_before = len(all_runs(store))

    # The scheduler fires tick 1 again: the earlier decision, nothing trained.
    code, again, err = retrain(capsys, config_path, "t1")
    assert code == 0, err
    assert again["decision"] == "skipped" and again["previous_decision"] == "promoted"
    assert again["run_id"] == out["run_id"] and again["version"] == "1"
    assert len(all_runs(store)) == runs_before and versions(store) == ["1"]

    # Tick 2 on a wrecking learning rate: the challenger is worse, the champion stays.
    code, worse, err = retrain(capsys, config_path, "t2", *WRECK)
    assert code == 0, err
    assert worse["decision"] == "kept" and worse["version"] == "2" and worse["champion_version"] == "1"
    assert float(worse["champion_score"]) == pytest.approx(champion_score, rel=1e-5)
    assert score(worse["challenger_score"]) > champion_score
    assert aliases(store) == {"champion": "1", "challenger": "2"}
    v2 = store.get_model_version(NAME, "2")
    assert v2.tags["ganray.retrain.decision"] == "kept"
    assert v2.tags["ganray.retrain.reason"] == worse["reason"] and worse["reason"]
    assert store.get_run(worse["run_id"]).data.tags["ganray.retrain.decision"] == "kept"

    # Tick 3: 4 more kimg from the champion do help, but not by the required 100.
    code, short, err = retrain(capsys, config_path, "t3", "--set", "retrain.min_improvement=100")
    assert code == 0, err
    gain = champion_score - float(short["challenger_score"])
    assert gain > 0, f"the continued run should improve kl here: {short}"
    assert short["decision"] == "kept" and "min_improvement 100" in short["reason"]
    assert aliases(store)["champion"] == "1"

    # Tick 4: the same run (deterministic) against half its gain as the bar is promoted.
    code, enough, err = retrain(capsys, config_path, "t4", "--set", f"retrain.min_improvement={gain / 2:.6g}")
    assert code == 0, err
    assert enough["challenger_score"] == short["challenger_score"]
    assert enough["decision"] == "promoted" and enough["version"] == "4"
    assert aliases(store)["champion"] == "4"
    assert store.get_model_version(NAME, "4").tags["ganray.retrain.champion_version"] == "1"

    # Rollback by hand, recorded on the version.
    code, back, err = cli(capsys, "promote", NAME, "1", "--reason", "v4 misbehaves in serving")
    assert code == 0, err
    assert back == {"model": NAME, "champion": "1", "previous": "4", "promoted_by": current_user()}
    assert aliases(store)["champion"] == "1"
    tags = store.get_model_version(NAME, "1").tags
    assert tags["ganray.promoted_by"] == current_user()
    assert tags["ganray.promote_reason"] == "v4 misbehaves in serving"
    assert tags["ganray.promoted_from"] == "4"
    assert store.get_model_version(NAME, "4").tags["ganray.demoted_by"] == current_user()

    for args, words in ((("promote", NAME, "99"), "has no version 99"),
                        (("promote", NAME, "99"), f"pass one of them, e.g. `ganray promote {NAME} {versions(store)[-1]}`"),
                        (("promote", "nope", "1"), "no registered model 'nope'"),
                        (("promote", NAME, "one"), "is not a number")):
        code, _, err = cli(capsys, *args)
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert aliases(store)["champion"] == "1"


def test_held_lock_exits_3_and_trains_nothing(store, config_path, capsys):
    with RetrainLock(store, NAME, ttl_s=600) as lock:
        code, out, err = retrain(capsys, config_path, "t1")
        assert code == 3
        assert "holds the lock" in err and holder_id() in err and err.count("\n") == 1
        assert "run_id" not in out and all_runs(store) == []
        assert store.get_registered_model(lock_name(NAME)).tags["token"] == lock.token
    assert not lock_exists(store)


def test_missing_data_or_tampered_champion_changes_no_alias(store, config_path, capsys, tmp_path):
    code, first, err = retrain(capsys, config_path, "t1")
    assert code == 0 and first["decision"] == "promoted", err
    runs_before = len(all_runs(store))

    def unchanged() -> None:
        assert aliases(store) == {"champion": "1"}
        assert versions(store) == ["1"]
        assert len(all_runs(store)) == runs_before
        assert not lock_exists(store)

    # The new snapshot is not there.
    missing = tmp_path / "snapshots" / "2026-11-26"
    code, out, err = retrain(capsys, config_path, "t2", "--set", "data.name=imagefolder",
                             "--set", f"data.path={missing}", "--set", "data.resolution=8")
    assert code == 2 and "run_id" not in out
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1, err
    unchanged()

    # Someone edited the champion's final checkpoint in the artifact store.
    root = Path(unquote(urlparse(store.get_run(first["run_id"]).info.artifact_uri).path))
    final = sorted((root / "checkpoints").glob("kimg-*"))[-1]
    weights = final / "G.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    code, out, err = retrain(capsys, config_path, "t2")
    assert code == 2 and "run_id" not in out
    assert "digest mismatch" in err and "champion" in err and err.count("\n") == 1, err
    unchanged()
