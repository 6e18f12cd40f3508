"""Ingestion from every supported source layout into the canonical Parquet file, and every way a source can be bad.

All data is tiny and synthetic (built in tmp_path), except one test that copies a few rows of the real GTSRB
test parquet when ../shared/data is present.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from incompat.data import DataError, ImageSet, read_dataset, read_metadata, write_dataset
from incompat.readers import GTSRB_CLASS_NAMES, detect_format, ingest, read_source, subsample_stratified

REAL_GTSRB_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gtsrb" / "test.parquet"
GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


# ------------------------------------------------------------------------------------------------- builders

def random_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels: decoding it would need ~3*w*h bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def hf_metadata(names: list[str] | None) -> dict:
    label = {"names": names, "_type": "ClassLabel"} if names is not None else {"dtype": "int64", "_type": "Value"}
    return {b"huggingface": json.dumps({"info": {"features": {"img": {"_type": "Image"}, "label": label}}}).encode()}


def write_hf_parquet(path: Path, blobs: list[bytes | None], labels, names: list[str] | None,
                     column: str = "img", label_type=pa.int64()) -> Path:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": b, "path": f"train/{i:04d}.png"} for i, b in enumerate(blobs)], type=image_type)
    table = pa.table({column: images, "label": pa.array(labels, type=label_type)})
    table = table.replace_schema_metadata(hf_metadata(names))
    pq.write_table(table, path)
    return path


def make_hf(tmp_path: Path, n: int = 12, names=("cat", "dog", "frog"), seed: int = 0, h: int = 8, w: int = 8):
    images = random_images(n, h, w, seed)
    labels = [i % len(names) for i in range(n)]
    path = write_hf_parquet(tmp_path / "train.parquet", [encode(im) for im in images], labels, list(names))
    return path, images, np.array(labels)


def make_folder(root: Path, per_class: dict[str, np.ndarray], ext: str = ".png") -> Path:
    for name, images in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            (root / name / f"img{i:03d}{ext}").write_bytes(encode(im))
    return root


def make_gtsrb(root: Path, classes=(0, 1, 2), per_class: int = 3, n_test: int = 4, sizes=None,
               test_csv_in_images: bool = True) -> dict:
    """The official layout: Final_Training/Images/000NN/*.ppm + GT-000NN.csv; Final_Test/Images + GT csv."""
    expected = {"train": {}, "test": {}}
    rng = np.random.default_rng(1)
    k = 0
    for c in classes:
        folder = root / "Final_Training" / "Images" / f"{c:05d}"
        folder.mkdir(parents=True)
        lines = [GT_HEADER]
        for j in range(per_class):
            h, w = sizes[k % len(sizes)] if sizes else (8, 8)
            k += 1
            im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"{j:05d}_{0:05d}.ppm"
            Image.fromarray(im).save(folder / name)
            lines.append(f"{name};{w};{h};1;1;{w - 1};{h - 1};{c}")
            expected["train"][f"train/{c:05d}/{name}"] = (im, c)
        (folder / f"GT-{c:05d}.csv").write_text("\r\n".join(lines) + "\r\n")
    images_dir = root / "Final_Test" / "Images"
    images_dir.mkdir(parents=True)
    lines = [GT_HEADER]
    for j in range(n_test):
        im = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        c = classes[j % len(classes)]
        name = f"{j:05d}.ppm"
        Image.fromarray(im).save(images_dir / name)
        lines.append(f"{name};8;8;1;1;7;7;{c}")
        expected["test"][f"test/{name}"] = (im, c)
    csv_dir = images_dir if test_csv_in_images else root / "Final_Test"
    (csv_dir / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    return expected


def write_pickle(path: Path, obj) -> None:
    # protocol 2 with bytes keys: what the official Python 2 files hold
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar(root: Path, n_per_batch: int = 5, n_batches: int = 2, names=(b"airplane", b"automobile", b"bird")):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": n_per_batch, b"label_names": list(names),
                                           b"num_vis": 3072})
    rng = np.random.default_rng(2)
    batches = {}
    for name in [f"data_batch_{i + 1}" for i in range(n_batches)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, len(names), n_per_batch)]
        write_pickle(folder / name, {b"batch_label": b"batch", b"labels": labels, b"data": data,
                                     b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)]})
        batches[name] = (data, labels)
    return folder, batches


def cifar_to_hwc(data: np.ndarray) -> np.ndarray:
    """Independent of the reader: pixel (r, c) channel k sits at byte k*1024 + r*32 + c."""
    out = np.empty((len(data), 32, 32, 3), dtype=np.uint8)
    for k in range(3):
        for r in range(32):
            out[:, r, :, k] = data[:, k * 1024 + r * 32: k * 1024 + r * 32 + 32]
    return out


# --------------------------------------------------------------------------------------- round trips by format

def test_hf_parquet_round_trip_is_pixel_exact(tmp_path):
    path, images, labels = make_hf(tmp_path, n=12)
    summary = ingest(path, tmp_path / "out.parquet")
    ds = read_dataset(tmp_path / "out.parquet", verify=True)
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    assert ds.class_names == ["cat", "dog", "frog"]
    assert list(ds.sample_ids[:2]) == ["train-00000", "train-00001"] and ds.sample_ids[-1] == "train-00011"
    assert summary["n_samples"] == 12 and summary["n_classes"] == 3 and summary["format"] == "hf-parquet"
    assert summary["class_counts"] == {"cat": 4, "dog": 4, "frog": 4} and summary["n_skipped"] == 0
    assert summary["dataset_digest"] == ds.dataset_digest()
    assert detect_format(path) == "hf-parquet" and detect_format(tmp_path / "out.parquet") == "canonical"


def test_hf_parquet_image_column_mixed_modes_and_no_class_names(tmp_path):
    rgb = random_images(4, seed=3)
    gray = rgb[0, :, :, 0]
    rgba = np.dstack([rgb[1], np.full((8, 8), 7, np.uint8)])
    palette = Image.fromarray(rgb[2]).quantize(16)
    blobs = [encode(gray), encode(rgba), encode(palette), encode(rgb[3], "JPEG")]
    path = write_hf_parquet(tmp_path / "mixed.parquet", blobs, [0, 1, 4, 2], None, column="image")
    ds, quarantine = read_source(path)
    assert quarantine == [] and ds.images.shape == (4, 8, 8, 3) and ds.images.dtype == np.uint8
    assert np.array_equal(ds.images[0], np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(ds.images[1], rgb[1])
    assert np.array_equal(ds.images[2], np.asarray(palette.convert("RGB")))
    assert np.array_equal(ds.images[3], np.asarray(Image.open(io.BytesIO(blobs[3])).convert("RGB")))
    assert ds.class_names == ["0", "1", "2", "3", "4"]  # no names in the metadata: max label + 1


def test_canonical_source_is_read_back_unchanged(tmp_path):
    original = ImageSet(random_images(6), [0, 1, 0, 1, 0, 1], [f"s{i}" for i in range(6)], ["a", "b"])
    write_dataset(original, tmp_path / "canon.parquet")
    ds, quarantine = read_source(tmp_path / "canon.parquet")
    assert quarantine == [] and ds.dataset_digest() == original.dataset_digest()
    assert list(ds.sample_ids) == [f"s{i}" for i in range(6)]


def test_image_folder_round_trip(tmp_path):
    images = random_images(9, seed=4)
    root = make_folder(tmp_path / "root", {"zebra": images[:3], "ant": images[3:5], "moth": images[5:]})
    (root / "ant" / "notes.txt").write_text("ignored: not an image extension")
    (root / "ant" / ".hidden.png").write_bytes(b"ignored: hidden")
    (root / "moth" / "UPPER.PNG").write_bytes(encode(images[0]))
    (root / "moth" / "really_png.jpg").write_bytes(encode(images[1]))  # detected by content, not extension
    summary = ingest(root, tmp_path / "out.parquet")
    ds = read_dataset(tmp_path / "out.parquet")
    assert ds.class_names == ["ant", "moth", "zebra"]
    assert list(ds.sample_ids) == ["ant/img000.png", "ant/img001.png", "moth/UPPER.PNG", "moth/img000.png",
                                   "moth/img001.png", "moth/img002.png", "moth/img003.png", "moth/really_png.jpg",
                                   "zebra/img000.png", "zebra/img001.png", "zebra/img002.png"]
    expected = np.stack([images[3], images[4], images[0], *images[5:], images[1], *images[:3]])
    assert np.array_equal(ds.images, expected)
    assert list(ds.labels) == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    assert summary["format"] == "image-folder" and summary["class_counts"] == {"ant": 2, "moth": 6, "zebra": 3}


@pytest.mark.parametrize("csv_in_images", [True, False])
def test_gtsrb_official_layout_train_and_test(tmp_path, csv_in_images):
    expected = make_gtsrb(tmp_path / "GTSRB", test_csv_in_images=csv_in_images)
    root = tmp_path / "GTSRB"
    assert detect_format(root) == "gtsrb"
    for source, split, part in [(root, None, "train"), (root / "Final_Training", None, "train"),
                                (root, "test", "test"), (root / "Final_Test", None, "test"),
                                (root / "Final_Test" / "Images", None, "test")]:
        ds, quarantine = read_source(source, split=split)
        assert quarantine == [] and ds.class_names == list(GTSRB_CLASS_NAMES) and len(GTSRB_CLASS_NAMES) == 43
        assert list(ds.sample_ids) == sorted(expected[part])
        for sid, img, label in zip(ds.sample_ids, ds.images, ds.labels):
            assert np.array_equal(img, expected[part][sid][0]) and label == expected[part][sid][1]


def test_gtsrb_sizes_differ_needs_image_size(tmp_path):
    make_gtsrb(tmp_path / "G", sizes=[(8, 8), (9, 11), (12, 10)])
    with pytest.raises(DataError, match=r"00000_00000\.ppm|00001_00000\.ppm") as err:
        read_source(tmp_path / "G")
    assert "image_size" in str(err.value) and "9x11" in str(err.value)
    ds, _ = read_source(tmp_path / "G", image_size=(8, 8))
    assert ds.images.shape == (9, 8, 8, 3)
    original = Image.open(tmp_path / "G/Final_Training/Images/00000/00001_00000.ppm")
    assert np.array_equal(ds.images[1], np.asarray(original.resize((8, 8), Image.Resampling.BILINEAR)))


def test_gtsrb_csv_errors(tmp_path):
    make_gtsrb(tmp_path / "G")
    csv_path = tmp_path / "G/Final_Training/Images/00001/GT-00001.csv"
    good = csv_path.read_text()
    for bad_line, pattern in [("00000_00000.ppm;8;8;1;1;7;7;2", "ClassId 2 but the file is in class folder 00001"),
                              ("00000_00000.ppm;8;8;1;1;7;7;43", "ClassId '43'"),
                              ("00000_00000.ppm;8;8;1;1;7;7;1.5", "ClassId '1.5'"),
                              ("00000_00000.ppm;8;8;1;1;7;7;-1", "ClassId '-1'"),
                              ("../../00000/00000_00000.ppm;8;8;1;1;7;7;1", "not a plain file name")]:
        csv_path.write_text(GT_HEADER + "\r\n" + bad_line + "\r\n")
        with pytest.raises(DataError, match=pattern) as err:
            read_source(tmp_path / "G")
        assert "GT-00001.csv line 2" in str(err.value)
    csv_path.write_text(GT_HEADER + "\r\n")
    with pytest.raises(DataError, match="no samples in .*GT-00001.csv"):
        read_source(tmp_path / "G")
    csv_path.write_text(good)
    (tmp_path / "G/Final_Test/Images/GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="no GT-final_test.csv"):
        read_source(tmp_path / "G", split="test")


@pytest.mark.parametrize("via_parent", [True, False])
def test_cifar_python_batches(tmp_path, via_parent):
    folder, batches = make_cifar(tmp_path)
    source = tmp_path if via_parent else folder
    assert detect_format(source) == "cifar-batches"
    ds, quarantine = read_source(source)
    assert quarantine == [] and ds.class_names == ["airplane", "automobile", "bird"]
    expected = np.concatenate([cifar_to_hwc(batches["data_batch_1"][0]), cifar_to_hwc(batches["data_batch_2"][0])])
    assert np.array_equal(ds.images, expected)
    assert list(ds.labels) == batches["data_batch_1"][1] + batches["data_batch_2"][1]
    assert list(ds.sample_ids[:2]) == ["data_batch_1:0", "data_batch_1:1"] and ds.sample_ids[5] == "data_batch_2:0"
    test, _ = read_source(source, split="test")
    assert np.array_equal(test.images, cifar_to_hwc(batches["test_batch"][0]))
    assert test.sample_ids[0] == "test_batch:0"
    resized, _ = read_source(source, image_size=(16, 16))
    assert resized.images.shape == (10, 16, 16, 3)


def test_cifar100_python_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(folder / "meta", {b"fine_label_names": [b"apple", b"bee", b"cup"], b"coarse_label_names": [b"x"]})
    data = np.random.default_rng(3).integers(0, 256, (4, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        write_pickle(folder / split, {b"filenames": [b"f"] * 4, b"batch_label": b"b", b"fine_labels": [2, 0, 1, 2],
                                      b"coarse_labels": [0] * 4, b"data": data})
    ds, _ = read_source(tmp_path, split="test")
    assert ds.class_names == ["apple", "bee", "cup"] and list(ds.labels) == [2, 0, 1, 2]
    assert np.array_equal(ds.images, cifar_to_hwc(data)) and ds.sample_ids[3] == "test:3"


def test_npz_round_trip_and_channel_conversion(tmp_path):
    images = random_images(6, seed=5)
    np.savez(tmp_path / "rgb.npz", x=images, y=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["a", "b", "c"]))
    summary = ingest(tmp_path / "rgb.npz", tmp_path / "out.parquet")
    ds = read_dataset(tmp_path / "out.parquet")
    assert np.array_equal(ds.images, images) and ds.class_names == ["a", "b", "c"]
    assert list(ds.sample_ids[:2]) == ["rgb-00000", "rgb-00001"] and summary["format"] == "npz"
    np.savez(tmp_path / "gray.npz", x=images[..., :1], y=np.array([0, 1, 0, 1, 0, 1], dtype=np.float32))
    gray, _ = read_source(tmp_path / "gray.npz")
    assert np.array_equal(gray.images, np.repeat(images[..., :1], 3, axis=3)) and gray.class_names == ["0", "1"]
    np.savez_compressed(tmp_path / "rgba.npz", x=np.concatenate([images, images[..., :1]], axis=3), y=np.zeros(6))
    rgba, _ = read_source(tmp_path / "rgba.npz")
    assert np.array_equal(rgba.images, images)


@pytest.mark.parametrize("arrays, pattern", [
    ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": np.zeros(2, int)}, "key 'x' must be uint8"),
    ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.zeros(2, int)}, "key 'x' must be uint8"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, int)}, "key 'x' must be uint8"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(3, int)}, "2 images but key 'y' has 3"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros((2, 1), int)}, "key 'y' must be a 1-D"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array(["a", "b"])}, "key 'y' must be a 1-D"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8)}, "no key 'y'"),
    ({"x": np.zeros((0, 4, 4, 3), np.uint8), "y": np.zeros(0, int)}, "no samples in"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0.0, 1.5])}, "key 'y' row 1: label 1.5"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0.0, np.nan])}, "key 'y' row 1: label nan"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, -1])}, "key 'y' row 1: label -1 is negative"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 2]), "class_names": np.array(["a", "b"])},
     "key 'y' row 1: label 2 is outside the 2 classes"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 1]), "class_names": np.array([{"a": 1}, 2])},
     "holds Python objects"),
])
def test_npz_errors_name_file_and_key(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as err:
        read_source(path)
    assert str(path) in str(err.value)


# -------------------------------------------------------------------------------------------------- subsample

def test_subsample_stratified_is_proportional_deterministic_and_ordered():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 18 + [3] * 2)
    order = np.random.default_rng(0).permutation(100)
    ds = ImageSet(random_images(100, 2, 2), labels[order], [f"id{i}" for i in range(100)], list("abcd"))
    sub = subsample_stratified(ds, 20, seed=1)
    # quotas 10, 6, 3.6, 0.4: the 2-sample class still keeps one
    assert np.bincount(sub.labels, minlength=4).tolist() == [10, 6, 3, 1]
    positions = [int(s[2:]) for s in sub.sample_ids]
    assert positions == sorted(positions)  # original order kept
    assert np.array_equal(sub.images, ds.images[positions])
    again = subsample_stratified(ds, 20, seed=1)
    assert list(again.sample_ids) == list(sub.sample_ids)
    assert list(subsample_stratified(ds, 20, seed=2).sample_ids) != list(sub.sample_ids)
    # every present class keeps one when n >= number of classes, even a tiny one
    tiny = subsample_stratified(ds, 4, seed=0)
    assert np.bincount(tiny.labels, minlength=4).tolist() == [1, 1, 1, 1]
    assert len(subsample_stratified(ds, 100, seed=0)) == 100
    with pytest.raises(DataError, match="subset of 101"):
        subsample_stratified(ds, 101, seed=0)


def test_ingest_with_subset(tmp_path):
    path, _, _ = make_hf(tmp_path, n=30)
    summary = ingest(path, tmp_path / "out.parquet", subset=9, seed=3)
    assert summary["n_samples"] == 9 and summary["n_read"] == 30
    assert summary["class_counts"] == {"cat": 3, "dog": 3, "frog": 3}


# ---------------------------------------------------------------------------------------------- bad input

def test_differing_sizes_error_names_row_and_resize_fixes_it(tmp_path):
    images = [random_images(1, 8, 8)[0], random_images(1, 8, 8, 1)[0], random_images(1, 6, 10, 2)[0]]
    path = write_hf_parquet(tmp_path / "sizes.parquet", [encode(im) for im in images], [0, 1, 0], ["a", "b"])
    with pytest.raises(DataError, match=r"sizes.parquet row 2: image is 6x10 .*first image .*row 0.* is 8x8"):
        read_source(path)
    ds, _ = read_source(path, image_size=(4, 5))
    assert ds.images.shape == (3, 4, 5, 3)
    expected = Image.fromarray(images[2]).resize((5, 4), Image.Resampling.BILINEAR)
    assert np.array_equal(ds.images[2], np.asarray(expected))


def test_bad_image_bytes_fail_with_row_or_skip_into_quarantine(tmp_path):
    images = random_images(6)
    blobs = [encode(im) for im in images]
    blobs[2] = blobs[2][: len(blobs[2]) // 2]  # truncated PNG
    blobs[4] = b"this is not an image"
    path = write_hf_parquet(tmp_path / "train.parquet", blobs, [0, 1, 0, 1, 0, 1], ["a", "b"])
    with pytest.raises(DataError, match=r"train.parquet row 2: cannot decode image"):
        read_source(path)
    out = tmp_path / "out.parquet"
    summary = ingest(path, out, on_bad_sample="skip")
    ds = read_dataset(out)
    assert list(ds.sample_ids) == ["train-00000", "train-00001", "train-00003", "train-00005"]
    assert np.array_equal(ds.images, images[[0, 1, 3, 5]])
    report = json.loads((tmp_path / "out.quarantine.json").read_text())
    quarantine = report["skipped"]
    assert summary["n_skipped"] == 2 and summary["quarantine_path"] == str(tmp_path / "out.quarantine.json")
    # the count is in the return value, the quarantine file and the dataset's own metadata (for the lineage)
    assert report["n_skipped"] == 2 and report["n_read"] == 4 and report["dataset_digest"] == ds.dataset_digest()
    assert read_metadata(out)["ingest"]["n_skipped"] == 2
    assert [q["row"] for q in quarantine] == [2, 4] and [q["sample_id"] for q in quarantine] == \
        ["train-00002", "train-00004"]
    assert all(q["source"] == str(path) and q["reason"] for q in quarantine)
    # a later clean ingest to the same place leaves no stale quarantine behind
    clean = write_hf_parquet(tmp_path / "clean.parquet", [encode(im) for im in images], [0] * 6, ["a"])
    assert ingest(clean, out)["n_skipped"] == 0 and not (tmp_path / "out.quarantine.json").exists()


def test_truncated_images_stay_refused_even_if_pil_was_told_otherwise(tmp_path):
    blob = encode(random_images(1, 32, 32)[0], "JPEG")
    path = write_hf_parquet(tmp_path / "t.parquet", [blob, blob[:-200]], [0, 0], ["a"])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DataError, match="row 1: cannot decode"):
            read_source(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_image_folder_bad_files(tmp_path):
    images = random_images(4)
    root = make_folder(tmp_path / "root", {"a": images[:2], "b": images[2:]})
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.png").write_text("hello, I am text")
    with pytest.raises(DataError, match=r"b/empty\.png: empty file"):
        read_source(root)
    ds, quarantine = read_source(root, on_bad_sample="skip")
    assert len(ds) == 4 and [q["file"] for q in quarantine] == ["b/empty.png", "b/text.png"]
    assert "cannot decode" in quarantine[1]["reason"]


def test_all_samples_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_hf_parquet(tmp_path / "junk.parquet", [b"junk", None], [0, 0], ["a"])
    with pytest.raises(DataError, match="no samples left in .*junk.parquet: all 2 were bad"):
        read_source(path, on_bad_sample="skip")
    with pytest.raises(DataError, match="row 1: no image bytes"):
        write_hf_parquet(tmp_path / "junk.parquet", [encode(random_images(1)[0]), None], [0, 0], ["a"])
        read_source(tmp_path / "junk.parquet")


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "root", {"a": random_images(2)})
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty_class"):
        read_source(root)


@pytest.mark.parametrize("what", ["file", "class folder"])
def test_symlink_out_of_root_is_refused(tmp_path, what):
    outside = tmp_path / "outside"
    make_folder(outside, {"secret": random_images(1)})
    root = make_folder(tmp_path / "root", {"a": random_images(2)})
    if what == "file":
        (root / "a" / "link.png").symlink_to(outside / "secret" / "img000.png")
    else:
        (root / "b").symlink_to(outside / "secret", target_is_directory=True)
    with pytest.raises(DataError, match="outside the source folder"):
        read_source(root)
    with pytest.raises(DataError, match="outside the source folder"):
        read_source(root, on_bad_sample="skip")  # a security refusal is never a skippable sample


def test_symlink_inside_root_is_fine(tmp_path):
    images = random_images(2)
    root = make_folder(tmp_path / "root", {"a": images})
    (root / "b").mkdir()
    (root / "b" / "same.png").symlink_to(root / "a" / "img000.png")
    ds, _ = read_source(root)
    assert np.array_equal(ds.images[2], images[0])


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (5000, 5000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    blobs = [encode(random_images(1)[0]), png_declaring(width, height)]
    path = write_hf_parquet(tmp_path / "bomb.parquet", blobs, [0, 0], ["a"])
    with pytest.raises(DataError, match=r"bomb.parquet row 1: .*(decompression bomb|over the limit)"):
        read_source(path)
    ds, quarantine = read_source(path, on_bad_sample="skip")
    assert len(ds) == 1 and quarantine[0]["row"] == 1
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "a" / "bomb.png").write_bytes(png_declaring(width, height))
    with pytest.raises(DataError, match=r"a/bomb.png: .*(decompression bomb|over the limit)"):
        read_source(root)


@pytest.mark.parametrize("labels, label_type, pattern", [
    ([0, 3], pa.int64(), r"row 1: label 3 is outside the 3 classes"),
    ([0, -2], pa.int64(), r"row 1: label -2 is negative"),
    ([0, None], pa.int64(), r"row 1: label nan is not an integer"),
    ([0.0, 1.5], pa.float64(), r"row 1: label 1.5 is not an integer"),
    ([0.0, float("nan")], pa.float64(), r"row 1: label nan is not an integer"),
    (["0", "1"], pa.string(), r"row 0: label '0' is not an integer"),
])
def test_bad_labels_name_file_and_row(tmp_path, labels, label_type, pattern):
    blobs = [encode(im) for im in random_images(2)]
    path = write_hf_parquet(tmp_path / "labels.parquet", blobs, labels, ["a", "b", "c"], label_type=label_type)
    with pytest.raises(DataError, match=pattern) as err:
        read_source(path, on_bad_sample="skip")
    assert str(path) in str(err.value)


def test_integral_float_labels_are_accepted(tmp_path):
    blobs = [encode(im) for im in random_images(2)]
    path = write_hf_parquet(tmp_path / "f.parquet", blobs, [0.0, 2.0], ["a", "b", "c"], label_type=pa.float64())
    assert list(read_source(path)[0].labels) == [0, 2]


def test_zero_row_sources(tmp_path):
    path = write_hf_parquet(tmp_path / "empty.parquet", [], [], ["a"])
    with pytest.raises(DataError, match="no samples in .*empty.parquet"):
        read_source(path)
    folder, _ = make_cifar(tmp_path / "c", n_per_batch=0, n_batches=1)
    with pytest.raises(DataError, match="no samples in .*data_batch_1"):
        read_source(folder)


def test_cifar_bad_labels_and_data(tmp_path):
    folder, batches = make_cifar(tmp_path)
    data, labels = batches["data_batch_2"]
    write_pickle(folder / "data_batch_2", {b"labels": labels[:-1] + [3], b"data": data})
    with pytest.raises(DataError, match=r"data_batch_2 row 4: labels 3 is outside the 3 classes"):
        read_source(folder)
    write_pickle(folder / "data_batch_2", {b"labels": labels[:-1] + [1.5], b"data": data})
    with pytest.raises(DataError, match=r"data_batch_2 row 4: labels 1.5 is not an integer"):
        read_source(folder)
    write_pickle(folder / "data_batch_2", {b"labels": labels, b"data": data.astype(np.int16)})
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be a uint8 \(N, 3072\) array"):
        read_source(folder)
    write_pickle(folder / "data_batch_2", {b"labels": labels, b"data": data[:, :100]})
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be"):
        read_source(folder)


class _SystemCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvalCall:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("where", ["batch", "nested label", "meta"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    folder, batches = make_cifar(tmp_path)
    marker = tmp_path / "PWNED"
    data, labels = batches["data_batch_1"]
    if where == "batch":
        write_pickle(folder / "data_batch_1", _SystemCall(f"touch {marker}"))
        pattern = r"refusing to unpickle (posix|os)\.system from .*data_batch_1"
    elif where == "nested label":
        evil = _EvalCall(f"open({str(marker)!r}, 'w').close() or 0")
        write_pickle(folder / "data_batch_1", {b"labels": [evil] + labels[1:], b"data": data})
        pattern = r"refusing to unpickle (builtins|__builtin__)\.eval from .*data_batch_1"
    else:
        write_pickle(folder / "batches.meta", {b"label_names": [_SystemCall(f"touch {marker}")]})
        pattern = r"refusing to unpickle (posix|os)\.system from .*batches.meta"
    with pytest.raises(DataError, match=pattern):
        read_source(tmp_path, on_bad_sample="skip")
    assert not marker.exists()


def test_protocol_5_and_str_key_pickles_are_read(tmp_path):
    folder, batches = make_cifar(tmp_path, n_batches=1)
    data, labels = batches["data_batch_1"]
    (folder / "data_batch_1").write_bytes(pickle.dumps({"labels": np.array(labels), "data": data}, protocol=5))
    ds, _ = read_source(folder)
    assert np.array_equal(ds.images, cifar_to_hwc(data)) and list(ds.labels) == labels


def test_error_leaves_existing_output_untouched(tmp_path):
    good, _, _ = make_hf(tmp_path, n=6)
    out = tmp_path / "out.parquet"
    ingest(good, out)
    before = out.read_bytes()
    bad = write_hf_parquet(tmp_path / "bad.parquet", [b"garbage"] * 2, [0, 1], ["a", "b"])
    with pytest.raises(DataError):
        ingest(bad, out)
    with pytest.raises(DataError):
        ingest(tmp_path / "missing.parquet", out)
    with pytest.raises(DataError):
        ingest(good, out, subset=100)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "out.parquet", "train.parquet"]


@pytest.mark.skipif(not REAL_GTSRB_TEST.exists(), reason="../shared/data/gtsrb/test.parquet not present")
def test_slice_of_real_gtsrb_test_parquet(tmp_path):
    pf = pq.ParquetFile(REAL_GTSRB_TEST)
    first = next(pf.iter_batches(batch_size=60))
    table = pa.Table.from_batches([first]).replace_schema_metadata(pf.schema_arrow.metadata)
    pq.write_table(table, tmp_path / "test.parquet")
    ds, quarantine = read_source(tmp_path / "test.parquet")
    assert quarantine == [] and ds.images.shape == (60, 32, 32, 3)
    assert ds.class_names == list(GTSRB_CLASS_NAMES)
    assert ds.sample_ids[0] == "test-00000" and list(ds.labels) == first.column("label").to_pylist()
    blob = first.column("img")[0].as_py()["bytes"]
    assert np.array_equal(ds.images[0], np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    sub = subsample_stratified(ds, 20, seed=0)
    assert len(sub) == 20 and set(sub.labels) <= set(ds.labels)


# The fuzz tests (random and mutated input for every reader) are in tests/test_fuzz.py.


# ------------------------------------------------------------------------------- hostile names and metadata

HOSTILE_BUT_ALLOWED_NAMES = ["../../escape", "a/b", "/etc/passwd", "C:\\Windows\\x", "..", "~", "beware of ice/snow"]


@pytest.mark.parametrize("name, pattern", [
    ("evil\x1b[2Jname", r"class 1 name 'evil\\x1b\[2Jname' contains U\+001B"),
    ("two\nlines", r"class 1 name 'two\\nlines' contains U\+000A"),
    ("tab\there", r"contains U\+0009"),
    ("\u202egnp.exe", r"contains U\+202E \(RIGHT-TO-LEFT OVERRIDE\)"),
    ("nul\x00byte", r"contains U\+0000"),
    ("c1\x85", r"contains U\+0085"),
    ("", r"class 1 has an empty name"),
    ("   ", r"class 1 has an empty name"),
    ("x" * 201, r"class 1 name 'x+'\.\.\. is 201 characters long"),
    ("a", r"class name 'a' appears twice"),
])
@pytest.mark.parametrize("reader", ["hf-parquet", "npz", "cifar-batches"])
def test_class_names_with_control_characters_are_refused(tmp_path, name, pattern, reader):
    """The policy: refuse (never rewrite) a class name that could rewrite a terminal or log line."""
    names = ["a", name, "c"]
    if reader == "hf-parquet":
        source = write_hf_parquet(tmp_path / "n.parquet", [encode(im) for im in random_images(3)], [0, 1, 2], names)
    elif reader == "npz":
        source = tmp_path / "n.npz"
        np.savez(source, x=random_images(3), y=np.array([0, 1, 2]), class_names=np.array(names))
    else:
        source, _ = make_cifar(tmp_path, names=tuple(n.encode("utf-8", "surrogatepass") for n in names))
    with pytest.raises(DataError, match=pattern) as err:
        read_source(source, on_bad_sample="skip")
    assert str(tmp_path) in str(err.value)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)  # the message shows the name escaped


def test_class_folder_with_control_character_is_refused_before_any_message_prints_it(tmp_path):
    root = make_folder(tmp_path / "root", {"ok": random_images(1), "bad\x1b]0;owned\x07": random_images(1)})
    (root / "empty\x1b[31m").mkdir()  # would otherwise be reported as an empty class folder, raw
    with pytest.raises(DataError, match=r"contains U\+001B") as err:
        read_source(root)
    assert "\x1b" not in str(err.value)


def test_file_name_with_control_character_is_a_bad_sample(tmp_path):
    images = random_images(3)
    root = make_folder(tmp_path / "root", {"a": images[:2]})
    (root / "a" / "x\x1b[2J.png").write_bytes(encode(images[2]))
    with pytest.raises(DataError, match=r"file name 'x\\x1b\[2J.png' contains U\+001B") as err:
        read_source(root)
    assert "\x1b" not in str(err.value)
    ds, quarantine = read_source(root, on_bad_sample="skip")
    assert list(ds.sample_ids) == ["a/img000.png", "a/img001.png"]
    assert quarantine[0]["file"] == "a/x\x1b[2J.png" and "rename the file" in quarantine[0]["reason"]


def test_gtsrb_csv_filename_with_control_character_is_refused(tmp_path):
    make_gtsrb(tmp_path / "G")
    csv_path = tmp_path / "G/Final_Training/Images/00001/GT-00001.csv"
    csv_path.write_text(GT_HEADER + "\r\n00000_00000\x1b.ppm;8;8;1;1;7;7;1\r\n")
    with pytest.raises(DataError, match=r"GT-00001.csv line 2: Filename '00000_00000\\x1b.ppm' is not a plain"):
        read_source(tmp_path / "G")


def test_class_names_with_path_separators_are_kept_and_reach_no_file_path(tmp_path):
    """Names are display text: '../../escape' or '/etc/passwd' are stored as they are and never become paths.

    Ingest and poison (the steps that read and write datasets) with such names create exactly the files they
    create for plain names, all inside their output folders."""
    from incompat.poisoning import write_poisoned

    names = HOSTILE_BUT_ALLOWED_NAMES
    n = 20 * len(names)
    blobs = [encode(im) for im in random_images(n, 32, 32, seed=7)]
    labels = [i % len(names) for i in range(n)]
    listings = {}
    for variant, class_names in [("plain", [f"class{i}" for i in range(len(names))]), ("hostile", names)]:
        work = tmp_path / variant
        work.mkdir()
        source = write_hf_parquet(work / "source.parquet", blobs, labels, class_names)
        ingest(source, work / "raw" / "train.parquet")
        assert read_dataset(work / "raw" / "train.parquet").class_names == class_names
        write_poisoned(work / "raw" / "train.parquet", "paper:100:2", work / "poisoned")
        listings[variant] = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    assert listings["hostile"] == listings["plain"]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_no_code_builds_a_path_from_a_class_name():
    """Static guard for the same policy: in incompat/, flows/ and tasks/, no path constructor, open() or
    `path / x` expression takes anything named like a class name."""
    import ast

    root = Path(__file__).resolve().parents[1]
    path_calls = {"Path", "PurePath", "open", "join", "joinpath", "with_name", "with_stem", "with_suffix", "mkdir",
                  "makedirs", "touch", "write_text", "write_bytes", "atomic_output", "write_text_atomic",
                  "write_dataset"}
    offenders = []

    def mentions_class_name(node) -> bool:
        return any((isinstance(n, ast.Name) and "class_name" in n.id)
                   or (isinstance(n, ast.Attribute) and "class_name" in n.attr) for n in ast.walk(node))

    for folder in ("incompat", "flows", "tasks"):
        for py in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(py.read_text(), filename=str(py))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) \
                        else ""
                    # write_dataset/write_text take the path first: only that argument is a path
                    args = node.args[:1] if name in {"write_dataset", "write_text_atomic", "atomic_output"} \
                        else [*node.args, *(k.value for k in node.keywords)]
                    # `", ".join(...)` is str.join (display text), not os.path.join
                    str_join = name == "join" and isinstance(func, ast.Attribute) and isinstance(func.value,
                                                                                                  ast.Constant)
                    if name in path_calls and not str_join and any(mentions_class_name(a) for a in args):
                        offenders.append(f"{py.relative_to(root)}:{node.lineno}")
                elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (
                        mentions_class_name(node.right) and not isinstance(node.right, ast.Constant)):
                    offenders.append(f"{py.relative_to(root)}:{node.lineno}")
    assert offenders == [], f"class names used to build paths at {offenders}"


def test_duplicate_sample_ids_in_a_canonical_source_name_the_rows(tmp_path):
    path = tmp_path / "dup.parquet"
    write_dataset(ImageSet(random_images(4), [0, 1, 0, 1], ["s0", "s1", "s2", "s3"], ["a", "b"]), path)
    table = pq.read_table(path)
    ids = pa.array(["s0", "s1", "s0", "s3"])
    pq.write_table(table.set_column(table.column_names.index("sample_id"), "sample_id", ids)
                   .replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(DataError, match=r"dup.parquet: sample_id 's0' appears more than once \(rows \[0, 2\]\)"):
        read_source(path)


def test_canonical_sample_id_with_control_character_is_refused(tmp_path):
    path = tmp_path / "ids.parquet"
    write_dataset(ImageSet(random_images(2), [0, 1], ["fine", "bad\rid"], ["a", "b"]), path)
    with pytest.raises(DataError, match=r"ids.parquet row 1: sample id 'bad\\rid' contains U\+000D"):
        read_source(path)


def test_fifo_named_like_an_image_does_not_block(tmp_path):
    root = make_folder(tmp_path / "root", {"a": random_images(2)})
    os.mkfifo(root / "a" / "pipe.png")
    with pytest.raises(DataError, match=r"a/pipe\.png: not a regular file"):
        read_source(root)
    ds, quarantine = read_source(root, on_bad_sample="skip")
    assert len(ds) == 2 and quarantine[0]["file"] == "a/pipe.png"


def test_non_raster_formats_are_not_handed_to_their_decoders(tmp_path):
    """An EPS file (PIL would run Ghostscript on it) or a PDF named .png is an undecodable sample, not decoded."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(/tmp/x) (w) file closefile\nshowpage\n"
    blobs = [encode(random_images(1)[0]), eps, b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"]
    path = write_hf_parquet(tmp_path / "eps.parquet", blobs, [0, 0, 0], ["a"])
    with pytest.raises(DataError, match=r"eps.parquet row 1: cannot decode image"):
        read_source(path)
    ds, quarantine = read_source(path, on_bad_sample="skip")
    assert len(ds) == 1 and [q["row"] for q in quarantine] == [1, 2]
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what PIL would have done with it, unrestricted


def test_wrong_extension_is_decoded_by_content_and_non_images_are_reported(tmp_path):
    images = random_images(3)
    root = make_folder(tmp_path / "root", {"a": images[:1]})
    (root / "a" / "jpeg_named.png").write_bytes(encode(images[1], "JPEG"))
    (root / "a" / "png_named.bmp").write_bytes(encode(images[2]))
    (root / "a" / "zip_named.jpg").write_bytes(b"PK\x03\x04" + bytes(40))
    (root / "a" / "html_named.ppm").write_bytes(b"<html><body>not an image</body></html>")
    with pytest.raises(DataError, match=r"a/html_named\.ppm: cannot decode image"):
        read_source(root)
    ds, quarantine = read_source(root, on_bad_sample="skip")
    assert sorted(ds.sample_ids) == ["a/img000.png", "a/jpeg_named.png", "a/png_named.bmp"]
    assert [q["file"] for q in quarantine] == ["a/html_named.ppm", "a/zip_named.jpg"]
    assert np.array_equal(ds.images[list(ds.sample_ids).index("a/png_named.bmp")], images[2])


# ------------------------------------------------------------------------------- the restricted unpickler

@pytest.mark.parametrize("value, pattern", [
    (np.array([1, "a"], dtype=object), r"array dtype dtype\('O'\)"),
    (np.zeros(2, dtype=[("a", "i4"), ("b", "O")]), r"array dtype dtype\('V"),
    (np.zeros(2, dtype=[("a", "i4")]), r"array dtype dtype\('V4'\)"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), r"array dtype"),
    ({1, 2}, r"the pickle holds a set"),
    (bytearray(b"xx"), r"the pickle holds a bytearray"),
    ([[[[[[[[[[0]]]]]]]]]], r"nests containers more than 8 levels"),
])
def test_unpickler_accepts_only_plain_arrays_lists_bytes_str_numbers(tmp_path, value, pattern):
    folder, batches = make_cifar(tmp_path, n_batches=1)
    data, labels = batches["data_batch_1"]
    # protocol 5: sets and bytearrays have their own opcodes there (protocol 2 names them as globals, refused)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"labels": labels, b"data": data, b"extra": value},
                                                       protocol=5))
    with pytest.raises(DataError, match=pattern) as err:
        read_source(folder)
    assert "data_batch_1" in str(err.value)


def test_unpickler_does_not_let_a_pickle_call_the_ndarray_constructor(tmp_path):
    folder, _ = make_cifar(tmp_path, n_batches=1)
    # protocol 2 opcodes GLOBAL numpy.ndarray, LONG1 2**40, TUPLE1, 'u1', TUPLE2, REDUCE:
    # numpy.ndarray((2**40,), 'u1'), a 1 TiB allocation if the constructor were callable from the pickle
    payload = (b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85X\x02\x00\x00\x00u1\x86R.")
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_1: not a readable CIFAR batch \(TypeError"):
        read_source(folder)


def test_cifar_with_hostile_label_values(tmp_path):
    folder, batches = make_cifar(tmp_path, n_batches=1)
    data, labels = batches["data_batch_1"]
    for bad, pattern in [([0, 1, -1, 0, 1], r"row 2: labels -1 is negative"),
                         ([0, 1, float("nan"), 0, 1], r"row 2: labels nan is not an integer"),
                         ([0, 1, b"2", 0, 1], r"row 2: labels b'2' is not an integer"),
                         ([0, 1, [1, 2], 0, 1], r"row 2: labels \[1, 2\] is not an integer"),
                         ([0, 1, 2**70, 0, 1], r"row 2: labels 1180591620717411303424 is outside"),
                         ([0, 1, True, 0, 1], r"row 2: labels True is not an integer")]:
        write_pickle(folder / "data_batch_1", {b"labels": bad, b"data": data})
        with pytest.raises(DataError, match=pattern):
            read_source(folder)


# --------------------------------------------------------------------------------- no code execution from data

def _unsafe_loads(py: Path) -> list[str]:
    """Calls in `py` that could run code from a file's contents."""
    import ast

    tree = ast.parse(py.read_text(), filename=str(py))
    found = []

    def dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        elif parts:  # a method of a computed value (`Model(...).eval()`): never the builtin of that name
            parts.append("<expr>")
        return ".".join(reversed(parts))

    def keyword(call, name):
        return next((k.value for k in call.keywords if k.arg == name), None)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [dotted(b) for b in node.bases]
            defines_find_class = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
            if any(b.endswith("Unpickler") for b in bases) and not defines_find_class:
                found.append(f"{py}:{node.lineno} Unpickler subclass without find_class")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        where = f"{py}:{node.lineno} {name}"
        if name in {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
                    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                    "marshal.load", "marshal.loads", "shelve.open", "pd.read_pickle", "pandas.read_pickle",
                    "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                    "yaml.full_load_all", "eval", "exec"} or name.endswith("pytorch.load_model"):
            found.append(where)
        elif name == "torch.load":
            weights_only = keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where} without weights_only=True")
        elif name in {"np.load", "numpy.load"}:
            allow = keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} with allow_pickle")
    return found


def test_no_code_execution_from_data_anywhere_in_the_repo():
    """No pickle / marshal / torch.load without weights_only=True / np.load(allow_pickle=...) / yaml.load (only
    safe_load) / eval in the package, the flows, the tasks or the benchmarks; the one unpickler (CIFAR batches)
    restricts find_class. tests/ build hostile pickles on purpose and are not scanned."""
    root = Path(__file__).resolve().parents[1]
    files = [py for folder in ("incompat", "flows", "tasks", "bench") for py in sorted((root / folder).rglob("*.py"))]
    assert any(py.name == "readers.py" for py in files)
    offenders = [hit for py in files for hit in _unsafe_loads(py)]
    assert offenders == []


def test_the_unsafe_load_scanner_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle, torch, yaml, numpy as np\n"
                      "pickle.loads(b'')\n"
                      "torch.load('m.pt')\n"
                      "torch.load('m.pt', weights_only=True)\n"
                      "yaml.load('a: 1')\n"
                      "yaml.safe_load('a: 1')\n"
                      "np.load('x.npy', allow_pickle=True)\n"
                      "np.load('x.npy')\n"
                      "class U(pickle.Unpickler):\n    pass\n"
                      "eval('1')\n"
                      "torch.nn.Linear(1, 1).eval()\n")
    hits = _unsafe_loads(sample)
    assert sorted(int(hit.split(":")[1].split()[0]) for hit in hits) == [2, 3, 5, 7, 9, 11]


def test_parquet_whose_chunk_metadata_aborts_pyarrow_is_a_data_error_not_a_dead_process(tmp_path):
    """A fuzzed Hugging Face parquet (tests/fixtures, found by test_fuzz) whose size-statistics histogram makes
    pyarrow's column-chunk metadata constructor call std::terminate: the reader must refuse it with DataError.
    Run in a child process, so that a regression fails this test instead of killing the suite."""
    import subprocess
    import sys

    fixture = Path(__file__).parent / "fixtures" / "aborting_chunk_metadata.parquet"
    code = ("import sys\nfrom incompat.data import DataError\nfrom incompat.readers import read_source\n"
            "try:\n    read_source(sys.argv[1], on_bad_sample='skip')\n"
            "except DataError as exc:\n    print(exc)\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", code, str(fixture)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 7, (done.returncode, done.stderr[-500:])
    assert "damaged Parquet metadata" in done.stdout and str(fixture) in done.stdout
    assert "terminate called" not in done.stderr  # the child's abort message is not shown to the user


def test_canonical_parquet_with_invalid_utf8_in_a_string_column_names_the_row():
    """A fuzzed canonical file (tests/fixtures, found by fuzzing the canonical seed) whose sample_id bytes are not
    UTF-8: pyarrow raised UnicodeDecodeError out of the reader; it must be a DataError naming file and row."""
    fixture = Path(__file__).parent / "fixtures" / "invalid_utf8_sample_id.parquet"
    for read in (lambda: read_source(fixture), lambda: read_dataset(fixture, verify=True)):
        with pytest.raises(DataError, match=r"row 0: sample_id is not valid UTF-8"):
            read()
