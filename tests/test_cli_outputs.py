"""What the README promises `ganray sample`, `ganray evaluate` and `make demo` print and write,
run to success through the CLI entry (`ganray.orchestrator.cli.main`).

Two tiny local runs are trained once per module: a 2D grid25 run registered as a model version
(then made champion with `ganray promote`), and a digits run for the image outputs. Each source
(`--run`, `models:/NAME/1`, `models:/NAME@champion`) must give the same samples and the same
scores, and the scores must equal the ones the run logged for its final evaluation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import REPO, small_tree, run_cli
from mlflow_server import template_db

MODEL = "cli-outputs-gan"
GRID_TREE = small_tree(data={"size": 2048}, tracking={"model_name": MODEL},
                       schedule={"total_kimg": 2, "sync_kimg": 0.5, "checkpoint_kimg": 1, "sample_kimg": 1000},
                       eval={"every_kimg": 1000, "num_samples": 300})
DIGITS_TREE = small_tree(data={"name": "digits"},
                         model={"generator": "dcgan", "discriminator": "dcgan", "z_dim": 8, "base_width": 8,
                                "batchnorm": False},
                         schedule={"total_kimg": 1, "sync_kimg": 0.5, "checkpoint_kimg": 1, "sample_kimg": 1000},
                         eval={"every_kimg": 1000, "num_samples": 200})
DIGITS_TREE["model"] = {k: v for k, v in DIGITS_TREE["model"].items() if k not in ("hidden", "depth")}


def _keys(stdout: str) -> dict[str, str]:
    """The `key=value` lines of a command's stdout, in order; any other line fails the test."""
    pairs = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        assert sep and key and key not in pairs, f"not a fresh key=value line: {line!r} in {stdout!r}"
        pairs[key] = value
    return pairs


