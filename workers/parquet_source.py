"""Parquet reader: a pyarrow dataset read one row group at a time, so it can exceed memory.

`data.column` holds either encoded images (a binary column of PNG/JPEG bytes, decoded with PIL
to `data.resolution` / `data.channels` and scaled to [-1, 1]) or fixed-length numeric arrays
(list / fixed_size_list, taken as they are and reshaped to (C, R, R), or kept as flat vectors
when `data.resolution` is absent). A global index maps to (row group, row) through the row-group
metadata; decoded row groups sit in a small LRU cache. `row_groups` lists (start, length) per row
group in this split's index space, so a coordinator can shard by row group.

`data.label_column` (optional) names an integer column of class labels, read once for the split
(one int64 per row) for conditional training; the images themselves stay on disk until `get`.

The test split holds out every k-th row of each row group (k = round(1 / data.test_fraction),
at least 2): deterministic, spread evenly over the files, and computable in closed form.

`data.path` is a local path or a URI pyarrow.fs opens (file://, s3://, gs://, abfs://, hdfs://);
a folder or prefix is listed recursively. Credentials come from the environment, as each store's
own tools expect: for s3:// the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, an instance or pod role), AWS_REGION, and AWS_ENDPOINT_URL for an
S3-compatible server (MinIO, Ceph). Ray workers read the data themselves, so the machines they run
on need the same environment. Options pyarrow reads from the URI query work too
(`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`). A URI that carries credentials
(`s3://KEY:SECRET@bucket`, a `client_secret=` or `token=` query) is refused with a ConfigError:
data.path is logged as an MLflow param and in the run's config.yaml, and echoed in errors.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from ganray.models.errors import ConfigError, DataError
from ganray.workers.uri_secrets import refuse_uri_credentials
from ganray.workers.data import (SampleSource, content_digest, decode_image, image_mode,
                                 kind_for_shape, uint8_to_unit)

DEFAULT_CACHE_GROUPS = 8
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_HIDDEN_PREFIXES = (".", "_")  # pyarrow's dataset discovery skips these names (_SUCCESS, _metadata)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_numeric_list(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return is_list and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))


def _first_line(exc: BaseException) -> str:
    """pyarrow's message without its continuation lines (hdfs lists every JVM path it tried)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open(path: str) -> tuple[pafs.FileSystem, str]:
    """Any URI pyarrow.fs understands (file://, s3://, gs://, hdfs://) or a local path."""
    refuse_uri_credentials(path)
    try:
        if "://" in path:
            fs, root = pafs.FileSystem.from_uri(path)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
        found = fs.get_file_info(root).type != pafs.FileType.NotFound
    except (ValueError, OSError, pa.ArrowException) as exc:  # Azure fails with a bare ArrowException
        raise DataError(f"cannot open data.path '{path}' ({_first_line(exc)}); give a local path or a URI "
                        "pyarrow.fs can open, with its credentials in the environment") from None
    if not found and "://" in path and not isinstance(fs, pafs.LocalFileSystem):
        raise DataError(f"data.path '{path}' does not exist (no object or prefix '{root}'); check the bucket and "
                        "key, and that the endpoint and credentials in this environment (e.g. AWS_ENDPOINT_URL, "
                        "AWS_PROFILE) are the ones that hold it")
    if not found:
        raise DataError(f"data.path '{path}' does not exist; point it at a Parquet file or a folder of them")
    return fs, root


def _no_parquet_files(fs: pafs.FileSystem, root: str, path: str) -> DataError | None:
    """The error for a folder without a `*.parquet` file pyarrow would read (None: a file, or it has one)."""
    try:
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return None
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException):
        return None
    files = sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    parquet = [f for f in files if f.lower().endswith(PARQUET_SUFFIXES)]
    if any(not any(part.startswith(_HIDDEN_PREFIXES) for part in f.split("/")) for f in parquet):
        return None
    if not files:
        held = " (it is empty)"
    else:
        shown = ", ".join(files[:5]) + (f", ... ({len(files)} files)" if len(files) > 5 else "")
        held = f" (it holds {shown}"
        held += "; names starting with . or _ are skipped)" if parquet else ")"
    return DataError(f"data.path '{path}' is a folder with no *.parquet files{held}; point data.path at a "
                     "Parquet file or a folder of them")


