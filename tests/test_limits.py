"""Memory limits: a dataset whose decoded pixels exceed the budget is refused before decoding, per reader.

The budget is INCOMPAT_MAX_DATASET_BYTES when set (the tests set a small one), else MemAvailable / the cgroup
limit. Also: a Parquet file whose image column inflates far beyond its size (a Parquet zip bomb) is refused from
its metadata, and read_dataset's peak memory stays near the size of the pixels (bench/bench_memory.py measures
the full CIFAR-10 figures).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import incompat.readers as readers
from incompat.data import (MAX_DATASET_BYTES_ENV, DataError, DatasetTooLarge, ImageSet, memory_budget, parse_bytes,
                           read_dataset, write_dataset)
from incompat.readers import ingest, read_source
from tests.test_ingest import encode, make_cifar, make_folder, random_images, write_hf_parquet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cap(monkeypatch):
    def set_cap(value: str) -> None:
        monkeypatch.setenv(MAX_DATASET_BYTES_ENV, value)
    return set_cap


@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    real = readers._decode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(readers, "_decode", counting)
    return calls


def test_parse_bytes_and_the_budget_source(monkeypatch):
    assert parse_bytes("1048576") == 2**20 and parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("2G") == 2 * 2**30 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("64 kb") == 65536
    for bad in ("", "-1", "0", "lots", "1X", "1e9"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    monkeypatch.setenv(MAX_DATASET_BYTES_ENV, "3M")
    assert memory_budget() == (3 * 2**20, f"{MAX_DATASET_BYTES_ENV}=3M")
    monkeypatch.setenv(MAX_DATASET_BYTES_ENV, "plenty")
    with pytest.raises(ValueError, match=f"environment variable {MAX_DATASET_BYTES_ENV}: 'plenty' is not a size"):
        memory_budget()
    monkeypatch.delenv(MAX_DATASET_BYTES_ENV)
    budget, source = memory_budget()
    if Path("/proc/meminfo").exists():
        assert budget > 0 and ("MemAvailable" in source or "cgroup" in source)


def test_hf_parquet_over_budget_is_refused_after_one_image(tmp_path, cap, decode_calls):
    flat = np.full((50, 16, 16, 3), 90, np.uint8)  # compresses well: the row group is far smaller than the pixels
    path = write_hf_parquet(tmp_path / "big.parquet", [encode(im) for im in flat], [0] * 50, ["a"])
    cap("36000")  # 50 images of 16x16x3 = 38,400 bytes
    expected = (r"big\.parquet: decoding needs about 37\.5 KiB \(50 images of 16x16x3, size from the first image, "
                r".*row 0\) but only 35\.2 KiB")
    with pytest.raises(DatasetTooLarge, match=expected) as err:
        read_source(path)
    assert MAX_DATASET_BYTES_ENV in str(err.value) and "refusing before decoding" in str(err.value)
    assert len(decode_calls) == 1  # only the image that told the size
    cap("38400")
    assert len(read_source(path)[0]) == 50


def test_image_size_is_checked_before_any_image_is_decoded(tmp_path, cap, decode_calls):
    root = make_folder(tmp_path / "root", {"a": random_images(4), "b": random_images(4, seed=1)})
    cap("1M")
    with pytest.raises(DatasetTooLarge, match=r"8 images of 512x512x3, size from image_size"):
        read_source(root, image_size=(512, 512))
    assert decode_calls == []


def test_npz_over_budget_is_refused_from_its_header(tmp_path, cap, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((40, 16, 16, 1), np.uint8), y=np.zeros(40, int))
    read = []
    monkeypatch.setattr(readers, "_npz_array", lambda zf, key: read.append(key))
    cap("30000")  # 40*16*16 = 10,240 raw + 30,720 as RGB
    with pytest.raises(DatasetTooLarge, match=r"key 'x' of 40 images of 16x16x1, converted to 16x16x3"):
        read_source(path)
    assert read == []


def test_cifar_over_budget_is_refused_before_unpickling(tmp_path, cap, monkeypatch):
    folder, _ = make_cifar(tmp_path, n_per_batch=20, n_batches=2)
    loaded = []
    monkeypatch.setattr(readers, "_load_pickle", lambda path: loaded.append(path))
    cap("100K")
    with pytest.raises(DatasetTooLarge, match=r"cifar-10-batches-py: decoding needs .*\(2 batch file\(s\)"):
        read_source(folder)
    assert loaded == []


def test_canonical_over_budget_is_refused_before_allocating(tmp_path, cap):
    path = tmp_path / "c.parquet"
    write_dataset(ImageSet(random_images(30), np.zeros(30, int), [f"s{i}" for i in range(30)], ["a"]), path)
    cap("5000")
    with pytest.raises(DatasetTooLarge, match=r"c\.parquet: decoding needs about 5\.6 KiB \(30 images of 8x8x3\)"):
        read_dataset(path)
    with pytest.raises(DatasetTooLarge):
        ingest(path, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_forged_shape_columns_cannot_make_read_dataset_allocate(tmp_path, cap):
    """A 2-row file claiming 60000x60000x4 images (28.8 GB) is refused from the shape columns alone."""
    path = tmp_path / "forged.parquet"
    write_dataset(ImageSet(random_images(2), [0, 0], ["a", "b"], ["a"]), path)
    table = pq.read_table(path)
    meta = table.schema.metadata
    for column, value in (("height", 60_000), ("width", 60_000), ("channels", 4)):
        table = table.set_column(table.column_names.index(column), column, pa.array([value, value], pa.int32()))
    pq.write_table(table.replace_schema_metadata(meta), path)
    cap("1G")
    with pytest.raises(DatasetTooLarge, match=r"2 images of 60000x60000x4"):
        read_dataset(path)


def _zero_blobs(path: Path, rows: int, size: int, dictionary: bool) -> Path:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"img": pa.array([{"bytes": b"\0" * size, "path": None}] * rows, type=image_type),
                      "label": pa.array([0] * rows)})
    pq.write_table(table, path, compression="zstd", use_dictionary=dictionary)
    return path


def test_parquet_zip_bomb_is_refused_from_the_metadata(tmp_path, cap, decode_calls):
    """20 rows of 1 MiB zero bytes compress to almost nothing but inflate to 20 MiB when the column is read."""
    path = _zero_blobs(tmp_path / "bomb.parquet", 20, 2**20, dictionary=False)
    assert path.stat().st_size < 2**20
    cap("8M")
    with pytest.raises(DatasetTooLarge, match=r"row group 0 of column 'img' declares 20,97\d,\d{3} bytes uncompressed"):
        read_source(path, on_bad_sample="skip")
    assert decode_calls == []


def test_dictionary_encoded_zip_bomb_is_read_in_bounded_batches(tmp_path, cap):
    """With dictionary encoding the metadata declares one 1 MiB value (what the file holds) while reading
    materialises it once per row: the batch size is cut so that a batch stays within the allowance."""
    path = _zero_blobs(tmp_path / "dict.parquet", 100, 2**20, dictionary=True)
    pf = pq.ParquetFile(path)
    chunk = pf.metadata.row_group(0).column(0)
    assert chunk.has_dictionary_page and chunk.total_uncompressed_size < 2 * 2**20  # 100 MiB when read
    cap("64M")
    rows = readers._image_batch_rows(pf, "img", path)
    assert rows * chunk.total_uncompressed_size <= 16 * 2**20 and rows >= 1  # a quarter of the 64 MiB budget
    with pytest.raises(DataError, match=r"no samples left in .*dict\.parquet: all 100 were bad"):
        read_source(path, on_bad_sample="skip")


def test_over_budget_through_the_command_line_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    path = write_hf_parquet(tmp_path / "src.parquet", [encode(im) for im in random_images(10)], [0] * 10, ["a"])
    monkeypatch.setenv(MAX_DATASET_BYTES_ENV, "1000")
    assert main(["ingest", str(path), "--out", str(tmp_path / "out.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoding needs about" in err[0] and MAX_DATASET_BYTES_ENV in err[0]
    assert not (tmp_path / "out.parquet").exists()


_PEAK = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyarrow.parquet  # noqa: F401  (the import's own memory is not the reader's)
    from incompat.data import read_dataset

    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))

    np.zeros(1)  # imports done
    before = hwm()
    ds = read_dataset(sys.argv[1])
    print(json.dumps({"before": before, "after": hwm(), "pixels": ds.images.nbytes}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")
def test_read_dataset_peak_memory_stays_near_the_pixel_size(tmp_path):
    """Reading streams the image column in batches: the peak grows by the pixels plus pyarrow's own overhead,
    not by a whole decompressed table on top (pq.read_table of the file cost 4.8x the pixels)."""
    n = 40_000
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "big.parquet"
    write_dataset(ImageSet(images, np.zeros(n, int), [f"s{i}" for i in range(n)], ["a"]), path)
    del images
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    growth = figures["after"] - figures["before"]
    assert figures["pixels"] == n * 3072
    # measured here: +248 MiB for 117 MiB of pixels (the whole-table read it replaced: +567 MiB)
    assert growth < 2 * figures["pixels"] + 64 * 2**20, figures


def test_bad_budget_setting_is_a_clear_error_not_a_crash(tmp_path, cap):
    path = write_hf_parquet(tmp_path / "s.parquet", [encode(im) for im in random_images(2)], [0, 0], ["a"])
    cap("twelve")
    with pytest.raises(ValueError, match=MAX_DATASET_BYTES_ENV) as err:
        read_source(path)
    assert not isinstance(err.value, DataError)
