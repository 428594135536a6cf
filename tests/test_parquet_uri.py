"""The Parquet reader through URIs: file:// and s3:// served by a real S3-compatible server.

The same dataset (three files, eight row groups, a `_SUCCESS` marker, one file in a nested
folder) is written locally and uploaded to a `moto_server` on 127.0.0.1 (tests/s3_server.py);
ganray's reader must list it, read it by row group and give the same arrays through a local path,
a file:// URI and an s3:// URI (endpoint from AWS_ENDPOINT_URL or from the URI query). A missing
object, prefix or bucket is one DataError line naming the URI and what to check, and exit 2 from
`ganray train`; a URI carrying credentials is refused before anything can log it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ganray.models.errors import ConfigError, DataError
from ganray.workers.data import check_data_config, load_dataset
from ganray.workers.parquet_source import ParquetSource
from helpers import small_tree, run_cli
from s3_server import S3Server, s3_server  # noqa: F401

BUCKET = "ganray-data"
# (key under the dataset prefix, first row, rows); 4 rows per row group.
FILES = (("a.parquet", 0, 12), ("b.parquet", 12, 10), ("more/c.parquet", 22, 8))
ROWS = 30
# test_fraction 0.25 holds out every 4th row of each row group: groups of 4, 4, 4 | 4, 4, 2 | 4, 4 rows.
TRAIN_GROUPS = [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 2), (17, 3), (20, 3)]
TEST_ROWS = [3, 7, 11, 15, 19, 25, 29]  # b's last group (rows 20-21) has no 4th row


def _cfg(path: str, **kw: object) -> dict:
    base = {"name": "parquet", "path": path, "size": 1000, "resolution": None, "channels": None,
            "column": "xy", "skip_corrupt": False, "test_fraction": 0.25}
    base.update(kw)
    return base


def _all(src: ParquetSource) -> torch.Tensor:
    return src.get(np.arange(len(src)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[SimpleNamespace]:
    """The dataset on disk and in the bucket; the module's tests run with the server's AWS env."""
    import boto3

    root = tmp_path_factory.mktemp("parquet-uri")
    points = np.random.default_rng(7).standard_normal((ROWS, 2)).astype(np.float32)
    local = root / "pts"
    for name, first, rows in FILES:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"id": np.arange(first, first + rows),
                          "xy": pa.array(list(points[first:first + rows]), type=pa.list_(pa.float32()))})
        pq.write_table(table, local / name, row_group_size=4)
    (local / "_SUCCESS").write_bytes(b"")  # as Spark leaves it: the listing must skip it
    (root / "csv").mkdir()
    (root / "csv" / "a.csv").write_text("x,y\n1,2\n")

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env(root).items():
            mp.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for path in [*local.rglob("*"), root / "csv" / "a.csv"]:
            if path.is_file():
                s3.put_object(Bucket=BUCKET, Key=path.relative_to(root).as_posix(), Body=path.read_bytes())
        yield SimpleNamespace(root=root, local=local, points=points, server=s3_server)


def _expected_train(points: np.ndarray) -> np.ndarray:
    return points[[r for r in range(ROWS) if r not in TEST_ROWS]]


# ------------------------------------------------------------------ file://


def test_file_uri_reads_as_the_plain_path(dataset: SimpleNamespace) -> None:
    plain = load_dataset(_cfg(str(dataset.local)), seed=0)
    uri = load_dataset(_cfg(dataset.local.as_uri()), seed=0)
    files = [str(dataset.local / name) for name, _, _ in FILES]
    assert plain.files == uri.files == files  # recursive listing, _SUCCESS skipped
    assert plain.row_groups == uri.row_groups == TRAIN_GROUPS
    assert torch.equal(_all(uri), torch.from_numpy(_expected_train(dataset.points)))
    assert torch.equal(_all(uri), _all(plain)) and uri.fingerprint == plain.fingerprint
    test = load_dataset(_cfg(dataset.local.as_uri()), seed=0, split="test")
    assert torch.equal(_all(test), torch.from_numpy(dataset.points[TEST_ROWS]))

    one = load_dataset(_cfg((dataset.local / "b.parquet").as_uri()), seed=0)
    assert one.files == [str(dataset.local / "b.parquet")] and one.row_groups == [(0, 3), (3, 3), (6, 2)]
    assert torch.equal(_all(one), torch.from_numpy(dataset.points[[12, 13, 14, 16, 17, 18, 20, 21]]))

    missing = (dataset.local / "nope.parquet").as_uri()
    with pytest.raises(DataError, match=f"data.path '{missing}' does not exist"):
        load_dataset(_cfg(missing), seed=0)


# ------------------------------------------------------------------ s3:// on moto


@pytest.mark.parametrize("form", ["env", "query"])
def test_s3_uri_lists_and_reads_by_row_group(dataset: SimpleNamespace, form: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{BUCKET}/pts"
    if form == "query":  # the endpoint only in the URI: nothing in the environment points at moto
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        uri += f"?endpoint_override=127.0.0.1:{dataset.server.port}&scheme=http"
    src = load_dataset(_cfg(uri), seed=0)
    local = load_dataset(_cfg(str(dataset.local)), seed=0)
    assert src.files == [f"{BUCKET}/pts/{name}" for name, _, _ in FILES]
    assert src.row_groups == local.row_groups == TRAIN_GROUPS
    assert (len(src), src.sample_shape, src.kind) == (23, (2,), "2d")
    assert torch.equal(_all(src), _all(local))
    assert torch.equal(_all(load_dataset(_cfg(uri), seed=0, split="test")),
                       torch.from_numpy(dataset.points[TEST_ROWS]))

    # One row group at a time: with a one-group cache, a read of rows in group 4 (b's second)
    # decodes that group alone; one call spanning groups returns rows in the order asked.
    reader = ParquetSource(uri, "xy", None, None, "train", 0.25, cache_groups=1)
    assert torch.equal(reader.get(np.array([13])), torch.from_numpy(dataset.points[[17]]))
    assert list(reader._cache) == [4]
    picked = np.array([22, 0, 15, 9, 16])  # rows 28, 0, 20, 12, 21: groups 7, 0, 5, 3, 5
    assert torch.equal(reader.get(picked), torch.from_numpy(dataset.points[[28, 0, 20, 12, 21]]))

    one = load_dataset(_cfg(uri.replace("/pts", "/pts/b.parquet")), seed=0)
    assert one.files == [f"{BUCKET}/pts/b.parquet"] and one.row_groups == [(0, 3), (3, 3), (6, 2)]
    assert torch.equal(_all(one), torch.from_numpy(dataset.points[[12, 13, 14, 16, 17, 18, 20, 21]]))


def test_s3_missing_object_prefix_or_bucket_is_one_line(dataset: SimpleNamespace) -> None:
    for uri in (f"s3://{BUCKET}/pts/nope.parquet", f"s3://{BUCKET}/nothing/here", "s3://no-such-bucket/pts"):
        with pytest.raises(DataError) as err:
            load_dataset(_cfg(uri), seed=0)
        message = str(err.value)
        assert message.startswith(f"data.path '{uri}' does not exist (no object or prefix "), message
        assert "check the bucket and key" in message and "AWS_ENDPOINT_URL" in message, message
        assert "\n" not in message
    with pytest.raises(DataError, match=r"is a folder with no \*.parquet files \(it holds a.csv\)"):
        load_dataset(_cfg(f"s3://{BUCKET}/csv"), seed=0)


def test_unopenable_uri_is_one_line() -> None:
    # No network: a closed local port, and a query key pyarrow rejects before connecting.
    for uri, detail in (("hdfs://127.0.0.1:1/data", ""), (f"s3://{BUCKET}/pts?bogus=1", "'bogus'")):
        with pytest.raises(DataError) as err:
            load_dataset(_cfg(uri), seed=0)
        message = str(err.value)
        assert message.startswith(f"cannot open data.path '{uri}' (") and detail in message, message
        assert "\n" not in message, message


@pytest.mark.parametrize("uri, found", [
    (f"s3://AKIDEXAMPLE:wJalrSECRETKEY@{BUCKET}/pts", "user:password@"),
    ("abfs://account:wJalrSECRETKEY@container/pts", "user:password@"),
    ("abfs://account@container/pts?tenant_id=t&client_id=c&client_secret=wJalrSECRETKEY", "client_secret"),
])
def test_uri_with_credentials_is_refused_without_echoing_them(uri: str, found: str) -> None:
    for check in (lambda: check_data_config(_cfg(uri)), lambda: load_dataset(_cfg(uri), seed=0)):
        with pytest.raises(ConfigError) as err:
            check()
        message = str(err.value)
        assert f"carries credentials ({found})" in message and "AWS_ACCESS_KEY_ID" in message, message
        assert "SECRETKEY" not in message and "AKIDEXAMPLE" not in message, message


# ------------------------------------------------------------------ the CLI


def test_cli_reads_s3_and_refuses_a_missing_prefix(dataset: SimpleNamespace, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing the CLI writes lands in the repository
    job = tmp_path / "job.yaml"

    def write(path: str) -> str:
        tree = small_tree(data={"name": "parquet", "path": path, "column": "xy", "test_fraction": 0.25},
                          schedule={"batch_size": 8}, tracking={"enabled": False})
        job.write_text(yaml.safe_dump(tree))
        return str(job)

    code, out, err = run_cli(["train", write(f"s3://{BUCKET}/pts"), "--dry-run"])
    assert code == 0, err
    assert "data_size=23" in out.splitlines() and "sample_shape=2" in out.splitlines(), out

    uri = f"s3://{BUCKET}/nothing"
    code, out, err = run_cli(["train", write(uri), "--no-progress"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: data.path '{uri}' does not exist"), err

    code, out, err = run_cli(["validate", write(f"s3://AKIDEXAMPLE:wJalrSECRETKEY@{BUCKET}/pts")])
    assert code == 2 and "carries credentials" in err and err.count("\n") == 1, err
    assert "SECRETKEY" not in out + err


def test_secret_query_values_never_reach_mlflow_text() -> None:
    # `ganray tune` and `retrain` log the config before any reader refuses its data.path: every
    # param, tag and logged config goes through scrub.
    from ganray.orchestrator.tracking.store import param_value, scrub

    text = "data.path: abfs://c/p?client_secret=S3CR3T&x=1 s3://b/k?endpoint_override=h:9&X-Amz-Signature=SIG&sig=SIG2"
    assert scrub(text) == ("data.path: abfs://c/p?client_secret=***&x=1 "
                           "s3://b/k?endpoint_override=h:9&X-Amz-Signature=***&sig=***")
    assert param_value({"path": "s3://b/k?token=T0K"}) == '{"path": "s3://b/k?token=***"}'
