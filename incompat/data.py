"""ImageSet (the in-memory dataset) and the canonical Parquet format it is stored in.

Canonical file, one row per sample:
    sample_id  string   stable across reruns (derived from the source, never from a random draw)
    image      binary   raw uint8 pixels, row-major HWC (decoding JPEG/PNG once at ingest is the slow part;
                        raw bytes make every later read a memcpy)
    height, width, channels   int32
    label      int64
    digest     string   sha256 over (label as 8 little-endian bytes, height, width, channels, pixels)
Schema metadata: `incompat` = JSON {format_version, class_names, dataset_digest, ...extra}.
The dataset digest is sha256 over "sample_id\\tdigest\\n" in row order.

Memory: a dataset is decoded into one uint8 array. Before that array is allocated its size is compared with the
memory budget (memory_budget(): the INCOMPAT_MAX_DATASET_BYTES environment variable when set, otherwise the
memory the kernel reports available, cgroup limit included); a dataset over it is refused with DatasetTooLarge
instead of being decoded into swap or the OOM killer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from incompat.files import atomic_output

FORMAT_VERSION = 1
METADATA_KEY = b"incompat"
MAX_DATASET_BYTES_ENV = "INCOMPAT_MAX_DATASET_BYTES"
_REQUIRED_COLUMNS = ("sample_id", "image", "height", "width", "channels", "label", "digest")
_MAX_SIDE = 65_535  # PNG/JPEG cannot go beyond this either; a larger shape column is a forged file


class DataError(ValueError):
    """Bad input data. The message always names the file (and row/sample where there is one)."""


class DatasetTooLarge(DataError):
    """Decoding the dataset would need more memory than the budget allows (see memory_budget)."""


# ------------------------------------------------------------------------------------------------ memory budget

_SIZE_SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'1048576', '512M', '2G', '1.5GiB' -> bytes (powers of 1024). ValueError on anything else."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size in bytes (examples: 1073741824, 512M, 2G)")
    value = int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2)])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _available_memory() -> tuple[int, str] | None:
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            found.append((max(limit - usage, 0), f"the cgroup memory limit ({limit_file})"))
    return min(found) if found else None


def memory_budget() -> tuple[int | None, str]:
    """(bytes a decoded dataset may take, where that figure comes from); None when it cannot be known.

    INCOMPAT_MAX_DATASET_BYTES (e.g. 2G) wins when set; otherwise the kernel's MemAvailable (or what a cgroup
    memory limit leaves, when lower)."""
    raw = os.environ.get(MAX_DATASET_BYTES_ENV, "").strip()
    if raw:
        try:
            return parse_bytes(raw), f"{MAX_DATASET_BYTES_ENV}={raw}"
        except ValueError as exc:
            raise ValueError(f"environment variable {MAX_DATASET_BYTES_ENV}: {exc}") from None
    available = _available_memory()
    if available is None:
        return None, "unknown (no /proc/meminfo)"
    return available


def _human(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n_bytes < 1024 or unit == "PiB":
            return f"{n_bytes:,.0f} {unit}" if unit == "bytes" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def check_memory_budget(n_bytes: int, what: str, detail: str = "") -> None:
    """Raise DatasetTooLarge when holding `n_bytes` (decoded pixels of `what`) would exceed memory_budget()."""
    budget, source = memory_budget()
    if budget is None or n_bytes <= budget:
        return
    detail = f" ({detail})" if detail else ""
    raise DatasetTooLarge(
        f"{what}: decoding needs about {_human(n_bytes)}{detail} but only {_human(budget)} may be used "
        f"({source}); refusing before decoding. Use a machine with more memory, a smaller --image-size, or "
        f"raise the cap with {MAX_DATASET_BYTES_ENV}=<bytes>")


# ----------------------------------------------------------------------------------------------------- ImageSet

@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    sample_ids: np.ndarray  # (N,) object array of str
    class_names: list[str]
    extra_metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.sample_ids = np.asarray(self.sample_ids, dtype=object)
        self.class_names = [str(c) for c in self.class_names]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be a uint8 (N,H,W,C) array, got {self.images.dtype} {self.images.shape}")
        n = len(self.images)
        if len(self.labels) != n or len(self.sample_ids) != n:
            raise DataError(f"{n} images but {len(self.labels)} labels and {len(self.sample_ids)} sample ids")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            bad = int(np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))[0])
            raise DataError(
                f"sample {self.sample_ids[bad]!r} (row {bad}): label {int(self.labels[bad])} is outside "
                f"the {len(self.class_names)} classes"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        indices = np.asarray(indices)
        return ImageSet(
            self.images[indices], self.labels[indices], self.sample_ids[indices], list(self.class_names),
            dict(self.extra_metadata),
        )

    def sample_digests(self) -> np.ndarray:
        return np.array([sample_digest(img, int(lab)) for img, lab in zip(self.images, self.labels)], dtype=object)

    def dataset_digest(self) -> str:
        return dataset_digest(self.sample_ids, self.sample_digests())

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_classes)


def sample_digest(image: np.ndarray, label: int) -> str:
    h = hashlib.sha256()
    h.update(int(label).to_bytes(8, "little", signed=True))
    h.update(np.asarray(image.shape, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def dataset_digest(sample_ids: Iterable[str], digests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for sid, dig in zip(sample_ids, digests):
        h.update(f"{sid}\t{dig}\n".encode())
    return h.hexdigest()


def check_unique_ids(sample_ids: np.ndarray, source: str) -> None:
    uniq, counts = np.unique(sample_ids.astype(str), return_counts=True)
    if len(uniq) != len(sample_ids):
        dup = str(uniq[counts > 1][0])
        rows = np.flatnonzero(sample_ids.astype(str) == dup)[:3].tolist()
        raise DataError(f"{source}: sample_id {dup!r} appears more than once (rows {rows})")


def write_dataset(
    dataset: ImageSet,
    path: str | os.PathLike,
    extra_columns: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping | None = None,
) -> str:
    """Write the canonical Parquet file atomically; returns the dataset digest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_unique_ids(dataset.sample_ids, str(path))
    n, h, w, c = dataset.images.shape if len(dataset) else (0, 0, 0, 0)
    digests = dataset.sample_digests()
    ds_digest = dataset_digest(dataset.sample_ids, digests)
    size = h * w * c
    flat = np.ascontiguousarray(dataset.images).reshape(n * size)
    offsets = np.arange(n + 1, dtype=np.int64) * size
    # Built from buffers: one copy instead of 50k Python bytes objects.
    image_col = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    columns = {
        "sample_id": pa.array(dataset.sample_ids.astype(str).tolist(), type=pa.string()),
        "image": image_col,
        "height": pa.array(np.full(n, h, dtype=np.int32)),
        "width": pa.array(np.full(n, w, dtype=np.int32)),
        "channels": pa.array(np.full(n, c, dtype=np.int32)),
        "label": pa.array(dataset.labels.astype(np.int64)),
        "digest": pa.array(digests.astype(str).tolist(), type=pa.string()),
    }
    for name, values in (extra_columns or {}).items():
        columns[name] = pa.array(np.asarray(values).tolist() if np.asarray(values).dtype == object else values)
    meta = dict(dataset.extra_metadata)
    meta.update(metadata or {})
    meta.update(format_version=FORMAT_VERSION, class_names=list(dataset.class_names), dataset_digest=ds_digest,
                n_samples=n)
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    # Neither a dictionary nor min/max statistics make sense for raw pixel blobs (the statistics alone would
    # copy two whole images into the footer of every row group).
    small = [name for name in table.column_names if name != "image"]
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=10_000, use_dictionary=small,
                       write_statistics=small)
    return ds_digest


