"""Class-conditional GANs (issue 18, item 2): G(z, y), a projection D(x, y), labels that travel
with their rows, fake classes from the per-round streams.

Pure torch and `local` first (the projection's class term, Parquet labels through sharding, bad
input, exact resume, two thread replicas), then real Ray (replicated(1) = local within 1e-5,
split(1G, 1D) = local within 1e-4, with relativistic pairs, R1, R2 and ADA on), then the release
(pt2 with two inputs) and `ganray sample --class` through the CLI on a tiny trained model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml

from helpers import ray_rounds, run_cli, small_config, small_tree
from ganray.models.errors import ConfigError, DataError
from ganray.orchestrator.job.engine import LocalEngine
from ganray.workers.augment import p_metric

CONDITIONAL = {"generator": "dcgan", "discriminator": "dcgan", "z_dim": 8, "base_width": 8, "batchnorm": False,
               "conditional": True, "num_classes": 10}


def _tree(**sections: Any) -> dict[str, Any]:
    tree = small_tree(data={"name": "digits"}, model=CONDITIONAL, schedule={"batch_size": 32, "n_critic": 2},
                      loss={"kind": "relativistic", "r1_gamma": 0.05, "r2_gamma": 0.05, "r1_interval": 2},
                      augment={"kind": "ada", "speed_kimg": 1.0, "interval": 2})
    tree["model"] = {k: v for k, v in tree["model"].items() if k not in ("hidden", "depth")}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


def _digits(**sections: Any):
    from ganray.orchestrator.job.config import config_from_dict

    return config_from_dict(_tree(**sections))


def _losses(result) -> np.ndarray:
    return np.stack([result.metrics["loss/D"], result.metrics["loss/G"]])


@pytest.fixture(scope="module")
def local_run():
    """8 rounds of the conditional digits job in `local`: the reference of the Ray topologies."""
    return LocalEngine(_digits()).run(8)


# --- the networks and local ---------------------------------------------------------------------

def test_the_projection_discriminator_reads_the_class_of_real_digits() -> None:
    """After a few rounds on the digits, D's logit of a real digit depends on the class it is
    told, and the class embeddings of G and D have moved from their initial values."""
    engine = LocalEngine(_digits())
    D, G = engine.stepper.disc.D, engine.stepper.gen.G
    d_embed, g_embed = D.projection.embed.weight.detach().clone(), G.classes.embed.weight.detach().clone()
    engine.run(4)
    source = engine.stepper.source
    x = source.get(np.arange(64))
    y = torch.as_tensor(source.labels[:64])
    with torch.no_grad():
        told_right, told_wrong = D(x, y), D(x, (y + 1) % 10)
    assert (told_right - told_wrong).abs().mean() > 1e-3
    assert not torch.equal(D.projection.embed.weight, d_embed)
    assert not torch.equal(G.classes.embed.weight, g_embed)
    with pytest.raises(ValueError, match="class-conditional"):
        D(x)  # no silent unconditional score


def test_conditional_packing_and_2d_mixtures_train() -> None:
    """PacGAN's packed D sums its members' class embeddings; grid25's modes are its classes."""
    result = LocalEngine(small_config(model={"conditional": True, "num_classes": 25, "pack": 2})).run(3)
    assert np.isfinite(_losses(result)).all()


