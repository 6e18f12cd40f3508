"""The canonical dataset file: round trip, digests, verification, and faults while writing (SIGKILL, full disk)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from incompat.data import DataError, ImageSet, read_dataset, write_dataset
from incompat.files import OutputError, atomic_output, temp_prefix, write_text_atomic
from tests.conftest import make_imageset


def test_round_trip_is_pixel_exact_and_digest_stable(tmp_path):
    ds = make_imageset()
    digest = write_dataset(ds, tmp_path / "a.parquet")
    back = read_dataset(tmp_path / "a.parquet", verify=True)
    assert np.array_equal(back.images, ds.images)
    assert np.array_equal(back.labels, ds.labels)
    assert list(back.sample_ids) == list(ds.sample_ids)
    assert back.class_names == ds.class_names
    assert back.dataset_digest() == digest
    # Same content written again gives the same digest; one changed pixel changes it.
    assert write_dataset(ds, tmp_path / "b.parquet") == digest
    ds.images[3, 0, 0, 0] ^= 1
    assert write_dataset(ds, tmp_path / "c.parquet") != digest


def test_canonical_columns_and_metadata(tmp_path):
    write_dataset(make_imageset(), tmp_path / "a.parquet")
    table = pq.read_table(tmp_path / "a.parquet")
    assert {"sample_id", "image", "height", "width", "channels", "label", "digest"} <= set(table.column_names)
    assert b"incompat" in table.schema.metadata


def test_verify_catches_a_tampered_row(tmp_path):
    import pyarrow as pa

    path = tmp_path / "a.parquet"
    write_dataset(make_imageset(), path)
    table = pq.read_table(path)
    labels = table.column("label").to_numpy().copy()
    labels[5] = (labels[5] + 1) % 3
    tampered = table.set_column(table.column_names.index("label"), "label", pa.array(labels))
    pq.write_table(tampered, path)
    read_dataset(path)  # without verification the file still reads
    with pytest.raises(DataError, match="row 5.*digest mismatch"):
        read_dataset(path, verify=True)


def test_label_outside_class_list_is_refused():
    ds = make_imageset()
    with pytest.raises(DataError, match="label 7 is outside the 3 classes"):
        ImageSet(ds.images, np.where(np.arange(len(ds)) == 4, 7, ds.labels), ds.sample_ids, ds.class_names)


def test_duplicate_sample_ids_are_refused(tmp_path):
    ds = make_imageset()
    ds.sample_ids[1] = ds.sample_ids[0]
    with pytest.raises(DataError, match="appears more than once"):
        write_dataset(ds, tmp_path / "a.parquet")
    assert not (tmp_path / "a.parquet").exists()


def test_non_parquet_and_foreign_parquet_are_clear_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="x.parquet: not a readable Parquet file"):
        read_dataset(tmp_path / "x.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match="not an incompat dataset"):
        read_dataset(tmp_path / "y.parquet")
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "missing.parquet")


def test_failed_write_keeps_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    first = write_dataset(make_imageset(), path)
    import pyarrow.parquet

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(pyarrow.parquet, "write_table", boom)
    with pytest.raises(OSError):
        write_dataset(make_imageset(seed=1), path)
    monkeypatch.undo()
    assert read_dataset(path).dataset_digest() == first
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


# ---------------------------------------------------------------------------------------- faults while writing

ROOT = Path(__file__).resolve().parents[1]
_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from incompat.data import ImageSet, write_dataset
    n = int(sys.argv[2])
    images = np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # incompressible
    write_dataset(ImageSet(images, np.zeros(n, np.int64), [f"new-{i}" for i in range(n)], ["a"]), sys.argv[1])
    print("finished", flush=True)
""")


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _temps(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-")]


def test_sigkill_mid_write_leaves_the_previous_version_intact(tmp_path):
    out = tmp_path / "train.parquet"
    old_digest = write_dataset(make_imageset(), out)
    old_bytes = out.read_bytes()
    for n in (30_000, 90_000):  # a bigger dataset if the first write was over before we could catch it
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(n)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        caught = None
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            partial = [p for p in _temps(tmp_path, out.name) if p.stat().st_size > 0]
            if partial:
                caught = partial[0]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        if caught is not None:
            break
    assert caught is not None and proc.returncode == -signal.SIGKILL, "could not kill the writer mid-write"
    # The old file is untouched: same bytes, reads and verifies, same digest.
    assert out.read_bytes() == old_bytes
    assert read_dataset(out, verify=True).dataset_digest() == old_digest
    # Nothing that looks like an output appeared; the killed writer's hidden temp file is swept by the next write.
    assert _visible(tmp_path) == ["train.parquet"]
    assert all(p.name.startswith(".train.parquet.tmp-") for p in tmp_path.iterdir() if p != out)
    write_dataset(make_imageset(seed=2), out)
    assert _temps(tmp_path, out.name) == [] and _visible(tmp_path) == ["train.parquet"]


def test_stale_temp_of_a_live_writer_is_left_alone(tmp_path):
    out = tmp_path / "a.parquet"
    live = tmp_path / f"{temp_prefix(out)}abcd"  # this process's pid: alive
    live.write_bytes(b"in progress")
    dead = tmp_path / f".a.parquet.tmp-{temp_prefix(out).split('-')[1]}-999999999-abcd"  # no such pid
    dead.write_bytes(b"left by a killed run")
    write_dataset(make_imageset(), out)
    assert live.exists() and not dead.exists()


def test_outputs_get_normal_permissions_not_the_private_temp_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        write_dataset(make_imageset(), tmp_path / "a.parquet")
        write_text_atomic(tmp_path / "b.json", "{}")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a.parquet").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


def test_enospc_from_the_writer_is_a_clear_error_with_no_partial_output(tmp_path, monkeypatch):
    import pyarrow.parquet

    path = tmp_path / "a.parquet"
    first = write_dataset(make_imageset(), path)

    def full_disk(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pyarrow.parquet, "write_table", full_disk)
    with pytest.raises(OutputError, match=r"a\.parquet: no space left on device; nothing was written") as err:
        write_dataset(make_imageset(seed=1), path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert read_dataset(path, verify=True).dataset_digest() == first
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_enospc_at_fsync_is_reported_the_same_way(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_text_atomic(path, "old")
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".a.json.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputError, match="no space left on device"):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs (root and a working `mount` needed; skipped otherwise)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_for_real_keeps_the_previous_version(small_filesystem):
    path = small_filesystem / "train.parquet"
    first = write_dataset(make_imageset(), path)  # a few KiB: fits
    rng = np.random.default_rng(0)
    big = ImageSet(rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), np.zeros(1000, np.int64),
                   [f"b{i}" for i in range(1000)], ["a"])  # 3 MiB of incompressible pixels: does not fit
    with pytest.raises(OutputError, match=r"train\.parquet: no space left on device; nothing was written") as err:
        write_dataset(big, path)
    assert err.value.errno == errno.ENOSPC
    assert read_dataset(path, verify=True).dataset_digest() == first
    assert [p.name for p in small_filesystem.iterdir()] == ["train.parquet"]


def test_full_disk_reported_without_errno_is_still_named(small_filesystem):
    """Writers such as torch.save raise RuntimeError('... file write failed') on a full disk, with no errno."""
    path = small_filesystem / "state.pt"
    write_text_atomic(path, "old state")
    with pytest.raises(OutputError, match=r"state\.pt: no space left on device"):
        with atomic_output(path) as tmp:
            try:
                with open(tmp, "wb") as fh:
                    for _ in range(4096):
                        fh.write(b"\0" * 4096)
                        fh.flush()
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing "
                                   "file data/0: file write failed") from None
    assert path.read_text() == "old state" and [p.name for p in small_filesystem.iterdir()] == ["state.pt"]


def test_full_disk_through_the_command_line_is_one_clear_line(small_filesystem, tmp_path, capsys):
    from flows.cli import main

    rng = np.random.default_rng(0)
    source = tmp_path / "src.npz"
    np.savez(source, x=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), y=np.zeros(1000, int))
    assert main(["ingest", str(source), "--out", str(small_filesystem / "raw.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raw.parquet: no space left on device; nothing was written" in err[0]
    assert list(small_filesystem.iterdir()) == []


# ------------------------------------------------------------------------------------ forged canonical files

def _rewrite(path, column=None, values=None, metadata=None):
    import pyarrow as pa

    table = pq.read_table(path)
    meta = table.schema.metadata
    if column is not None:
        table = table.set_column(table.column_names.index(column), column, pa.array(values))
    pq.write_table(table.replace_schema_metadata(meta if metadata is None else metadata), path)


@pytest.mark.parametrize("column, values, metadata, pattern", [
    ("height", [-8] * 60, None, r"row 0: image shape \(-8, 8, 3\) .* is not a valid image shape"),
    ("channels", [0] * 60, None, r"row 0: image shape \(8, 8, 0\)"),
    ("width", [70_000] * 60, None, r"row 0: image shape \(8, 70000, 3\)"),
    ("height", [8] * 59 + [9], None, r"row 59: image shape differs from row 0"),
    ("label", [0] * 59 + [None], None, r"row 59: column 'label' is null"),
    ("label", ["0"] * 60, None, r"column 'label' has type string, expected integer"),
    ("sample_id", list(range(60)), None, r"column 'sample_id' has type int64, expected string"),
    ("image", [b"\0" * 192] * 59 + [b"\0" * 10], None, r"row 59: image has 10 bytes, expected 192"),
    ("image", [b"\0" * 192] * 59 + [None], None, r"row 59: image is null"),
    (None, None, {b"incompat": b"{not json"}, r"schema metadata is not valid JSON"),
    (None, None, {b"incompat": b"[1, 2]"}, r"schema metadata is not a JSON object"),
    (None, None, {b"incompat": b'{"class_names": "abc"}'}, r"class_names in the metadata is not a list of strings"),
])
def test_forged_canonical_file_is_a_data_error_naming_file_and_row(tmp_path, column, values, metadata, pattern):
    path = tmp_path / "forged.parquet"
    write_dataset(make_imageset(), path)
    _rewrite(path, column, values, metadata)
    with pytest.raises(DataError, match=pattern) as err:
        read_dataset(path, verify=True)
    assert str(path) in str(err.value)


def test_truncated_canonical_file_is_a_data_error(tmp_path):
    path = tmp_path / "t.parquet"
    write_dataset(make_imageset(), path)
    data = path.read_bytes()
    for cut in (0, 4, len(data) // 2, len(data) - 9):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file"):
            read_dataset(path)
    # damage inside the data pages, footer intact
    middle = bytearray(data)
    middle[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    path.write_bytes(bytes(middle))
    with pytest.raises(DataError, match=r"t\.parquet"):
        read_dataset(path, verify=True)
