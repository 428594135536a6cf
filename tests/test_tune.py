"""Ray Tune searches: the search file, PBT that really exploits, ASHA with nested MLflow runs.

The searches run real trials (Tune actors, MLflow's embedded sqlite store) with tiny budgets;
a trial's process start (imports) dominates their cost on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import small_config
from ganray.models.errors import CheckpointError, ConfigError
from ganray.orchestrator.tune.spec import (check_search, check_storage, parse_search, reported_eval_metrics,
                                             trial_config)

from mlflow_server import template_db

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(mlflow_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded store in cwd, from a migrated template (a fresh migration costs 5-20 s)."""
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), mlflow_store / "mlflow.db")
    return mlflow_store


def _trial_reports(experiment_path: str) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial reported, from Tune's own result.json files."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in Path(experiment_path).glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _client(folder: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def _children(client: Any, parent_run_id: str) -> list[Any]:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# ---------------------------------------------------------------------------------------------
# The search file, checked before any trial starts


GRID_SPEC = {"scheduler": {"kind": "asha"}, "metric": "eval/kl", "num_samples": 2,
             "space": {"schedule.g_lr": {"loguniform": [1e-4, 1e-3]}}}


@pytest.mark.parametrize("change, message", [
    ({"space": {"schedule.g_lrr": {"uniform": [0.1, 0.2]}}}, r"schedule\.g_lrr.*did you mean 'schedule\.g_lr'"),
    ({"space": {"schedule.n_critic": {"uniform": [1, 3]}}}, r"schedule\.n_critic.*integer"),
    ({"space": {"schedule.g_lr": {"uniform": [0.2, 0.1]}}}, r"space\.schedule\.g_lr.*lo < hi"),
    ({"space": {"schedule.g_lr": {"normal": [0.1, 0.2]}}}, r"unknown key 'space\.schedule\.g_lr\.normal'"),
    ({"scheduler": {"kind": "hyperband"}}, r"scheduler\.kind must be one of"),
    ({"scheduler": {"kind": "asha", "perturbation_interval": 2}}, r"perturbation_interval belongs to .*'pbt'"),
    ({"scheduler": {"kind": "pbt"}, "space": {"model.hidden": {"choice": [16, 32]}}}, r"pbt.*mutate.*schedule\.g_lr"),
    ({"metric": "eval/fid"}, r"metric 'eval/fid' is not reported.*eval/kl"),
    ({"storage": "/x"}, r"unknown key 'storage'.*did you mean 'storage_path'"),
])
def test_bad_search_file_is_a_config_error(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_search(parse_search({**GRID_SPEC, **change}), small_config())


def test_reported_metrics_follow_the_data_kind() -> None:
    assert reported_eval_metrics(small_config()) == ["eval/modes", "eval/hq", "eval/kl"]
    digits = small_config(data={"name": "digits", "size": 4096})
    assert {"eval/fid", "eval/kid"} <= set(reported_eval_metrics(digits))
    assert reported_eval_metrics(small_config(data={"name": "imagefolder", "path": "/x"})) == []
    assert parse_search({"metric": "eval/fid"}).resolved_mode == "min"
    assert parse_search({"metric": "eval/hq"}).resolved_mode == "max"


def test_trial_config_applies_sampled_keys() -> None:
    import numpy as np

    cfg = trial_config(small_config(), {"schedule.g_lr": np.float64(3e-4), "model.hidden": np.int64(16),
                                        "schedule.betas": [0.0, 0.9]})
    assert cfg.schedule.g_lr == pytest.approx(3e-4) and cfg.model.hidden == 16 and cfg.schedule.betas == (0.0, 0.9)


def test_relative_paths_are_made_absolute_for_the_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ganray.orchestrator.tune.spec import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(small_config(data={"name": "imagefolder", "path": "images"},
                                      eval={"inception_weights": "w/inception.pt"}))
    assert cfg.data.path == str(tmp_path / "images") and cfg.eval.inception_weights == str(tmp_path / "w/inception.pt")
    remote = absolute_paths(small_config(data={"name": "parquet", "path": "s3://bucket/set"}))
    assert remote.data.path == "s3://bucket/set"


def test_storage_on_a_multi_node_cluster_must_be_shared() -> None:
    with pytest.raises(ConfigError, match=r"3 nodes.*shared storage.*cloud URI"):
        check_storage("/home/me/ray_results", alive_nodes=3, fstype="ext4")
    check_storage("/home/me/ray_results", alive_nodes=1, fstype="ext4")
    check_storage("/mnt/shared/ray_results", alive_nodes=3, fstype="nfs4")
    check_storage("s3://bucket/ray_results", alive_nodes=3)


def test_placement_reserves_the_trials_workers() -> None:
    from ganray.orchestrator.tune import placement_factory

    local = placement_factory(small_config(resources={"threads_per_worker": 2}))
    assert local.bundles == [{"CPU": 2.0}]
    assert not local.head_bundle_is_empty  # a local trial trains in its own process
    # Ray topologies: the coordinator takes no resources, every worker actor one bundle.
    replicated = placement_factory(small_config(topology={"kind": "replicated", "num_workers": 2}))
    assert replicated.head_bundle_is_empty and replicated.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert replicated.required_resources == {"CPU": 2.0}
    split = placement_factory(small_config(topology={"kind": "split", "num_generators": 1, "num_discriminators": 2},
                                           resources={"generator": {"cpus": 2}, "discriminator": {"cpus": 1}}))
    assert split.head_bundle_is_empty and split.bundles == [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}]


