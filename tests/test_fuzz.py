"""Fuzzing every reader: random bytes and mutated valid files must end in a dataset or a DataError, nothing else.

One test per reader (image folder for each image format, HF parquet, canonical parquet through read_source and
read_dataset, GTSRB, CIFAR python batches, npz, format detection). Each input is either random bytes or a valid
file with bytes flipped, overwritten, inserted or cut off; the CIFAR reader also gets random pickles of plain
objects and arrays, the npz reader zip files of random members. A declared exception is incompat.data.DataError
(or a subclass such as DatasetTooLarge); anything else (IndexError, pyarrow's ArrowInvalid, MemoryError, a hang
past the deadline) fails the test. Sized to finish in well under 30 s on two busy cores; set FUZZ_EXAMPLES to
run longer (e.g. FUZZ_EXAMPLES=2000 before a release).
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from incompat.data import DataError, ImageSet, read_dataset, write_dataset
from incompat.readers import detect_format, read_source
from tests.test_ingest import GT_HEADER, encode, hf_metadata, random_images, write_pickle

SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0"))
# Images small enough that a mutated header cannot make one decode take long; the bomb limit is tested elsewhere.
MAX_PIXELS = 256 * 256


def fuzz_settings(examples: int):
    return settings(max_examples=SCALE or examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------ valid seeds

IMAGES = random_images(3, 8, 8, seed=11)


def _image_seeds() -> dict[str, bytes]:
    seeds = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("PPM", "ppm"), ("BMP", "bmp"), ("GIF", "gif"),
                     ("TIFF", "tif"), ("WEBP", "webp")):
        seeds[ext] = encode(IMAGES[0], fmt)
    return seeds


def _hf_seed() -> bytes:
    table = pa.table({"img": pa.array([{"bytes": encode(im), "path": "p.png"} for im in IMAGES],
                                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([0, 1, 0], type=pa.int64())}).replace_schema_metadata(hf_metadata(["a", "b"]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _canonical_seed() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.parquet"
        write_dataset(ImageSet(IMAGES, [0, 1, 0], ["s0", "s1", "s2"], ["a", "b"]), path)
        return path.read_bytes()


def _npz_seed(compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=IMAGES, y=np.array([0, 1, 0]),
                                                       class_names=np.array(["a", "b"]))
    return buf.getvalue()


def _cifar_batch_seed(protocol: int) -> bytes:
    data = np.random.default_rng(3).integers(0, 256, (2, 3072), dtype=np.uint8)
    return pickle.dumps({b"batch_label": b"b", b"labels": [0, 1], b"data": data, b"filenames": [b"x", b"y"]},
                        protocol=protocol)


IMAGE_SEEDS = _image_seeds()
HF_SEED = _hf_seed()
CANONICAL_SEED = _canonical_seed()
NPZ_SEEDS = [_npz_seed(False), _npz_seed(True)]
CIFAR_SEEDS = [_cifar_batch_seed(2), _cifar_batch_seed(5)]
META_SEED = pickle.dumps({b"label_names": [b"a", b"b"], b"num_vis": 3072}, protocol=2)


# ------------------------------------------------------------------------------------------------ mutations

@st.composite
def mutated(draw, seed: bytes, max_random: int = 800) -> bytes:
    """Random bytes, or `seed` with bytes flipped / overwritten / inserted / deleted and maybe truncated."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=max_random))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "copy"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos: pos + draw(st.integers(1, 16))]
        else:  # overwrite with a copy of another stretch of the file: keeps plausible structure
            src = draw(st.integers(0, len(data) - 1))
            length = draw(st.integers(1, 32))
            data[pos: pos + length] = data[src: src + length]
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def read_or_data_error(source, **kwargs) -> None:
    """The property: a dataset that satisfies the ImageSet contract, or DataError. Anything else propagates."""
    for on_bad_sample in ("fail", "skip"):
        try:
            ds, quarantine = read_source(source, on_bad_sample=on_bad_sample, max_pixels=MAX_PIXELS, **kwargs)
        except DataError as exc:
            assert str(exc)  # a message for the person reading it
            continue
        assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and ds.images.shape[3] == 3 and len(ds) > 0
        assert len(ds.labels) == len(ds) and ds.labels.min() >= 0 and ds.labels.max() < ds.n_classes
        assert len(set(ds.sample_ids.tolist())) == len(ds)
        assert isinstance(quarantine, list) and (on_bad_sample == "skip" or not quarantine)