def _train(root: Path, name: str, tree: dict[str, Any], uri: str) -> str:
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    code, out, err = run_cli(["train", str(config), "--tracking-uri", uri, "--no-progress"])
    assert code == 0, err
    return _keys(out)["run_id"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("cli-outputs")
    shutil.copyfile(template_db(tmp_path_factory.getbasetemp()), root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the embedded store's artifacts go to <cwd>/mlartifacts
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        grid = _train(root, "grid", GRID_TREE, uri)
        digits = _train(root, "digits", DIGITS_TREE, uri)
        code, out, err = run_cli(["promote", MODEL, "1", "--reason", "test", "--tracking-uri", uri])
        assert code == 0, err
        promoted = _keys(out)
        assert (promoted["model"], promoted["champion"], promoted["previous"]) == (MODEL, "1", "none")
        client = MlflowClient(uri)
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        yield {"root": root, "uri": uri, "client": client, "grid": grid, "digits": digits}


GRID_SOURCES = (("--run", "grid"), ("--model", f"models:/{MODEL}/1"), ("--model", f"models:/{MODEL}@champion"))


def _source(store: dict[str, Any], flag: str, value: str) -> list[str]:
    return [flag, store[value] if flag == "--run" else value, "--tracking-uri", store["uri"]]


def _sample(store: dict[str, Any], source: list[str], out: Path, *extra: str) -> dict[str, str]:
    code, stdout, err = run_cli(["sample", *source, "--out", str(out), *extra])
    assert code == 0, err
    printed = _keys(stdout)
    assert list(printed) == ["out", "shape"], stdout
    assert printed["out"] == str(out) and out.is_file()
    assert not list(out.parent.glob("*.part*")), "a temporary file was left beside the output"
    return printed


def test_sample_npy_is_the_same_for_a_run_a_version_and_the_champion(store, tmp_path: Path) -> None:
    arrays = []
    for index, (flag, value) in enumerate(GRID_SOURCES):
        out = tmp_path / f"grid{index}.npy"
        printed = _sample(store, _source(store, flag, value), out, "-n", "300")
        array = np.load(out)
        assert printed["shape"] == "300x2"
        assert array.shape == (300, 2) and array.dtype == np.float32
        assert np.isfinite(array).all()
        arrays.append(array)
    assert np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[0], arrays[2])
    assert np.unique(arrays[0], axis=0).shape[0] == 300  # 300 distinct latents, 300 distinct points
    _sample(store, _source(store, "--run", "grid"), tmp_path / "seed1.npy", "-n", "300", "--seed", "1")
    assert not np.array_equal(np.load(tmp_path / "seed1.npy"), arrays[0]), "--seed was ignored"


def test_sample_png_of_2d_data_is_a_scatter_plot(store, tmp_path: Path) -> None:
    out = tmp_path / "scatter.png"
    printed = _sample(store, _source(store, "--model", f"models:/{MODEL}@champion"), out, "-n", "200")
    assert printed["shape"] == "200x2"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (400, 400)  # a 4x4 in figure at 100 dpi
        image.verify()


def test_sample_of_images_npy_in_range_and_png_grid(store, tmp_path: Path) -> None:
    npy, png = tmp_path / "digits.npy", tmp_path / "digits.png"
    printed = _sample(store, _source(store, "--run", "digits"), npy, "-n", "20")
    array = np.load(npy)
    assert printed["shape"] == "20x1x8x8" and array.shape == (20, 1, 8, 8)
    assert array.min() >= -1.0 and array.max() <= 1.0  # the generator ends in tanh
    assert array.std() > 0.0
    _sample(store, _source(store, "--run", "digits"), png, "-n", "20")
    from torchvision.io import decode_png, read_file

    grid = decode_png(read_file(str(png)))
    # save_image: 8 per row, 2-pixel padding around each 8x8 image: 3 rows of (8 + 2) plus 2.
    assert tuple(grid.shape) == (3, 3 * 10 + 2, 8 * 10 + 2)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (82, 32)


def _logged_eval(store: dict[str, Any], run_key: str) -> dict[str, float]:
    metrics = store["client"].get_run(store[run_key]).data.metrics
    return {key.removeprefix("eval/"): value for key, value in metrics.items() if key.startswith("eval/")}


def test_evaluate_prints_the_2d_figures_the_run_logged(store) -> None:
    logged = _logged_eval(store, "grid")
    for flag, value in GRID_SOURCES:
        code, stdout, err = run_cli(["evaluate", *_source(store, flag, value)])
        assert code == 0, err
        printed = _keys(stdout)
        assert list(printed) == ["modes", "hq", "kl"], stdout
        scores = {key: float(text) for key, text in printed.items()}
        assert float(printed["modes"]).is_integer()
        for key, score in scores.items():  # same G_ema, same eval seed and size as the final eval
            assert score == pytest.approx(logged[key], rel=1e-5, abs=1e-6), (key, flag, value)


def test_evaluate_prints_the_image_figures_the_run_logged(store) -> None:
    logged = _logged_eval(store, "digits")
    code, stdout, err = run_cli(["evaluate", *_source(store, "--run", "digits")])
    assert code == 0, err
    printed = {key: float(text) for key, text in _keys(stdout).items()}
    assert set(printed) == {"fid", "kid", "kid_std", "fid_floor", "kid_floor", "classifier_acc", "confidence",
                            "class_share_min", "near_copies", "confidence_real"}, stdout
    for key, score in printed.items():
        assert score == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    assert printed["fid"] > printed["fid_floor"]  # a 1-kimg generator is far from the real split


def test_evaluate_draws_num_samples(store) -> None:
    # The 2D protocol draws --num-samples samples: the high-quality fraction is a count over 97
    # (the run logged one over 300; 0 < hq < 1 there, so no fraction of 97 equals it).
    logged_2d = _logged_eval(store, "grid")
    assert 0 < logged_2d["hq"] < 1
    assert logged_2d["hq"] * 300 == pytest.approx(round(logged_2d["hq"] * 300), abs=1e-6)
    code, stdout, err = run_cli(["evaluate", *_source(store, "--run", "grid"), "--num-samples", "97"])
    assert code == 0, err
    fewer = {k: float(v) for k, v in _keys(stdout).items()}
    assert set(fewer) == {"modes", "hq", "kl"}
    assert fewer["hq"] * 97 == pytest.approx(round(fewer["hq"] * 97), abs=1e-3), fewer
    assert fewer["hq"] != pytest.approx(logged_2d["hq"], abs=1e-6), (fewer, logged_2d)


# ---------------------------------------------------------------------------------------------
# `make demo`: python -m ganray.orchestrator.demo configs/grid25.yaml, here on a tiny budget


def test_demo_trains_and_says_where_the_results_are(ray_session, tmp_path: Path, monkeypatch, capsys) -> None:
    from mlflow import MlflowClient

    from ganray.orchestrator import demo

    shutil.copyfile(template_db(tmp_path.parent), tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = demo.main([str(REPO / "configs/grid25.yaml"), "--no-progress",
                      "--set", "schedule.total_kimg=1", "--set", "schedule.sync_kimg=0.5",
                      "--set", "data.size=2048", "--set", "eval.num_samples=200"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = _keys("\n".join(line for line in out.splitlines() if line.startswith("run_id=")))["run_id"]
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["schedule.total_kimg"] in ("1", "1.0")
    assert f"--backend-store-uri {uri} " in out
    assert "open http://127.0.0.1:5000" in out
    assert f"ganray sample --run {run_id} " in out