@pytest.mark.parametrize("change, message", [
    ({"space": {"schedule.g_lrr": {"uniform": [0.1, 0.2]}}}, "schedule.g_lrr"),
    ({"scheduler": {"kind": "hyperband"}}, "hyperband"),
    ({"metric": "eval/fid"}, "eval/fid"),
])
def test_cli_rejects_a_bad_search_before_any_trial(store: Path, capsys: pytest.CaptureFixture, change: dict,
                                                   message: str) -> None:
    from ganray.orchestrator.cli import main

    (store / "job.yaml").write_text(small_config().to_yaml())
    (store / "search.yaml").write_text(yaml.safe_dump({**GRID_SPEC, **change}))
    before = (store / "mlflow.db").stat().st_mtime_ns
    code = main(["tune", str(store / "job.yaml"), "--search", str(store / "search.yaml")])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert "parent_run_id" not in out  # no parent run, no Tune experiment, no trial
    assert not (store / "ray_results").exists() and (store / "mlflow.db").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------
# Searches with real trials


def test_pbt_exploits_and_applies_its_own_hyperparameters(ray_session: Any, store: Path) -> None:
    from ganray.orchestrator.job.checkpoint import read_checkpoint
    from ganray.orchestrator.tune import search

    base = small_config(schedule={"total_kimg": 2, "batch_size": 64, "sync_kimg": 0.5},
                        eval={"every_kimg": 1, "num_samples": 500})
    # Synchronous PBT ranks all four trials after iteration 1: the worst one exploits the best.
    # (Asynchronous PBT ranks against stale scores and may, by timing, exploit nothing.)
    spec = {"scheduler": {"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.25,
                          "resample_probability": 0.0, "synch": True},
            "metric": "eval/hq", "mode": "max", "num_samples": 4, "seed": 1, "name": "pbt", "keep_checkpoints": 10,
            "space": {"schedule.g_lr": {"loguniform": [1e-5, 1e-1]}}}
    result = search(base, spec)
    assert result.num_trials == 4 and result.num_errors == 0 and not result.interrupted

    reports = _trial_reports(result.experiment_path)
    assert len(reports) == 4
    exploits = [(tid, row) for tid, rows in reports.items() for row in rows
                if row.get("restored_from") not in (None, tid)]
    assert exploits, "no trial restored another trial's checkpoint"
    tid, row = exploits[0]
    donor = row["restored_from"]
    # The first step after the restore continues from the donor's kimg (one eval interval on).
    assert 0 < row["kimg"] - row["restored_kimg"] <= base.eval.every_kimg + base.schedule.batch_size / 1000
    own_lr = row["config"]["schedule.g_lr"]
    # The donor's rows may be cut short: when Tune restarts a paused trial it copies result.json
    # back from the experiment's storage, which may not have caught up yet. Its config is its
    # own throughout (the donor is the best trial: PBT never mutates it), so any row tells it.
    donor_lrs = {r["config"]["schedule.g_lr"] for r in reports[donor]}
    assert len(donor_lrs) == 1
    assert own_lr != pytest.approx(donor_lrs.pop())  # PBT mutated it (x0.8 or x1.2)

    # The checkpoint reported with that step carries this trial's learning rate, not the donor's.
    trial_dir = next(Path(result.experiment_path).glob(f"*_{tid}_*"))
    folder = trial_dir / row["checkpoint_dir_name"]
    state, meta = read_checkpoint(folder)
    assert meta["trial_id"] == tid and meta["trial_config"]["schedule.g_lr"] == pytest.approx(own_lr)
    for group in state["opt_G"]["param_groups"]:
        assert group["lr"] == pytest.approx(own_lr * 1.0)  # lr_factor is 1 without lr_decay
    assert state["progress"]["images_seen"] == row["images_seen"]

    # MLflow: one child run per trial (a restarted trial continued its own run), donor recorded.
    client = _client(store)
    children = {r.data.tags["ganray.trial_id"]: r for r in _children(client, result.parent_run_id)}
    assert set(children) == set(reports)
    assert children[tid].data.tags.get("ganray.tune.restored_from") == row["restored_from"]
    assert all(r.info.status == "FINISHED" for r in children.values())