def test_parquet_labels_travel_with_their_rows(tmp_path: Path) -> None:
    """`data.label_column`: every rank's rows come with their own labels, epoch after epoch
    (each row's pixels encode its label here), and a conditional job trains on them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ganray.workers.data import load_dataset
    from ganray.workers.sharding import RealBatches, ShardSampler

    labels = np.arange(300) % 7
    pixels = [[float(k) / 10.0] * 64 for k in labels]
    pq.write_table(pa.table({"x": pixels, "y": labels}), tmp_path / "set.parquet", row_group_size=64)
    data = {"name": "parquet", "path": str(tmp_path / "set.parquet"), "column": "x", "label_column": "y",
            "resolution": 8, "channels": 1}
    source = load_dataset(data, 0, "train")
    for rank in range(2):
        sampler, batches = ShardSampler(len(source), 32, 0, rank, 2), RealBatches(source, torch.device("cpu"),
                                                                                   source.labels)
        for _ in range(2 * sampler.batches_per_epoch):
            rows, y = batches.next_labelled(sampler)
            assert torch.equal(y, (rows.mean(dim=(1, 2, 3)) * 10).round().long())
    result = LocalEngine(_digits(data=data, model={"num_classes": 7})).run(2)
    assert np.isfinite(_losses(result)).all()
    with pytest.raises(DataError, match="data.label_column 'nope' is not in"):
        load_dataset({**data, "label_column": "nope"}, 0, "train")


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="data 'random_images' has no labels"):
        LocalEngine(small_config(data={"name": "random_images", "resolution": 8, "channels": 1, "size": 64},
                                 model={**CONDITIONAL}, schedule={"batch_size": 32}))
    with pytest.raises(DataError, match="labels 0..9 but model.num_classes is 5"):
        LocalEngine(_digits(model={"num_classes": 5}))
    config = tmp_path / "job.yaml"
    config.write_text("data: {name: digits}\n")
    code, _, err = run_cli(["validate", str(config), "--set", "model.conditional=true"])
    assert code == 2 and "needs model.num_classes" in err and len(err.strip().splitlines()) == 1
    job = tmp_path / "nolabels.yaml"
    job.write_text(yaml.safe_dump(small_tree(
        data={"name": "random_images", "resolution": 8, "channels": 1, "size": 64}, schedule={"batch_size": 32},
        model={**CONDITIONAL, "hidden": 32, "depth": 2})))
    from mlflow_server import template_db

    shutil.copyfile(template_db(tmp_path), tmp_path / "m.db")  # a ready store: no schema migrations
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", str(job), "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    # (MLflow's own INFO lines about creating the store come before it.)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "has no labels" in last and "Traceback" not in err, err


def test_exact_resume_keeps_the_class_embeddings(tmp_path: Path) -> None:
    """Write and read a checkpoint mid-run and go on: the same losses, bit for bit, as a run
    that never stopped; the class embeddings are in the checkpoint."""
    from ganray.orchestrator.job.checkpoint import read_checkpoint, write_checkpoint

    config = _digits()
    whole = LocalEngine(config)
    whole.run(3)
    state = whole.state()
    assert "classes.embed.weight" in state["G"] and "projection.embed.weight" in state["D"]
    rest = whole.run(4)
    write_checkpoint(state, tmp_path / "ckpt", {})
    restored, _ = read_checkpoint(tmp_path / "ckpt")
    resumed = LocalEngine(config)
    resumed.load_state(restored)
    assert resumed.run(4).metrics == rest.metrics


def test_two_replicas_take_their_own_rows_and_classes(local_run) -> None:
    """Each replica's real rows come with their own labels and its fakes with its slice of the
    classes `local` draws: two replicas (threads averaging their gradients as the actors'
    all-reduce does) reproduce `local` within float tolerance."""
    import threading

    from helpers import ThreadMean
    from ganray.workers.stepper import build_replica

    cfg = _digits().model_dump()
    reduce = ThreadMean(2)
    replicas = [build_replica(cfg, rank, 2, reduce.hook(rank)) for rank in range(2)]
    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = replicas[rank].run_rounds(8)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in ("loss/D", "loss/G", "D/real_score", "D/fake_score"):
        merged = np.mean([results[0]["metrics"][key], results[1]["metrics"][key]], axis=0)
        np.testing.assert_allclose(merged, local_run.metrics[key], rtol=0, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("swap_every_epochs", [0, 1])
def test_two_discriminators_read_their_own_rows_with_their_labels(swap_every_epochs: int) -> None:
    """split(1G, 2D): each discriminator reads the rows of its shard with their own labels, also
    after MD-GAN's swap moves it to the other shard at an epoch's end."""
    from ganray.workers.data import load_dataset
    from ganray.workers.sharding import RealBatches, RotatingShard, epoch_permutation

    source = load_dataset(_digits().model_dump()["data"], 0, "train")
    labels = np.asarray(source.labels, dtype=np.int64)
    read: list[np.ndarray] = []

    class Recording:  # the source, noting which rows each batch asked for
        sample_shape = source.sample_shape

        def __len__(self) -> int:
            return len(source)

        def get(self, idx: np.ndarray) -> torch.Tensor:
            read.append(np.array(idx))
            return source.get(idx)

    batches = RealBatches(Recording(), torch.device("cpu"), labels)
    readers = [RotatingShard(batches, 32, 7, index, 2, swap_every_epochs) for index in range(2)]
    for epoch in range(3):
        perm = epoch_permutation(len(source), 7, epoch)
        for b in range(readers[0].sampler.batches_per_epoch):
            for index, reader in enumerate(readers):
                rows, got = reader.next()
                shard = (index + epoch * (swap_every_epochs > 0)) % 2
                expected = perm[b * 32 + shard * 16: b * 32 + (shard + 1) * 16]
                np.testing.assert_array_equal(read[-1], expected)
                np.testing.assert_array_equal(got.numpy(), labels[expected])
                assert torch.equal(rows, source.get(expected))


# --- Ray ----------------------------------------------------------------------------------------

def test_one_replica_reproduces_local(ray_session, local_run) -> None:
    result = ray_rounds(_digits(topology={"kind": "replicated", "num_workers": 1}), 8)
    np.testing.assert_allclose(_losses(result), _losses(local_run), rtol=0, atol=1e-5)
    for key in ("D/real_score", "D/fake_score", p_metric()):
        np.testing.assert_allclose(result.metrics[key], local_run.metrics[key], rtol=0, atol=1e-5, err_msg=key)


def test_one_generator_one_discriminator_matches_local(ray_session, local_run) -> None:
    result = ray_rounds(_digits(topology={"kind": "split", "num_generators": 1, "num_discriminators": 1},
                                resources={"cpus_per_worker": 0.5}), 8)
    np.testing.assert_allclose(_losses(result), _losses(local_run), rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.metrics["D/fake_score"], local_run.metrics["D/fake_score"], rtol=0, atol=1e-4)


def test_a_search_can_rank_trials_by_the_class_scores() -> None:
    """Tune trials report the class scores (the trial's loop is `ganray train`'s), so a search
    may name them; the lower-is-better default holds for per-class KID."""
    from ganray.orchestrator.tune.spec import check_search, parse_search, reported_eval_metrics

    reported = reported_eval_metrics(_digits())
    assert {"eval/class_acc", "eval/class_acc_min", "eval/kid_class_mean"} <= set(reported)
    spec = parse_search({"metric": "eval/class_acc_min", "space": {"schedule.d_lr": {"choice": [2e-4]}}})
    check_search(spec, _digits(eval={"every_kimg": 1}))
    assert spec.resolved_mode == "max" and parse_search({"metric": "eval/kid_class_mean"}).resolved_mode == "min"
    assert "eval/class_acc" not in reported_eval_metrics(small_config(data={"name": "digits"}))


# --- release and sampling ----------------------------------------------------------------------

MODEL = "conditional-gan"


def _keys(stdout: str) -> dict[str, str]:
    return dict(line.partition("=")[::2] for line in stdout.splitlines())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny conditional digits run released as a model version, and a tiny unconditional run,
    both trained through the CLI."""
    from mlflow_server import template_db

    root = tmp_path_factory.mktemp("conditional")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = {}
    trees = {"cond": _tree(schedule={"total_kimg": 0.5, "sync_kimg": 0.25, "checkpoint_kimg": 1, "sample_kimg": 0.5},
                           eval={"every_kimg": 100, "num_samples": 200}, tracking={"model_name": MODEL}),
             "plain": small_tree(data={"size": 512}, schedule={"total_kimg": 0.5, "sync_kimg": 0.25,
                                                               "checkpoint_kimg": 1})}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, tree in trees.items():
            (root / f"{name}.yaml").write_text(yaml.safe_dump(tree))
            code, out, err = run_cli(["train", str(root / f"{name}.yaml"), "--tracking-uri", uri, "--no-progress"])
            assert code == 0, err
            runs[name] = _keys(out)["run_id"]
        yield {"root": root, "uri": uri, **runs}