def _parse_metadata(raw: bytes | None, path: Path | str) -> dict:
    if raw is None:
        raise DataError(f"{path}: not an incompat dataset (no '{METADATA_KEY.decode()}' schema metadata); "
                        "run `incompat ingest` on it first")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise DataError(f"{path}: the '{METADATA_KEY.decode()}' schema metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: the '{METADATA_KEY.decode()}' schema metadata is not a JSON object")
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: class_names in the metadata is not a list of strings")
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return _parse_metadata((schema.metadata or {}).get(METADATA_KEY), path)


def _check_column_types(schema, path: Path) -> None:
    import pyarrow as pa

    missing = [c for c in _REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    expect = {"sample_id": (pa.types.is_string, pa.types.is_large_string, "string"),
              "digest": (pa.types.is_string, pa.types.is_large_string, "string"),
              "image": (pa.types.is_binary, pa.types.is_large_binary, "binary"),
              "height": (pa.types.is_integer, pa.types.is_integer, "integer"),
              "width": (pa.types.is_integer, pa.types.is_integer, "integer"),
              "channels": (pa.types.is_integer, pa.types.is_integer, "integer"),
              "label": (pa.types.is_integer, pa.types.is_integer, "integer")}
    for name, (test_a, test_b, wanted) in expect.items():
        kind = schema.field(name).type
        if not (test_a(kind) or test_b(kind)):
            raise DataError(f"{path}: column {name!r} has type {kind}, expected {wanted}")


_BATCH_ROWS = 2048
_BATCH_BYTES = 256 * 2**20  # at most this much of a dictionary-encoded column materialised at once


def _refuse_chunk_metadata_that_aborts(pf, path: Path | str, timeout: float = 60.0) -> None:
    """Touch every column chunk's metadata in a forked child before the caller does.

    pyarrow validates a column chunk's size statistics (level histograms) in a C++ constructor whose exception its
    Python binding does not translate, so a forged histogram ends the whole process with SIGABRT (std::terminate)
    instead of raising (apache/arrow GH-45283 is the same check). Reading pages goes through a path that does
    translate it, but the zip-bomb checks must read the chunk metadata before any page. A child that dies means
    damaged metadata, never a dead parent; the same calls then succeed in the parent, as they are deterministic."""
    if not hasattr(os, "fork"):
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python cleanup, no atexit handlers of the parent's, just the answer
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # std::terminate's message is not for the user
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for i in range(group.num_columns):
                    chunk = group.column(i)
                    chunk.total_uncompressed_size, chunk.has_dictionary_page  # noqa: B018 (the access is the test)
            os.write(write_end, b"ok")
            code = 0
        except BaseException:  # a translated error: the parent's own read reports it with its message
            os.write(write_end, b"ok")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    answer = b""
    try:
        import select

        ready, _, _ = select.select([read_end], [], [], timeout)
        answer = os.read(read_end, 2) if ready else b""
    finally:
        os.close(read_end)
        if not answer:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
    if answer != b"ok":
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "no answer"
        raise DataError(f"{path}: damaged Parquet metadata (pyarrow cannot read its column chunk metadata: {how})")


def column_batch_rows(pf, column: str, path: Path | str, max_rows: int = _BATCH_ROWS) -> int:
    """Rows of `column` to read at a time from ParquetFile `pf`, after refusing a Parquet zip bomb.

    Plain-encoded pages inflate to the size the metadata declares, which must fit in the memory budget
    (DatasetTooLarge otherwise). Dictionary-encoded pages can inflate far beyond it (one compressible value
    repeated by 1-byte indices) and pyarrow materialises every repetition; no value is larger than its column
    chunk, so reading `allowance // chunk size` rows at a time bounds a batch to the allowance (256 MiB, or a
    quarter of the budget when that is less), whatever the file says."""
    _refuse_chunk_metadata_that_aborts(pf, path)
    try:
        meta = pf.metadata
        leaves = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == column]
        sizes, dictionary = [], False
        for g in range(meta.num_row_groups):
            chunks = [meta.row_group(g).column(i) for i in leaves]
            sizes.append(sum(c.total_uncompressed_size for c in chunks))
            dictionary = dictionary or any(c.has_dictionary_page for c in chunks)
    except Exception as exc:  # pyarrow raises several types for damaged metadata
        raise DataError(f"{path}: damaged Parquet metadata ({type(exc).__name__}: {exc})") from None
    if not sizes:
        return max_rows
    g = int(np.argmax(sizes))
    check_memory_budget(int(sizes[g]), str(path), f"row group {g} of column {column!r} declares "
                                                 f"{sizes[g]:,} bytes uncompressed")
    if not dictionary:
        return max_rows
    budget, _ = memory_budget()
    allowance = _BATCH_BYTES if budget is None else min(_BATCH_BYTES, budget // 4)
    return int(max(1, min(max_rows, allowance // max(sizes[g], 1))))


def _string_column(table, name: str, path: Path) -> np.ndarray:
    """A string column as an object array; pyarrow hands a forged column's bytes to Python unchecked, so invalid
    UTF-8 surfaces here as UnicodeDecodeError: a DataError naming the first bad row instead."""
    try:
        return np.asarray(table.column(name).to_pylist(), dtype=object)
    except UnicodeDecodeError as exc:
        raw = table.column(name).cast("binary").to_pylist()
        bad = next((i for i, v in enumerate(raw) if v is not None and not _is_utf8(v)), "?")
        raise DataError(f"{path} row {bad}: {name} is not valid UTF-8 ({exc.reason})") from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_dataset(path: str | os.PathLike, verify: bool = False) -> ImageSet:
    """Read a canonical dataset. With verify=True every sample digest is recomputed and compared.

    Any damage (a file that is not Parquet, forged metadata or shapes, wrong column types, nulls, truncated
    pages) raises DataError naming the file (and row); a dataset whose pixels would not fit in memory_budget()
    raises DatasetTooLarge before the pixel array is allocated. Images are copied in batches of at most 2048
    rows, so the peak memory is about the decoded pixels plus a few MiB."""
    try:
        return _read_dataset(Path(path), verify)
    except MemoryError:
        raise DatasetTooLarge(f"{path}: ran out of memory while reading it; see {MAX_DATASET_BYTES_ENV}") from None


def _read_dataset(path: Path, verify: bool) -> ImageSet:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        # Buffered page reads and small batches: the peak is the pixel array plus a few MiB, not plus a row group.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        schema = pf.schema_arrow
        n = pf.metadata.num_rows
        n_groups = pf.num_row_groups
    except Exception as exc:  # pyarrow raises several types for a non-Parquet or damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    meta = _parse_metadata((schema.metadata or {}).get(METADATA_KEY), path)
    _check_column_types(schema, path)
    small_columns = [c for c in _REQUIRED_COLUMNS if c != "image"]
    try:
        table = pf.read(columns=small_columns, use_threads=False)
    except Exception as exc:
        raise DataError(f"{path}: damaged Parquet data in the sample columns ({type(exc).__name__}: {exc})") from None
    if table.num_rows != n:
        raise DataError(f"{path}: the file declares {n} rows but {table.num_rows} were read")
    for name in small_columns:
        nulls = table.column(name).null_count
        if nulls:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path} row {row}: column {name!r} is null ({nulls} null value(s))")
    hs, ws, cs = (table.column(k).to_numpy().astype(np.int64) for k in ("height", "width", "channels"))
    if n and not ((hs == hs[0]).all() and (ws == ws[0]).all() and (cs == cs[0]).all()):
        bad = int(np.flatnonzero((hs != hs[0]) | (ws != ws[0]) | (cs != cs[0]))[0])
        raise DataError(f"{path} row {bad}: image shape differs from row 0")
    shape = (int(hs[0]), int(ws[0]), int(cs[0])) if n else (0, 0, 0)
    if n and not (0 < shape[0] <= _MAX_SIDE and 0 < shape[1] <= _MAX_SIDE and 0 < shape[2] <= 4):
        raise DataError(f"{path} row 0: image shape {shape} (height, width, channels) is not a valid image shape")
    size = shape[0] * shape[1] * shape[2]
    check_memory_budget(n * size, str(path), f"{n:,} images of {shape[0]}x{shape[1]}x{shape[2]}")
    batch_rows = column_batch_rows(pf, "image", path)  # first: it makes sure reading chunk metadata is safe
    image_index = schema.get_field_index("image")
    for g in range(n_groups):
        declared = pf.metadata.row_group(g).column(image_index).total_uncompressed_size
        if declared > max(4 * pf.metadata.row_group(g).num_rows * size, 1 << 20) + (1 << 20):
            raise DataError(f"{path} row group {g}: the image column declares {declared:,} bytes uncompressed, "
                            f"far more than {pf.metadata.row_group(g).num_rows} images of {size} bytes; "
                            "refusing to decompress it")
    images = np.empty((n, *shape), dtype=np.uint8)
    flat = images.reshape(n, size) if n else images
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["image"], use_threads=False):
            for chunk in (batch.column(0),):
                if row + len(chunk) > n:
                    raise DataError(f"{path}: more image rows than the {n} the file declares")
                if chunk.null_count:
                    bad = row + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(f"{path} row {bad}: image is null")
                chunk = chunk.cast(pa.large_binary())
                offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
                lengths = np.diff(offsets)
                if (lengths != size).any():
                    i = int(np.flatnonzero(lengths != size)[0])
                    raise DataError(f"{path} row {row + i}: image has {int(lengths[i])} bytes, expected {size} "
                                    f"({shape[0]}x{shape[1]}x{shape[2]})")
                if len(chunk):
                    data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
                    flat[row: row + len(chunk)] = data[offsets[0]: offsets[-1]].reshape(len(chunk), size)
                row += len(chunk)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # a damaged page: pyarrow raises OSError, ArrowInvalid, ...
        raise DataError(f"{path} near row {row}: damaged Parquet data in column 'image' "
                        f"({type(exc).__name__}: {exc})") from None
    if row != n:
        raise DataError(f"{path}: the file declares {n} rows but holds {row} images")
    class_names = meta["class_names"]
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "class_names", "dataset_digest",
                                                          "n_samples")}
    sample_ids = _string_column(table, "sample_id", path)
    labels = table.column("label").to_numpy()
    try:
        dataset = ImageSet(images, labels, sample_ids, class_names, extra)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    check_unique_ids(sample_ids, str(path))
    if verify:
        stored = _string_column(table, "digest", path)
        actual = dataset.sample_digests()
        bad = np.flatnonzero(stored != actual)
        if len(bad):
            raise DataError(f"{path} row {int(bad[0])} (sample {sample_ids[bad[0]]!r}): digest mismatch - the file "
                            f"was changed after it was written ({len(bad)} sample(s) differ)")
        if meta.get("dataset_digest") != dataset_digest(sample_ids, stored):
            raise DataError(f"{path}: dataset digest in the metadata does not match its rows")
    return dataset
