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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from incompat.files import atomic_output

FORMAT_VERSION = 1
METADATA_KEY = b"incompat"


class DataError(ValueError):
    """Bad input data. The message always names the file (and row/sample where there is one)."""


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
        dup = uniq[counts > 1][0]
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
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=10_000)
    return ds_digest


def read_metadata(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: not an incompat dataset (no '{METADATA_KEY.decode()}' schema metadata); "
                        "run `incompat ingest` on it first")
    return json.loads(raw)


def read_dataset(path: str | os.PathLike, verify: bool = False) -> ImageSet:
    """Read a canonical dataset. With verify=True every sample digest is recomputed and compared."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    meta = read_metadata(path)
    table = pq.read_table(path)
    missing = {"sample_id", "image", "height", "width", "channels", "label", "digest"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    n = table.num_rows
    hs, ws, cs = (table.column(k).to_numpy() for k in ("height", "width", "channels"))
    if n and not ((hs == hs[0]).all() and (ws == ws[0]).all() and (cs == cs[0]).all()):
        bad = int(np.flatnonzero((hs != hs[0]) | (ws != ws[0]) | (cs != cs[0]))[0])
        raise DataError(f"{path} row {bad}: image shape differs from row 0")
    shape = (int(hs[0]), int(ws[0]), int(cs[0])) if n else (0, 0, 0)
    size = shape[0] * shape[1] * shape[2]
    images = np.empty((n, *shape), dtype=np.uint8)
    flat = images.reshape(n, size) if n else images
    row = 0
    for chunk in table.column("image").chunks:
        if not (pa.types.is_large_binary(chunk.type) or pa.types.is_binary(chunk.type)):
            raise DataError(f"{path}: column 'image' has type {chunk.type}, expected binary")
        chunk = chunk.cast(pa.large_binary())
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
        lengths = np.diff(offsets)
        if (lengths != size).any():
            bad = row + int(np.flatnonzero(lengths != size)[0])
            raise DataError(f"{path} row {bad}: image has {int(lengths[bad - row])} bytes, expected {size}")
        flat[row: row + len(chunk)] = data[offsets[0]: offsets[-1]].reshape(len(chunk), size)
        row += len(chunk)
    class_names = meta.get("class_names") or []
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "class_names", "dataset_digest",
                                                          "n_samples")}
    sample_ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    try:
        dataset = ImageSet(images, labels, sample_ids, class_names, extra)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if verify:
        stored = np.asarray(table.column("digest").to_pylist(), dtype=object)
        actual = dataset.sample_digests()
        bad = np.flatnonzero(stored != actual)
        if len(bad):
            raise DataError(f"{path} row {int(bad[0])} (sample {sample_ids[bad[0]]!r}): digest mismatch - the file "
                            f"was changed after it was written ({len(bad)} sample(s) differ)")
        if meta.get("dataset_digest") != dataset_digest(sample_ids, stored):
            raise DataError(f"{path}: dataset digest in the metadata does not match its rows")
    return dataset