def test_the_run_logged_conditional_scores(trained) -> None:
    from mlflow import MlflowClient

    metrics = MlflowClient(trained["uri"]).get_run(trained["cond"]).data.metrics
    for key in ("eval/class_acc", "eval/class_acc_min", "eval/class_acc/9", "eval/kid_class/0",
                "eval/kid_class_mean", "eval/class_acc_real", "eval/fid", "eval/confidence", "eval/near_copies"):
        assert key in metrics, key
    assert 0.0 <= metrics["eval/class_acc_min"] <= metrics["eval/class_acc"] <= 1.0
    assert metrics["eval/class_acc_real"] > 0.9  # the independent classifier reads real digits
    # The run's sample grid: one row of 8 per class, 10 rows, scaled up like every small grid.
    client = MlflowClient(trained["uri"])
    grids = [a.path for a in client.list_artifacts(trained["cond"], "images")
             if a.path.startswith("images/samples+step+") and a.path.endswith(".png")]
    assert grids, "no sample grid was logged"
    from PIL import Image

    local = client.download_artifacts(trained["cond"], grids[-1], str(trained["root"]))
    assert Image.open(local).size == (4 * (8 * 9 + 1), 4 * (10 * 9 + 1))  # (width, height)


def test_released_model_takes_z_and_class_at_any_batch(trained) -> None:
    import mlflow
    import mlflow.pytorch

    from ganray.orchestrator.tracking.released_model import load_generator

    G, _ = load_generator(f"models:/{MODEL}/1", trained["uri"])
    mlflow.set_tracking_uri(trained["uri"])
    try:
        exported = mlflow.pytorch.load_model(f"models:/{MODEL}/1")
    finally:
        mlflow.set_tracking_uri(None)
    for batch in (7, 10):
        z = torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(batch))
        y = torch.arange(batch) % 10
        with torch.no_grad():
            expected = G(z, y)
        out = exported(z, y)
        assert out.shape == (batch, 1, 8, 8) and torch.allclose(out, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(exported(z, y), exported(z, (y + 1) % 10))


def test_sample_class_and_class_grid_through_the_cli(trained, tmp_path: Path) -> None:
    source = ["--run", trained["cond"], "--tracking-uri", trained["uri"]]
    code, out, err = run_cli(["sample", *source, "--out", str(tmp_path / "three.npy"), "-n", "12", "--class", "3"])
    assert code == 0, err
    assert _keys(out)["shape"] == "12x1x8x8"
    three = np.load(tmp_path / "three.npy")
    code, out, err = run_cli(["sample", *source, "--out", str(tmp_path / "all.png"), "-n", "20", "--class", "all"])
    assert code == 0, err
    assert _keys(out)["shape"] == "20x1x8x8"  # 2 of each of the 10 classes, one grid row per class
    from PIL import Image

    width, height = Image.open(tmp_path / "all.png").size
    assert height > 4 * width  # 10 rows of 2
    code, _, _ = run_cli(["sample", *source, "--out", str(tmp_path / "all.npy"), "-n", "12", "--class", "all"])
    assert code == 0
    grid = np.load(tmp_path / "all.npy")
    # The same latent rows: class 3's rows of the grid are the class-3 samples, class 0's are not.
    assert grid.shape == (20, 1, 8, 8) and np.allclose(grid[6:8], three[6:8], atol=1e-6)
    assert not np.allclose(grid[0:2], three[0:2])


@pytest.mark.parametrize("run, klass, message", [
    ("cond", "10", "--class 10 is out of range: this model has 10 classes, 0..9"),
    ("cond", "three", "give a class number 0..9 or 'all'"),
    ("plain", "3", "this model is unconditional"),
])
def test_bad_class_is_one_line(trained, tmp_path: Path, run: str, klass: str, message: str) -> None:
    code, _, err = run_cli(["sample", "--run", trained[run], "--tracking-uri", trained["uri"],
                            "--out", str(tmp_path / "x.npy"), "--class", klass])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