def test_asha_on_digits_nests_runs_and_registers_the_winner(ray_session: Any, store: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from ganray.orchestrator.cli import main

    # Conditional with adaptive augmentation: the class embeddings and ADA's p are trial state like any other.
    job = small_config(data={"name": "digits", "size": 4096},
                       model={"generator": "dcgan", "discriminator": "dcgan", "z_dim": 8, "base_width": 8,
                              "batchnorm": False, "conditional": True, "num_classes": 10},
                       augment={"kind": "ada", "interval": 2},
                       schedule={"total_kimg": 1.5, "batch_size": 32, "sync_kimg": 0.25},
                       eval={"every_kimg": 0.5, "num_samples": 360},
                       tracking={"model_name": "tune-digits"})
    (store / "job.yaml").write_text(job.to_yaml())
    # Both trials run at once against the one sqlite store: no metric point may be lost.
    (store / "search.yaml").write_text(yaml.safe_dump({
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "metric": "eval/fid", "num_samples": 2, "max_concurrent_trials": 2, "seed": 0,
        "space": {"schedule.g_lr": {"choice": [2e-4, 2e-3]}, "loss.r1_gamma": {"uniform": [0.0, 0.1]}}}))
    code = main(["tune", str(store / "job.yaml"), "--search", str(store / "search.yaml")])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("parent_run_id=")  # printed before any trial ran
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    parent_id, best_run = values["parent_run_id"], values["best_run_id"]

    client = _client(store)
    children = _children(client, parent_id)
    reports = _trial_reports(values["experiment_path"])
    assert len(children) == 2 and len(reports) == 2
    # The two trials trained at the same time (each one's first report before the other's last).
    spans = [(rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]) for rows in reports.values()]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    for child in children:
        rows = reports[child.data.tags["ganray.trial_id"]]
        assert {r["mlflow_run_id"] for r in rows} == {child.info.run_id}
        assert float(child.data.params["schedule.g_lr"]) == pytest.approx(rows[0]["config"]["schedule.g_lr"])
        # The trial's coordinator logs the machine's system/* figures beside its training points.
        assert "system/cpu_utilization_percentage" in child.data.metrics
        assert {"eval/class_acc", "eval/class_acc_min", "augment/p"} <= set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "eval/fid")
        assert sorted(m.step for m in history) == [r["images_seen"] for r in rows]  # nothing lost
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["eval/fid"] for r in rows])

    parent = client.get_run(parent_id)
    assert parent.data.tags["ganray.tune.best_trial"] == values["best_trial"]
    assert parent.data.tags["ganray.tune.best_run_id"] == best_run
    assert parent.data.metrics["best/eval/fid"] == pytest.approx(float(values["best_eval/fid"]), rel=1e-5)
    best_rows = reports[values["best_trial"]]
    assert float(values["best_eval/fid"]) == pytest.approx(best_rows[-1]["eval/fid"], rel=1e-5)
    # The printed figure has 6 significant digits: compare within that rounding.
    assert all(float(values["best_eval/fid"]) <= reports[t][-1]["eval/fid"] * (1 + 1e-5) for t in reports)
    mv = client.get_model_version("tune-digits", values["model_version"])
    assert mv.run_id == best_run and mv.tags["ganray.tune.trial_id"] == values["best_trial"]