def _pick_column(schema: pa.Schema, column: str | None, path: str) -> str:
    usable = [f.name for f in schema if _is_binary(f.type) or _is_numeric_list(f.type)]
    found = ", ".join(f"{f.name}: {f.type}" for f in schema)
    if column is None:
        if len(usable) == 1:
            return usable[0]
        raise ConfigError(f"data.column is required for '{path}': set it to one of {usable or 'its columns'} "
                          f"(found {found})")
    if column not in schema.names:
        raise DataError(f"data.column '{column}' is not in '{path}' (found {found}); set data.column to one of them")
    t = schema.field(column).type
    if not (_is_binary(t) or _is_numeric_list(t)):
        raise DataError(f"data.column '{column}' in '{path}' has type {t}; expected binary (encoded PNG/JPEG) "
                        "or a list / fixed_size_list of numbers")
    return column


def _array_shape(width: int, resolution: int | None, channels: int | None, column: str) -> tuple[int, ...]:
    if not resolution:
        return (width,)
    side = int(resolution) * int(resolution)
    c = int(channels) if channels else (width // side if width % side == 0 else 0)
    if c < 1 or c * side != width:
        raise DataError(f"data.column '{column}' rows hold {width} values, which is not channels x {resolution} x "
                        f"{resolution}; fix data.resolution / data.channels, or drop data.resolution for flat vectors")
    return (c, int(resolution), int(resolution))


class ParquetSource(SampleSource):
    """Rows of one column of a Parquet dataset, read and decoded by row group on demand."""

    def __init__(self, path: str, column: str | None, resolution: int | None, channels: int | None,
                 split: str, test_fraction: float, cache_groups: int = DEFAULT_CACHE_GROUPS,
                 label_column: str | None = None) -> None:
        self.name = "parquet"
        self._path = path
        fs, root = _open(path)
        try:
            dataset = pads.dataset(root, filesystem=fs, format="parquet")
            fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
            for fragment in fragments:
                fragment.ensure_complete_metadata()  # reads only the footers
        except (ValueError, OSError, pa.ArrowException) as exc:
            # A folder of other files (CSV, images) fails here: say that, not pyarrow's footer error.
            raise _no_parquet_files(fs, root, path) or DataError(
                f"data.path '{path}' is not a readable Parquet dataset ({_first_line(exc)})") from None
        if not fragments:  # an empty folder, or one whose files pyarrow skips (names starting with . or _)
            raise _no_parquet_files(fs, root, path) or DataError(
                f"data.path '{path}' is a folder with no *.parquet files pyarrow reads (names starting with . or _ "
                "are skipped); point data.path at a Parquet file or a folder of them")
        self._column = _pick_column(dataset.schema, column, path)
        self._encoded = _is_binary(dataset.schema.field(self._column).type)
        # Every row group with rows, in file then row-group order: (fragment, row group id, rows).
        self._groups = [(f, rg.id, rg.num_rows) for f in fragments for rg in f.row_groups if rg.num_rows]
        if not self._groups:
            raise DataError(f"data.path '{path}' has no rows; check the path")

        self._test = split == "test"
        self._k = max(2, round(1.0 / test_fraction))
        counts = [rows // self._k if self._test else rows - rows // self._k for _, _, rows in self._groups]
        keep = [i for i, c in enumerate(counts) if c > 0]
        self._groups = [self._groups[i] for i in keep]
        counts = [counts[i] for i in keep]
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.row_groups: list[tuple[int, int]] = [(int(s), int(c)) for s, c in zip(self._starts, counts)]
        self._len = int(sum(counts))
        if not self._len:
            raise DataError(f"the {split} split of '{path}' is empty (each row group holds out every "
                            f"{self._k}-th row as test); add rows or raise data.test_fraction")

        if self._encoded:
            if not resolution:
                raise ConfigError(f"data.resolution is required for the encoded images in data.column "
                                  f"'{self._column}'; set one of 8, 16, 32, 64")
            self._resolution = int(resolution)
            self._mode = image_mode(channels)
            self.sample_shape: tuple[int, ...] = (len(self._mode), self._resolution, self._resolution)
        else:
            self._width = self._row_width(dataset.schema.field(self._column).type)
            self.sample_shape = _array_shape(self._width, resolution, channels, self._column)
        self.kind = kind_for_shape(self.sample_shape)

        # The files read, in the filesystem's own paths (a bucket/key for s3://): what the listing found.
        self.files: list[str] = sorted({f.path for f, _, _ in self._groups})
        stats = [(i.path, i.size, i.mtime_ns) for i in fs.get_file_info(self.files)]
        self.fingerprint = content_digest("parquet", split, self._k, self._column, self.sample_shape,
                                          getattr(self, "_mode", None), stats,
                                          *([label_column] if label_column else []))
        if label_column:
            self.labels = self._read_labels(dataset.schema, label_column)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_groups = max(1, int(cache_groups))

    def __len__(self) -> int:
        return self._len

    def _row_width(self, t: pa.DataType) -> int:
        if pa.types.is_fixed_size_list(t):
            return int(t.list_size)
        return int(len(self._read(0).slice(0, 1).flatten()))  # variable lists: the first row decides

    def _read(self, group: int) -> pa.Array:
        """The column of one whole row group (only that column, only that row group)."""
        fragment, rg_id, _ = self._groups[group]
        try:
            table = fragment.subset(row_group_ids=[rg_id]).to_table(columns=[self._column])
        except (ValueError, OSError, KeyError, pa.ArrowException) as exc:
            raise DataError(f"cannot read data.column '{self._column}' from '{fragment.path}' row group {rg_id} "
                            f"({_first_line(exc)}); every file must have the same schema") from None
        array = table.column(self._column).combine_chunks()
        if array.null_count:
            raise DataError(f"data.column '{self._column}' has null rows in '{fragment.path}' row group {rg_id}; "
                            "drop them from the dataset")
        return array

    def _read_labels(self, schema: pa.Schema, column: str) -> np.ndarray:
        """This split's int64 labels from `column`, in index order (every row group, its split's rows)."""
        if column not in schema.names:
            raise DataError(f"data.label_column '{column}' is not in '{self._path}' (found {', '.join(schema.names)}); "
                            "set it to the column of integer class labels")
        if not pa.types.is_integer(schema.field(column).type):
            raise DataError(f"data.label_column '{column}' in '{self._path}' has type {schema.field(column).type}; "
                            "it must hold integer class labels 0..model.num_classes-1")
        parts = []
        for (fragment, rg_id, _), (_, count) in zip(self._groups, self.row_groups):
            try:
                table = fragment.subset(row_group_ids=[rg_id]).to_table(columns=[column])
                array = table.column(column).combine_chunks()
            except (ValueError, OSError, KeyError, pa.ArrowException) as exc:
                raise DataError(f"cannot read data.label_column '{column}' from '{fragment.path}' row group {rg_id} "
                                f"({_first_line(exc)}); every file must have the same schema") from None
            if array.null_count:
                raise DataError(f"data.label_column '{column}' has null rows in '{fragment.path}' row group {rg_id}; "
                                "drop them or give them a class")
            parts.append(array.take(pa.array(self._rows(count))).to_numpy(zero_copy_only=False).astype(np.int64))
        return np.concatenate(parts)

    def _rows(self, count: int) -> np.ndarray:
        """Rows within a row group of split-local positions 0..count-1 (every k-th row is test)."""
        j = np.arange(count, dtype=np.int64)
        return j * self._k + (self._k - 1) if self._test else j + j // (self._k - 1)

    def _decode_group(self, group: int) -> torch.Tensor:
        fragment, rg_id, _ = self._groups[group]
        rows = self._rows(self.row_groups[group][1])
        taken = self._read(group).take(pa.array(rows))
        where = f"'{fragment.path}' row group {rg_id}"
        if self._encoded:
            out = np.empty((len(rows), *self.sample_shape), dtype=np.uint8)
            for k, (row, blob) in enumerate(zip(rows, taken.to_pylist())):
                out[k] = decode_image(blob, self._resolution, self._mode, f"in {where} row {row}",
                                      "fix or drop that row")
            return torch.from_numpy(out)  # uint8: a quarter of the float cache size
        lengths = pc.list_value_length(taken).to_numpy(zero_copy_only=False)
        if (lengths != self._width).any():
            raise DataError(f"data.column '{self._column}' rows in {where} do not all hold {self._width} values; "
                            "every row must have the same length")
        values = taken.flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(values.astype(np.float32).reshape(len(rows), *self.sample_shape))

    def _group(self, group: int) -> torch.Tensor:
        block = self._cache.get(group)
        if block is None:
            block = self._decode_group(group)
            self._cache[group] = block
            if len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(group)
        return block

    def get(self, indices: np.ndarray) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"index out of range for a parquet source of {self._len} rows")
        owner = np.searchsorted(self._starts, idx, side="right") - 1
        out = torch.empty((len(idx), *self.sample_shape), dtype=torch.float32)
        for group in np.unique(owner):
            where = np.nonzero(owner == group)[0]
            block = self._group(int(group)).index_select(0, torch.from_numpy(idx[where] - self._starts[group]))
            out[torch.from_numpy(where)] = uint8_to_unit(block) if self._encoded else block
        return out
