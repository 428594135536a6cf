"""Every data source: geometry, determinism, decoding, splits, schema errors, row-group reads."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ganray.models.errors import ConfigError, DataError
from ganray.workers.data import SampleSource, load_dataset, mixture_geometry
from ganray.workers.parquet_source import ParquetSource


def _cfg(**kw: object) -> dict:
    base = {"name": "grid25", "path": None, "size": 1000, "resolution": None, "channels": None,
            "column": None, "skip_corrupt": False, "test_fraction": 0.2}
    base.update(kw)
    return base


def _png_bytes(color: tuple[int, ...] | int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    import io
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ synthetic mixtures, digits


@pytest.mark.parametrize("name, n_modes, std", [("ring8", 8, 0.01), ("grid25", 25, 0.05)])
def test_mixture_geometry_and_labels(name: str, n_modes: int, std: float) -> None:
    src = load_dataset(_cfg(name=name, size=4000), seed=1)
    x = src.get(np.arange(len(src)))
    assert (len(src), src.sample_shape, src.kind, x.dtype) == (4000, (2,), "2d", torch.float32)
    modes, _ = mixture_geometry(name)
    dist = torch.cdist(x.double(), torch.from_numpy(modes))
    nearest = dist.argmin(1).numpy()
    assert np.array_equal(nearest, src.labels)  # every point sits at the mode it was drawn from
    assert float(dist.min(1).values.max()) < 6 * std
    assert len(np.unique(src.labels)) == n_modes
    assert abs(float(x[:, 0].std()) - float(modes[:, 0].std())) < 0.15 * float(modes[:, 0].std())


def test_mixture_is_deterministic_per_seed_and_test_split_is_independent() -> None:
    a = load_dataset(_cfg(name="ring8", size=1000), seed=3)
    b = load_dataset(_cfg(name="ring8", size=1000), seed=3)
    c = load_dataset(_cfg(name="ring8", size=1000), seed=4)
    idx = np.arange(1000)
    assert torch.equal(a.get(idx), b.get(idx)) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.get(idx), c.get(idx)) and a.fingerprint != c.fingerprint
    test = load_dataset(_cfg(name="ring8", size=1000), seed=3, split="test")
    assert len(test) == 2500  # max(2500, 1000 * 0.2)
    assert not torch.equal(test.get(idx), a.get(idx)) and test.fingerprint != a.fingerprint
    big = load_dataset(_cfg(name="ring8", size=20000, test_fraction=0.25), seed=3, split="test")
    assert len(big) == 5000


def test_digits_shapes_range_and_fixed_split() -> None:
    train = load_dataset(_cfg(name="digits"), seed=0)
    test = load_dataset(_cfg(name="digits"), seed=0, split="test")
    other_seed = load_dataset(_cfg(name="digits"), seed=99)
    assert (len(train), len(test)) == (1437, 360)
    assert train.sample_shape == (1, 8, 8) and train.kind == "image"
    x = train.get(np.arange(len(train)))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(x, other_seed.get(np.arange(len(train))))
    assert train.fingerprint == other_seed.fingerprint != test.fingerprint
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # the two splits are disjoint: no test image also appears in train
    flat_train = {row.tobytes() for row in x.reshape(len(train), -1).numpy()}
    flat_test = [row.tobytes() for row in test.get(np.arange(len(test))).reshape(len(test), -1).numpy()]
    assert sum(row in flat_train for row in flat_test) < 5  # digits has a few exact duplicates


# ------------------------------------------------------------------ imagefolder


def _image_folder(root: Path, per_class: int = 6) -> dict[str, tuple[int, int, int]]:
    colors = {}
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            color = (255, 0, 40 * i + c)
            (root / cls / f"{i:02d}.png").write_bytes(_png_bytes(color))
            colors[f"{cls}/{i:02d}.png"] = color
    return colors


def _read_all(src: SampleSource) -> torch.Tensor:
    return src.get(np.arange(len(src)))


def test_imagefolder_decodes_resizes_and_splits(tmp_path: Path) -> None:
    colors = _image_folder(tmp_path)
    cfg = _cfg(name="imagefolder", path=str(tmp_path), resolution=8)
    train, test = load_dataset(cfg, seed=0), load_dataset(cfg, seed=5, split="test")
    assert (len(train), len(test)) == (10, 2)
    assert train.sample_shape == (3, 8, 8) and train.kind == "image" and train.skipped == 0
    x = _read_all(train)
    assert x.shape == (10, 3, 8, 8)
    expected = torch.tensor([colors[str(p.relative_to(tmp_path).as_posix())] for p in train.files])
    assert torch.allclose(x[:, :, 4, 4], expected / 127.5 - 1, atol=1e-6)
    assert sorted(set(train.labels.tolist())) == [0, 1]
    assert not set(train.files) & set(test.files)
    assert train.fingerprint == load_dataset(cfg, seed=1).fingerprint != test.fingerprint
    gray = load_dataset({**cfg, "channels": 1}, seed=0)
    assert gray.sample_shape == (1, 8, 8) and _read_all(gray).shape == (10, 1, 8, 8)
    with pytest.raises(ConfigError, match="data.resolution"):
        load_dataset({**cfg, "resolution": None}, seed=0)


def test_imagefolder_corrupt_file_fails_or_is_skipped(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    bad = tmp_path / "dog" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cfg = _cfg(name="imagefolder", path=str(tmp_path), resolution=8)
    with pytest.raises(DataError, match=r"zz_bad\.png.*skip_corrupt"):
        for split in ("train", "test"):
            _read_all(load_dataset(cfg, seed=0, split=split))
    train = load_dataset({**cfg, "skip_corrupt": True}, seed=0)
    test = load_dataset({**cfg, "skip_corrupt": True}, seed=0, split="test")
    assert train.skipped == 1 == test.skipped
    assert len(train) + len(test) == 12
    assert _read_all(train).shape == (len(train), 3, 8, 8)


def test_imagefolder_truncated_image(tmp_path: Path) -> None:
    _image_folder(tmp_path, per_class=3)
    data = (tmp_path / "cat" / "01.png").read_bytes()
    (tmp_path / "cat" / "01.png").write_bytes(data[: len(data) // 2])
    cfg = _cfg(name="imagefolder", path=str(tmp_path), resolution=8)
    with pytest.raises(DataError, match=r"cat/01\.png.*truncated|cat/01\.png.*cannot identify"):
        for split in ("train", "test"):
            _read_all(load_dataset(cfg, seed=0, split=split))
    skipping = load_dataset({**cfg, "skip_corrupt": True}, seed=0)
    assert skipping.skipped == 1
    assert all(p.name != "01.png" or p.parent.name != "cat" for p in skipping.files)


def test_imagefolder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(_cfg(name="imagefolder", path=str(tmp_path / "nope"), resolution=8), seed=0)
    with pytest.raises(DataError, match="no image files"):
        load_dataset(_cfg(name="imagefolder", path=str(tmp_path), resolution=8), seed=0)
    with pytest.raises(ConfigError, match="data.path is required"):
        load_dataset(_cfg(name="imagefolder", resolution=8), seed=0)


# ------------------------------------------------------------------ parquet


def test_parquet_encoded_images_across_row_groups(tmp_path: Path) -> None:
    shades = [i * 20 for i in range(10)]
    table = pa.table({"id": list(range(10)), "img": [_png_bytes(s, (16, 16), "L") for s in shades]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=3)
    cfg = _cfg(name="parquet", path=str(tmp_path / "part.parquet"), column="img", resolution=8,
               channels=1, test_fraction=0.5)
    train, test = load_dataset(cfg, seed=0), load_dataset(cfg, seed=0, split="test")
    assert train.row_groups == [(0, 2), (2, 2), (4, 2), (6, 1)]  # groups of 3,3,3,1 rows, every 2nd row held out
    assert test.row_groups == [(0, 1), (1, 1), (2, 1)]
    assert train.sample_shape == (1, 8, 8) and train.kind == "image"
    x = train.get(np.array([6, 0, 3, 5]))  # rows 9, 0, 5, 8: row groups 3, 0, 1, 2 in one call
    assert x.shape == (4, 1, 8, 8)
    expected = torch.tensor([9 * 20, 0, 5 * 20, 8 * 20], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(x[:, 0, 0, 0], expected, atol=1e-6)
    seen = sorted(round((v + 1) * 127.5) for v in
                  torch.cat([_read_all(train), _read_all(test)])[:, 0, 0, 0].tolist())
    assert seen == shades  # the splits partition the rows


def test_parquet_array_columns_and_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = rng.standard_normal((20, 2)).astype(np.float32)
    (tmp_path / "pts").mkdir()
    for part in range(2):  # a directory of two files, 2 row groups each
        rows = points[part * 10:(part + 1) * 10]
        pq.write_table(pa.table({"xy": pa.array(list(rows), type=pa.list_(pa.float32()))}),
                       tmp_path / "pts" / f"{part}.parquet", row_group_size=5)
    cfg = _cfg(name="parquet", path=str(tmp_path / "pts"), column="xy", test_fraction=0.2)
    src = load_dataset(cfg, seed=0)
    assert (len(src), src.sample_shape, src.kind) == (16, (2,), "2d")
    assert len(src.row_groups) == 4
    train_rows = np.array([r for r in range(20) if r % 5 != 4])
    assert np.allclose(_read_all(src).numpy(), points[train_rows])
    assert np.allclose(load_dataset(cfg, seed=0, split="test").get(np.arange(4)).numpy(), points[4::5])

    images = rng.uniform(-1, 1, (6, 3 * 8 * 8)).astype(np.float32)
    pq.write_table(pa.table({"a": pa.FixedSizeListArray.from_arrays(images.ravel(), 192)}),
                   tmp_path / "img.parquet", row_group_size=2)
    src = ParquetSource(str(tmp_path / "img.parquet"), None, 8, None, "train", 0.5, cache_groups=1)
    assert src.sample_shape == (3, 8, 8) and len(src) == 3
    assert np.allclose(src.get(np.array([2, 0, 1])).numpy(), images[[4, 0, 2]].reshape(3, 3, 8, 8))


def test_parquet_wrong_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"label": [1, 2, 3], "name": ["a", "b", "c"]}), path)
    with pytest.raises(DataError, match=r"'img' is not in .*label: int64"):
        load_dataset(_cfg(name="parquet", path=str(path), column="img", resolution=8), seed=0)
    with pytest.raises(DataError, match=r"'label' .* has type int64"):
        load_dataset(_cfg(name="parquet", path=str(path), column="label", resolution=8), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(_cfg(name="parquet", path=str(tmp_path / "missing.parquet"), column="x"), seed=0)
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0]] * 2)}), ragged)
    src = load_dataset(_cfg(name="parquet", path=str(ragged), column="v", test_fraction=0.5), seed=0)
    with pytest.raises(DataError, match="same length"):
        _read_all(src)


def test_parquet_folder_without_parquet_files_says_so(tmp_path: Path) -> None:
    fix = "point data.path at a Parquet file or a folder of them"
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "csv"
    (other / "sub").mkdir(parents=True)
    (other / "a.csv").write_text("x,y\n1,2\n")
    (other / "sub" / "b.txt").write_text("hello")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0]] * 4)}), hidden / "_part.parquet")
    cases = {empty: "(it is empty)", other: "(it holds a.csv, sub/b.txt)",
             hidden: "names starting with . or _ are skipped"}
    for folder, detail in cases.items():
        for column in ("v", None):  # the folder is checked before any column
            with pytest.raises(DataError) as err:
                load_dataset(_cfg(name="parquet", path=str(folder), column=column), seed=0)
            message = str(err.value)
            assert f"data.path '{folder}' is a folder with no *.parquet files" in message, message
            assert detail in message and message.endswith(fix) and "\n" not in message, message
    # A folder of Parquet files without the suffix still reads (the check only explains failures).
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0]] * 4)}), plain / "part-0000")
    assert len(load_dataset(_cfg(name="parquet", path=str(plain), column="v", test_fraction=0.5), seed=0)) == 2


# ------------------------------------------------------------------ torchvision, loaders, names


def test_torchvision_missing_root_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="never downloads"):
        load_dataset(_cfg(name="torchvision:MNIST", path=str(tmp_path / "absent")), seed=0)
    with pytest.raises(DataError, match="not at data.path"):
        load_dataset(_cfg(name="torchvision:MNIST", path=str(tmp_path)), seed=0)
    with pytest.raises(ConfigError, match="no dataset 'NotADataset'"):
        load_dataset(_cfg(name="torchvision:NotADataset", path=str(tmp_path)), seed=0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = np.arange(6)[:, None, None] * 40 + 50  # a bright centre square
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:n])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    src = load_dataset(_cfg(name="torchvision:MNIST", path=str(tmp_path)), seed=0)
    assert (len(src), src.sample_shape) == (6, (1, 28, 28))
    x = src.get(np.array([5, 1]))
    assert torch.allclose(x[:, 0, 14, 14], torch.tensor([250.0, 90.0]) / 127.5 - 1)
    assert float(x[0, 0, 0, 0]) == -1.0
    assert src.labels.tolist() == list(range(6))
    resized = load_dataset(_cfg(name="torchvision:MNIST", path=str(tmp_path), resolution=16, channels=3),
                           seed=0, split="test")
    assert (len(resized), resized.get(np.arange(4)).shape) == (4, (4, 3, 16, 16))


def test_import_path_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_loaders.py").write_text(
        "import numpy as np, torch\n"
        "def points(cfg, seed, split):\n"
        "    n = 30 if split == 'train' else 10\n"
        "    return np.random.default_rng(seed).normal(size=(n, 2))\n"
        "def images(cfg, seed, split):\n"
        "    return torch.zeros(5, 1, 8, 8)\n"
        "def nothing(cfg, seed, split):\n"
        "    return 'oops'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pts = load_dataset(_cfg(name="my_loaders:points"), seed=2)
    assert (len(pts), pts.kind, pts.sample_shape) == (30, "2d", (2,))
    assert np.allclose(pts.get(np.arange(30)).numpy(), np.random.default_rng(2).normal(size=(30, 2)), atol=1e-6)
    assert len(load_dataset(_cfg(name="my_loaders:points"), seed=2, split="test")) == 10
    imgs = load_dataset(_cfg(name="my_loaders:images"), seed=0)
    assert (imgs.kind, imgs.sample_shape) == ("image", (1, 8, 8))
    with pytest.raises(DataError, match="returned a str"):
        load_dataset(_cfg(name="my_loaders:nothing"), seed=0)
    with pytest.raises(ConfigError, match="cannot import"):
        load_dataset(_cfg(name="no_such_module_xyz:load"), seed=0)
    sys.modules.pop("my_loaders", None)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'ring8'.*grid25, digits, imagefolder, parquet"):
        load_dataset(_cfg(name="ring9"), seed=0)