def test_a_trial_runs_the_training_loop_of_ganray_train(ray_session: Any, store: Path) -> None:
    """A trial is `ganray train`'s Trainer: the same config gives the same points, to the bit,
    and the trial reports at the evaluations the plain run logs."""
    from ganray.orchestrator.job.trainer import Trainer
    from ganray.orchestrator.tune import search

    base = small_config(schedule={"total_kimg": 1, "batch_size": 64, "sync_kimg": 0.25},
                        eval={"every_kimg": 0.5, "num_samples": 200})
    spec = {"metric": "eval/kl", "num_samples": 1, "name": "same-loop",
            "space": {"schedule.d_lr": {"choice": [base.schedule.d_lr]}}}  # the base config itself
    found = search(base, spec)
    assert found.num_errors == 0 and found.best_trial is not None
    plain = Trainer(base, progress=False).run()

    client = _client(store)
    (child,) = _children(client, found.parent_run_id)

    def points(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    for key in ("loss/D", "loss/G", "eval/kl", "eval/modes"):
        assert points(child.info.run_id, key) == points(plain.run_id, key), key
    assert [step for step, _ in points(plain.run_id, "loss/D")] == [256, 512, 768, 1024]
    rows = _trial_reports(found.experiment_path)[found.best_trial]
    assert [(r["images_seen"], r["eval/kl"]) for r in rows] == points(plain.run_id, "eval/kl")
    assert [r["done"] for r in rows] == [False, True]


def test_replicated_trial_uses_its_own_placement_group_and_resumes(ray_session: Any, store: Path) -> None:
    from ray.util import placement_group_table

    from ganray.orchestrator.tune import search

    base = small_config(topology={"kind": "replicated", "num_workers": 2},
                        schedule={"total_kimg": 2, "batch_size": 64, "sync_kimg": 0.5},
                        eval={"every_kimg": 1, "num_samples": 500})
    spec = {"metric": "eval/kl", "num_samples": 1, "name": "rep",
            "space": {"schedule.d_lr": {"choice": [3e-4]}}}
    groups_before = set(placement_group_table())
    first = search(base, spec)
    assert first.num_errors == 0 and first.best_trial is not None
    rows = _trial_reports(first.experiment_path)[first.best_trial]
    assert [r["images_seen"] for r in rows] == [1024, 2048]
    new = [g for gid, g in placement_group_table().items() if gid not in groups_before]
    # One group: the trial's (its two workers' bundles); the coordinator reserved none of its own.
    assert [list(g["bundles"].values()) for g in new] == [[{"CPU": 1.0}, {"CPU": 1.0}]]

    with pytest.raises(ConfigError, match="already exists.*--resume"):
        search(base, spec)
    with pytest.raises(CheckpointError, match="no Tune search"):
        search(base, {**spec, "name": "never-ran"}, resume=True)
    again = search(base, spec, resume=True)  # a finished search: nothing left to run, same parent run
    assert again.parent_run_id == first.parent_run_id and again.best_trial == first.best_trial
    assert len(_children(_client(store), first.parent_run_id)) == 1