# ---------------------------------------------------------------------------------------------------- readers

@fuzz_settings(120)
@given(st.sampled_from(sorted(IMAGE_SEEDS)).flatmap(lambda ext: st.tuples(st.just(ext),
                                                                          mutated(IMAGE_SEEDS[ext]))))
def test_fuzz_image_folder_every_image_format(case):
    ext, payload = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "a" / "good.png").write_bytes(IMAGE_SEEDS["png"])
        # the mutated file under its own extension and under a wrong one (content decides, not the name)
        (root / "b" / f"x.{ext}").write_bytes(payload)
        (root / "b" / "y.png").write_bytes(payload)
        read_or_data_error(root)


@fuzz_settings(80)
@given(mutated(HF_SEED))
def test_fuzz_hf_parquet(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        path.write_bytes(payload)
        read_or_data_error(path)
        read_or_data_error(path, fmt="hf-parquet")


@fuzz_settings(80)
@given(st.lists(st.sampled_from([encode(IMAGES[1]), encode(IMAGES[2], "JPEG"), b""]), min_size=1, max_size=4)
       .flatmap(lambda blobs: st.tuples(st.just(blobs), st.lists(mutated(encode(IMAGES[0])), max_size=3))))
def test_fuzz_hf_parquet_mutated_image_cells(case):
    """A well-formed parquet whose image cells are damaged: every bad cell is named by row or skipped."""
    good, bad = case
    blobs = good + bad
    table = pa.table({"img": pa.array([{"bytes": b, "path": None} for b in blobs],
                                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([0] * len(blobs), type=pa.int64())})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.parquet"
        pq.write_table(table.replace_schema_metadata(hf_metadata(["a"])), path)
        read_or_data_error(path)


@fuzz_settings(80)
@given(mutated(CANONICAL_SEED))
def test_fuzz_canonical_parquet(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "canon.parquet"
        path.write_bytes(payload)
        read_or_data_error(path)
        read_or_data_error(path, fmt="canonical")
        for verify in (False, True):
            try:
                ds = read_dataset(path, verify=verify)
            except DataError:
                continue
            assert ds.images.dtype == np.uint8 and len(ds.labels) == len(ds.images)


@fuzz_settings(80)
@given(mutated(f"{GT_HEADER}\r\n00000_00000.ppm;8;8;1;1;7;7;1\r\n00001_00000.ppm;8;8;1;1;7;7;1\r\n".encode(),
               max_random=200),
       mutated(encode(IMAGES[0], "PPM")))
def test_fuzz_gtsrb(csv_bytes, ppm_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "GTSRB" / "Final_Training" / "Images" / "00001"
        folder.mkdir(parents=True)
        (folder / "GT-00001.csv").write_bytes(csv_bytes)
        (folder / "00000_00000.ppm").write_bytes(ppm_bytes)
        (folder / "00001_00000.ppm").write_bytes(encode(IMAGES[1], "PPM"))
        read_or_data_error(Path(tmp) / "GTSRB")


# Plain objects of the kinds a CIFAR batch holds, nested; numpy arrays of assorted dtypes and shapes.
_dtypes = st.sampled_from(["u1", "i1", "i8", "<u2", ">i4", "f4", "f8", "c8", "?", "S3", "U2", "O", "V4",
                           "i4,f4", "(2,)i2"])
_arrays = st.builds(lambda dt, shape: np.zeros(shape, dtype=np.dtype(dt)), _dtypes,
                    st.lists(st.integers(0, 4), max_size=3).map(tuple))
_leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.binary(max_size=20), st.text(max_size=10), _arrays,
                    st.sampled_from([np.int64(3), np.float32(1.5), np.uint8(7), np.bool_(True)]))
_objects = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.sampled_from([b"data", b"labels", "data", "labels", b"label_names", 1]), inner,
                    max_size=4)), max_leaves=12)


