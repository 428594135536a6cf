"""`ganray compare`: the learners trained by the same Trainer at one budget, scored alike.

The end-to-end test runs the shipped ring8 recipe (replicated, real Ray actors, the embedded
MLflow store) shrunk to a few kimg, with the default budget (the GAN's time for the recipe) and
every learner the project has; the budget engine's image captures are checked against runs
stopped there; bad input is one line and exit 2 before anything trains.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_cli, small_config
from ganray.orchestrator.compare.budget import BudgetEngine
from ganray.orchestrator.job.engine import LocalEngine
from ganray.orchestrator.job.progress import Progress

from mlflow_server import sqlite_store  # noqa: F401

LEARNERS = ("gan", "ae", "vae", "energy")
SHRINK = ["--set", "schedule.total_kimg=6", "--set", "schedule.lr_decay_kimg=6", "--set", "schedule.sync_kimg=1",
          "--set", "schedule.checkpoint_kimg=3", "--set", "schedule.sample_kimg=3", "--set", "eval.num_samples=500",
          "--set", "model.energy_steps=10", "--set", "model.energy_sample_steps=20"]  # energy's own keys


def _runs_under(parent_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_compare_ring8_default_budget_every_learner(ray_session, sqlite_store: Path) -> None:
    out = sqlite_store / "cmp"
    code, stdout, stderr = run_cli(["compare", str(REPO / "configs" / "ring8.yaml"), "--learners", ",".join(LEARNERS),
                                    "--out", str(out), *SHRINK])
    assert code == 0, stderr
    lines = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["seeds"] == [1000] and summary["data"] == "ring8"
    assert list(summary["learners"]) == list(LEARNERS)
    gan = summary["learners"]["gan"]
    # The default budget: the GAN's own training seconds for the recipe, given to every learner.
    assert summary["budget"]["kind"] == "gan_total_kimg"
    assert summary["budget"]["per_seed_s"] == [pytest.approx(gan["train_s"])]
    assert gan["images_seen"] >= 6000
    common = summary["same_images"]["per_seed"][0]
    for name, entry in summary["learners"].items():
        for key in ("metrics", "sample_s_per_1000", "evals_per_sample", "train_s", "images_seen", "run_id"):
            assert entry[key] is not None, (name, key)
        assert set(entry["metrics"]) >= {"modes", "hq", "kl"}, name
        assert 0 <= entry["metrics"]["modes"] <= 8 and 0 <= entry["metrics"]["hq"] <= 1
        assert entry["sample_s_per_1000"] > 0 and entry["train_s"] > 0
        assert 0 < entry["images_seen"] <= 6016  # the round that reaches 6 kimg, at most
        if name != "energy":
            assert entry["evals_per_sample"] == 1.0, name
        # The same-images table: every learner's state at one image count (one round apart at most).
        same = entry["same_images"]
        assert same is not None and abs(same["images_seen"] - common) <= 64, name
        assert set(same["metrics"]) >= {"modes", "hq", "kl"}
        assert f"{name}/modes" in lines and f"{name}/sample_s_per_1000" in lines
    assert summary["learners"]["energy"]["evals_per_sample"] == 20  # a search over D's score per sample
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in LEARNERS) and "Same number of real images seen" in table
    assert "training gan" in stderr and "training ae" in stderr  # progress on stderr

    # MLflow: one parent run, a finished child run per learner holding its config and checkpoint.
    from mlflow import MlflowClient

    parent_id = lines["parent_run_id"]
    assert summary["parent_run_id"] == parent_id
    parent = MlflowClient().get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ganray.compare"] == "parent"
    assert {a.path for a in MlflowClient().list_artifacts(parent_id)} >= {"compare.json", "compare.md", "compare.png", "config.yaml"}
    children = {run.data.tags["ganray.compare.learner"]: run for run in _runs_under(parent_id)}
    assert set(children) == set(LEARNERS)
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_id == summary["learners"][name]["run_id"]
        assert run.data.params["model.learner"] == name
        # A learner's own key reaches only that learner.
        assert (run.data.params.get("model.energy_sample_steps") == "20") == (name == "energy"), name
        assert any(a.path == "checkpoints" for a in MlflowClient().list_artifacts(run.info.run_id)), name


def test_budget_stops_a_learner_and_its_captures_equal_runs_stopped_there() -> None:
    config = small_config(schedule={"total_kimg": 2, "sync_kimg": 1})
    # Captures: the sampling module's state at 1 kimg of a longer run is that of a run stopped there.
    longer = BudgetEngine(LocalEngine(config), budget_s=None, capture_at=(1024,))
    longer.run(0)
    while longer.run(1000, 2048).rounds:
        pass
    images, captured = longer.captures[1024]
    assert images == 1024
    stopped = LocalEngine(config)
    stopped.run(16, 1024)
    for key, value in stopped.generator_state().items():
        assert torch.equal(captured[key], value), key
    # A spent budget: no more rounds, where the engine stands (the Trainer ends training there).
    spent = BudgetEngine(LocalEngine(config), budget_s=1e-9)
    spent.run(0)
    first = spent.run(1, 2048)
    assert first.rounds == 1
    after = spent.run(1000, 2048)
    assert (after.rounds, after.images_seen, spent.out_of_time) == (0, first.images_seen, True)


def test_compare_stops_learners_at_the_budget_over_seeds(sqlite_store: Path) -> None:
    out = sqlite_store / "cmp"
    code, stdout, stderr = run_cli(["compare", str(REPO / "configs" / "ring8.yaml"), "--learners", "ae,gan",
                                    "--budget-s", "1.5", "--seeds", "2", "--out", str(out), "--no-progress",
                                    "--set", "topology.kind=local", "--set", "tracking.enabled=false"])
    assert code == 0, stderr
    summary = json.loads((out / "compare.json").read_text())
    assert summary["budget"] == {"kind": "given", "seconds": 1.5, "per_seed_s": [1.5, 1.5]}
    assert summary["parent_run_id"] is None and summary["seeds"] == [1000, 1001]
    assert list(summary["learners"]) == ["gan", "ae"]  # the GAN first, as with the default budget
    for entry in summary["learners"].values():
        rows = entry["per_seed"]
        assert [r["seed"] for r in rows] == [1000, 1001] and all(r["run_id"] is None for r in rows)
        # The recipe's 1,000 kimg is far beyond the budget: the budget, not the schedule, ended them.
        assert all(r["images_seen"] < 1_000_000 for r in rows)
        assert entry["images_seen"] == pytest.approx(sum(r["images_seen"] for r in rows) / 2)
        for key, value in entry["metrics"].items():  # mean and spread over the seeds
            values = [r["metrics"][key] for r in rows]
            if all(v is not None for v in values) and value is not None:
                assert value == pytest.approx(sum(values) / 2)
                assert entry["metrics_std"][key] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert len(entry["same_images"]["per_seed"]) == 2
    assert "parent_run_id" not in stdout and "[ganray]" not in stderr  # --no-progress: no training bar


@pytest.mark.parametrize("signum, exit_code, during", [(signal.SIGINT, 130, "training"),
                                                      (signal.SIGTERM, 143, "training"),
                                                      (signal.SIGINT, 130, "scoring")])
def test_a_stop_signal_checkpoints_the_learner_in_training_and_ends_the_comparison(
        sqlite_store: Path, monkeypatch: pytest.MonkeyPatch, signum: int, exit_code: int, during: str) -> None:
    # Ctrl-C (SIGINT) behaves as SIGTERM: the learner in training (here the second, ae) finishes its
    # chunk, writes a checkpoint and stops; between learners the comparison stops at once. Either
    # way the comparison ends, its parent run KILLED, one line and no traceback.
    import ganray.orchestrator.compare.runner as runner

    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    chunks_after: list[int] = []
    real_run, real_scores = BudgetEngine.run, runner.scores

    def run_then_signal(self: BudgetEngine, n_rounds: int, stop_at_images=None):  # noqa: ANN001, ANN202
        res = real_run(self, n_rounds, stop_at_images)
        if n_rounds > 0 and self.budget_s is not None:  # the GAN trains first, with no time limit
            chunks_after.append(res.images_seen)
            if len(chunks_after) == 2 and during == "training":
                signal.raise_signal(signum)  # delivered to this process mid-training, as kill or Ctrl-C does
        return res

    def signal_then_score(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        signal.raise_signal(signum)
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(BudgetEngine, "run", run_then_signal)
    if during == "scoring":
        monkeypatch.setattr(runner, "scores", signal_then_score)
    out = sqlite_store / "cmp"
    code, stdout, stderr = run_cli(["compare", str(REPO / "configs" / "ring8.yaml"), "--learners", "gan,ae",
                                    "--out", str(out), "--no-progress", "--set", "topology.kind=local",
                                    "--set", "schedule.total_kimg=3", "--set", "schedule.lr_decay_kimg=3",
                                    "--set", "schedule.sync_kimg=0.5", "--set", "schedule.checkpoint_kimg=1",
                                    "--set", "schedule.sample_kimg=3", "--set", "eval.num_samples=500"])
    assert code == exit_code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    name = signal.Signals(signum).name
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    if during == "training":
        assert f"stopped ({name}) while training ae, seed 1000" in errors[0] and "holds a checkpoint" in errors[0]
        assert len(chunks_after) == 2  # no chunk trained after the signal
    else:
        assert f"stopped ({name}) before the comparison finished" in errors[0] and "scoring gan" in stderr
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before  # the handlers are put back
    assert not (out / "compare.json").exists()

    from mlflow import MlflowClient

    lines = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    parent = MlflowClient().get_run(lines["parent_run_id"])
    assert parent.info.status == "KILLED"
    children = {run.data.tags["ganray.compare.learner"]: run for run in _runs_under(parent.info.run_id)}
    assert set(children) == {"gan", "ae"}
    assert any(a.path == "checkpoints" for a in MlflowClient().list_artifacts(children["ae"].info.run_id))


def test_the_progress_line_shows_each_learners_own_figures(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(total_kimg=10.0, enabled=True, min_interval_s=0.0)
    bar.interactive = False  # the plain line, as in a log
    bar.update(1.0, 5.0, {"loss/D": [0.5, 0.7], "loss/G": [1.0]})
    bar.update(2.0, 5.0, {"loss/D": [0.2], "D/real_score": [1.5], "D/fake_score": [-0.5], "energy/start_score": [0.1]})
    gan, energy = capsys.readouterr().err.splitlines()
    assert "loss D 0.600  G 1.000" in gan
    assert "loss D 0.200  D real_score 1.500  D fake_score -0.500" in energy and "nan" not in energy


def test_each_learner_gets_the_recipe_minus_the_keys_it_does_not_read() -> None:
    from ganray.orchestrator.compare.learners import Recipe, learner_config, seeds_of

    recipe = Recipe.load(REPO / "configs" / "ring8.yaml", ["model.ae_noise=0.05", "schedule.total_kimg=3"])
    gan, ae = learner_config(recipe, "gan", 1000), learner_config(recipe, "ae", 1000)
    assert (gan.model.learner, gan.model.pack, gan.loss.r1_gamma, gan.model.ae_noise) == ("gan", 2, 0.01, 0.0)
    assert (ae.model.learner, ae.model.pack, ae.model.ae_noise, ae.seed) == ("ae", 1, 0.05, 1000)
    assert ae.loss == type(ae.loss)() and ae.schedule.total_kimg == gan.schedule.total_kimg == 3
    assert (ae.model.hidden, ae.schedule.batch_size) == (gan.model.hidden, gan.schedule.batch_size)
    assert ae.tracking.model_name is None and ae.eval.every_kimg > ae.schedule.total_kimg
    assert (seeds_of(None, None), seeds_of(7, None), seeds_of(None, 3)) == ([1000], [7], [1000, 1001, 1002])


@pytest.mark.parametrize("argv, says", [
    (["--learners", "gan,gann"], "unknown learner 'gann'"),
    (["--learners", "gan,gan"], "names 'gan' twice"),
    (["--budget-s", "0"], "--budget-s 0"),
    (["--budget-s", "-5"], "--budget-s -5"),
    (["--seed", "3", "--seeds", "2"], "not both"),
    (["--seeds", "0"], "--seeds 0"),
    (["--learners", "ae,vae"], "add gan to --learners or give --budget-s"),
    (["--learners", "gan,ae", "--set", "topology.kind=split"], "model.learner 'ae' runs in topology.kind local"),
    (["--learners", "gan", "--set", "model.ae_noise=0.1"], "none of the learners compared (gan) reads it"),
    (["--set", "schedule.totl_kimg=3"], "unknown key 'schedule.totl_kimg'"),
])
def test_compare_bad_input_is_one_line_exit_2(sqlite_store: Path, argv: list[str], says: str) -> None:
    out = sqlite_store / "cmp"
    code, stdout, stderr = run_cli(["compare", str(REPO / "configs" / "ring8.yaml"), "--out", str(out), *argv])
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in stderr, stderr
    assert "parent_run_id" not in stdout and not (out / "compare.json").exists()