@st.composite
def _cifar_batch(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(mutated(draw(st.sampled_from(CIFAR_SEEDS))))
    if kind == 1:  # a batch-shaped dict with random contents
        n = draw(st.integers(0, 3))
        data = draw(st.one_of(st.just(np.zeros((n, 3072), np.uint8)), _arrays, _leaves))
        labels = draw(st.one_of(st.lists(_leaves, min_size=n, max_size=n),
                                st.lists(st.integers(-3, 5), min_size=n, max_size=n), _arrays, _leaves))
        return pickle.dumps({draw(st.sampled_from([b"data", "data"])): data,
                             draw(st.sampled_from([b"labels", "labels"])): labels},
                            protocol=draw(st.integers(0, 5)))
    return pickle.dumps(draw(_objects), protocol=draw(st.integers(0, 5)))


@fuzz_settings(150)
@given(_cifar_batch(), st.one_of(st.just(META_SEED), mutated(META_SEED, max_random=100),
                                 _objects.map(lambda o: pickle.dumps(o, protocol=2))))
def test_fuzz_cifar_batches_random_pickles(batch, meta):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar-10-batches-py"
        folder.mkdir()
        (folder / "batches.meta").write_bytes(meta)
        (folder / "data_batch_1").write_bytes(batch)
        read_or_data_error(folder)


@st.composite
def _npy_member(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    array = draw(_arrays)
    if array.dtype.hasobject:
        array = np.array([draw(_leaves) for _ in range(2)] + [None], dtype=object)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    raw = buf.getvalue()
    return draw(mutated(raw)) if draw(st.booleans()) else raw


@st.composite
def _npz_file(draw) -> bytes:
    if draw(st.booleans()):
        return draw(mutated(draw(st.sampled_from(NPZ_SEEDS))))
    buf = io.BytesIO()
    names = draw(st.lists(st.sampled_from(["x.npy", "y.npy", "class_names.npy", "other.npy", "x", "../x.npy"]),
                          min_size=1, max_size=4, unique=True))
    with zipfile.ZipFile(buf, "w", compression=draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) \
            as zf:
        for name in names:
            if name == "x.npy" and draw(st.booleans()):
                member = io.BytesIO()
                n = draw(st.integers(0, 3))
                np.save(member, np.zeros((n, draw(st.integers(1, 4)), 2, draw(st.sampled_from([1, 2, 3, 4]))),
                                         np.uint8))
                zf.writestr(name, member.getvalue())
            else:
                zf.writestr(name, draw(_npy_member()))
    return buf.getvalue()


@fuzz_settings(150)
@given(_npz_file())
def test_fuzz_npz_random_members(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        path.write_bytes(payload)
        read_or_data_error(path)


@fuzz_settings(100)
@given(st.sampled_from(["data.parquet", "data.npz", "data.bin", "data"]),
       st.one_of(st.binary(max_size=300), mutated(HF_SEED), st.sampled_from(NPZ_SEEDS).flatmap(mutated)))
def test_fuzz_format_detection(name, payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(payload)
        try:
            fmt = detect_format(path)
        except DataError:
            return
        assert fmt in ("hf-parquet", "canonical", "npz")
        read_or_data_error(path)


def test_fuzz_seeds_are_valid(tmp_path):
    """The unmutated seeds read: otherwise the fuzz tests above would only ever exercise the error paths."""
    for ext, blob in IMAGE_SEEDS.items():
        (tmp_path / "root" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / "a" / f"x_{ext}.png").write_bytes(blob)  # .gif/.tif/.webp: decoded by content
    assert len(read_source(tmp_path / "root")[0]) == len(IMAGE_SEEDS)
    for name, blob in [("hf.parquet", HF_SEED), ("canon.parquet", CANONICAL_SEED), ("a.npz", NPZ_SEEDS[0]),
                       ("b.npz", NPZ_SEEDS[1])]:
        (tmp_path / name).write_bytes(blob)
        assert len(read_source(tmp_path / name)[0]) == 3
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(META_SEED)
    for blob in CIFAR_SEEDS:
        (folder / "data_batch_1").write_bytes(blob)
        assert len(read_source(folder)[0]) == 2
    write_pickle(folder / "data_batch_1", {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)})
    assert len(read_source(folder)[0]) == 1


@pytest.mark.parametrize("ext", sorted(IMAGE_SEEDS))
def test_fuzz_image_seed_formats_decode_to_the_same_pixels(ext, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"x_{ext}.png").write_bytes(IMAGE_SEEDS[ext])
    ds, _ = read_source(tmp_path)
    expected = np.asarray(Image.open(io.BytesIO(IMAGE_SEEDS[ext])).convert("RGB"))
    assert np.array_equal(ds.images[0], expected)
