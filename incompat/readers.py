"""Ingestion: turn a dataset in one of the supported source layouts into an ImageSet.

Every reader produces uint8 RGB images (N, H, W, 3), int64 labels in 0..n_classes-1, sample ids that are derived
from the source (so a rerun on the same files gives the same ids) and class names.

Formats (`fmt`; "auto" detects them from the path):
    hf-parquet     Hugging Face image parquet: column `img` (or `image`) = struct{bytes, path} (or plain binary),
                   `label` int; class names from the `huggingface` schema metadata. Ids `<file stem>-<row:05d>`.
    canonical      a file written by data.write_dataset (read with digest verification). Ids kept.
    image-folder   root/<class>/<file>.{png,jpg,jpeg,ppm,bmp}, non-recursive; class names = sorted folder names;
                   hidden files/folders (leading '.') and other extensions are ignored. Ids `<class>/<file>`.
    gtsrb          the official GTSRB layout (Final_Training/Images/000NN/*.ppm + GT-000NN.csv, or
                   Final_Test/Images/*.ppm + GT-final_test.csv in Images/ or beside it). The source may be the
                   root, Final_Training or Final_Test (or their Images folder); `split` ("train"/"test") picks
                   one under the root (default: Final_Training when present). Whole images, no ROI crop (as the
                   public 32x32 copies are made). Ids `train/000NN/<file>` and `test/<file>`.
    cifar-batches  torchvision's python batches (cifar-10-batches-py: data_batch_N/test_batch/batches.meta, or
                   cifar-100-python: train/test/meta with fine labels); the source may be that folder or the
                   folder holding it. `split` "train" (default) or "test". Ids `<batch file>:<index>`.
    npz            keys `x` (N,H,W,C uint8, C in 1/3/4), `y` (N ints), optional `class_names` (strings);
                   loaded without pickle. Ids `<file stem>-<row:05d>`.

The source is treated as hostile. Undecodable samples (truncated/zero-byte/non-image bytes, a non-raster format
such as EPS or PDF, a FIFO or other non-regular file, a declared size over `max_pixels`, an image-folder file
name with a control character) fail the read, or with on_bad_sample="skip" are left out and listed in the
returned quarantine (ingest writes it to a JSON file and returns n_skipped). Everything that says the source
itself is wrong always raises DataError naming the file (and row / line): bad labels (out of range, negative,
non-integer, NaN, null, strings), differing image sizes without `image_size`, an empty class folder, a symlink
out of the source folder, a pickle that names a non-array global or holds anything but plain containers,
numbers, str, bytes and numeric arrays, a class name that fails check_class_names (control characters, empty,
too long, duplicated; path separators are allowed because a class name never becomes a path), a sample id
with a control character, a duplicated sample id. A dataset whose decoded pixels exceed the memory budget
(incompat.data.memory_budget) raises DatasetTooLarge before the pixel array is allocated.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import re
import stat
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFile

from incompat.data import (MAX_DATASET_BYTES_ENV, DataError, DatasetTooLarge, ImageSet, check_memory_budget,
                           check_unique_ids, column_batch_rows, read_dataset, write_dataset)
from incompat.files import write_text_atomic

log = logging.getLogger(__name__)

FORMATS = ("hf-parquet", "canonical", "image-folder", "gtsrb", "cifar-batches", "npz")
# 32x32 datasets never come near this; it is there so a forged header cannot make us allocate gigabytes.
DEFAULT_MAX_PIXELS = 4096 * 4096
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".bmp"})
# Only plain raster decoders: PIL's EPS plugin, for one, would hand the file to Ghostscript.
_PIL_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "WEBP", "TIFF")
_MAX_CLASSES = 100_000  # labels without a class list: beyond this it is a corrupt column, not a class count
_HF_BATCH_ROWS = 2048

# The label names of the `huggingface` metadata in ../shared/data/gtsrb/train.parquet, in ClassId order.
GTSRB_CLASS_NAMES = (
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70", "speed limit 80",
    "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for vehicles over 3.5 t", "right of way at next intersection", "priority road", "yield", "stop",
    "no vehicles", "vehicles over 3.5 t prohibited", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing", "beware of ice/snow",
    "wild animals crossing", "end of all speed and passing limits", "turn right ahead", "turn left ahead",
    "ahead only", "go straight or right", "go straight or left", "keep right", "keep left",
    "roundabout mandatory", "end of no passing", "end of no passing by vehicles over 3.5 t",
)

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------- public API

def detect_format(source: str | os.PathLike) -> str:
    """Name the format of `source` (one of FORMATS) from its layout and magic bytes, or raise DataError."""
    path = Path(source)
    if path.is_dir():
        if _cifar_dir(path) is not None:
            return "cifar-batches"
        if _looks_like_gtsrb(path):
            return "gtsrb"
        return "image-folder"
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic == b"PAR1" or (path.suffix.lower() == ".parquet" and magic != b"PK\x03\x04"):
        return _parquet_flavour(path)
    if magic == b"PK\x03\x04" or path.suffix.lower() == ".npz":
        return "npz"
    raise DataError(f"{path}: cannot tell its format (not Parquet, not .npz, not a folder); pass fmt= explicitly")


def read_source(
    source: str | os.PathLike,
    *,
    fmt: str = "auto",
    image_size: tuple[int, int] | None = None,
    on_bad_sample: str = "fail",
    split: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> tuple[ImageSet, list[dict]]:
    """Read `source` into an ImageSet; returns (dataset, quarantine).

    image_size: (H, W) to resize every image to (PIL bilinear); None requires all images to share one size.
    on_bad_sample: "fail" raises DataError at the first undecodable sample; "skip" leaves such samples out and
        describes each in the quarantine list ({source, row | file, sample_id, reason}).
    split: "train" or "test" for gtsrb and cifar-batches (see the module docstring for the defaults).
    progress: called as progress(done, total) while images are decoded.
    """
    path = Path(source)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if on_bad_sample not in ("fail", "skip"):
        raise ValueError(f"on_bad_sample must be 'fail' or 'skip', got {on_bad_sample!r}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None:
        if (len(image_size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in image_size)):
            raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
        image_size = (int(image_size[0]), int(image_size[1]))
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if split is not None and fmt not in ("gtsrb", "cifar-batches"):
        raise ValueError(f"split applies to gtsrb and cifar-batches only, not {fmt}")
    opts = _Options(image_size, on_bad_sample, int(max_pixels), progress)

    # PIL's switches are process-wide; a caller (or a library) may have flipped them, so pin them for this read.
    truncated_before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # PIL warns (UserWarning) about each damaged tag or EXIF block it skips; a damaged image that still
            # decodes is accepted, one that does not is reported by file/row, so the warnings are only noise.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if fmt == "hf-parquet":
                dataset, quarantine = _read_hf_parquet(path, opts)
            elif fmt == "canonical":
                dataset, quarantine = _read_canonical(path, opts), []
            elif fmt == "image-folder":
                dataset, quarantine = _read_image_folder(path, opts)
            elif fmt == "gtsrb":
                dataset, quarantine = _read_gtsrb(path, split, opts)
            elif fmt == "cifar-batches":
                dataset, quarantine = _read_cifar(path, split or "train", opts), []
            else:
                dataset, quarantine = _read_npz(path, opts), []
    except MemoryError:  # the estimates above should prevent it; if not, still one clear line, not a traceback
        raise DatasetTooLarge(f"{path}: ran out of memory while reading it; set {MAX_DATASET_BYTES_ENV} to "
                              "refuse such sources up front") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_before
    check_class_names(dataset.class_names, path)
    _check_sample_ids(dataset.sample_ids, path)
    if quarantine:
        log.warning("%s: skipped %d bad sample(s), first: %s", path, len(quarantine), quarantine[0]["reason"])
    log.info("%s: read %d samples of %s, %d classes (%s)", path, len(dataset), dataset.image_shape,
             dataset.n_classes, fmt)
    return dataset, quarantine


def subsample_stratified(ds: ImageSet, n: int, seed: int) -> ImageSet:
    """A per-class proportional subset of `n` samples, in the original order.

    Class quotas are n * class_count / len rounded by largest remainder; when n >= the number of classes present,
    every present class keeps at least one sample. Within a class the samples with the smallest
    sha256(seed, sample_id) are taken: the choice depends only on the seed and the ids, not on row order or on
    the other classes, and a smaller n picks a subset of a larger n's choice when the quotas allow.
    """
    total = len(ds)
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise DataError(f"subset size must be a positive integer, got {n!r}")
    if n > total:
        raise DataError(f"cannot take a subset of {n} samples from a dataset of {total}")
    if n == total:
        return ds.subset(np.arange(total))
    counts = np.bincount(ds.labels, minlength=ds.n_classes)
    quota = n * counts / total
    alloc = np.floor(quota).astype(np.int64)
    present = counts > 0
    if n >= int(present.sum()):
        alloc[present] = np.maximum(alloc[present], 1)
    # Settle the rounding one sample at a time: classes furthest below (above) their exact quota first, ties by
    # class index, so the result is a pure function of the counts.
    while alloc.sum() < n:
        room = np.where(alloc < counts, quota - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > n:
        excess = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    keys = np.array([hashlib.sha256(f"{seed}\t{sid}".encode()).hexdigest() for sid in ds.sample_ids.astype(str)])
    chosen = []
    for cls in np.flatnonzero(alloc):
        members = np.flatnonzero(ds.labels == cls)
        chosen.append(members[np.argsort(keys[members], kind="stable")[: alloc[cls]]])
    return ds.subset(np.sort(np.concatenate(chosen)))


def ingest(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    fmt: str = "auto",
    subset: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    on_bad_sample: str = "fail",
    quarantine_path: str | os.PathLike | None = None,
    split: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> dict:
    """Read `source`, optionally take a stratified subset, and write the canonical dataset to `out_path`.

    Everything is read and checked before anything is written, and outputs are replaced atomically: on an error
    `out_path` (and the quarantine file) keep whatever they held before. When samples were skipped
    (on_bad_sample="skip") they are described in `quarantine_path` (default `<out_path stem>.quarantine.json`
    beside it), a JSON object {source, format, out_path, dataset_digest, n_read, n_skipped, skipped: [{source,
    row | file, sample_id, reason}, ...]}; a clean run removes a stale quarantine file at that path, so the file
    always describes the latest ingest.

    Returns a summary: source, format, out_path, n_samples, n_classes, class_counts, image_shape, dataset_digest,
    n_read (samples decoded, before `subset`), n_skipped (samples left out as undecodable: the figure for the
    lineage; also stored in the dataset's metadata as ingest.n_skipped), quarantine_path (None when nothing was
    skipped).
    """
    out_path = Path(out_path)
    if fmt == "auto":
        fmt = detect_format(source)
    dataset, quarantine = read_source(source, fmt=fmt, image_size=image_size, on_bad_sample=on_bad_sample,
                                      split=split, max_pixels=max_pixels, progress=progress)
    n_read = len(dataset)
    if subset is not None:
        dataset = subsample_stratified(dataset, subset, seed)
    if quarantine_path is None:
        quarantine_path = out_path.with_name(f"{out_path.stem}.quarantine.json")
    quarantine_path = Path(quarantine_path)
    ingest_meta = {"source": str(source), "format": fmt, "split": split, "n_read": n_read, "subset": subset,
                   "seed": seed, "image_size": list(image_size) if image_size else None,
                   "n_skipped": len(quarantine)}
    digest = write_dataset(dataset, out_path, metadata={"ingest": ingest_meta})
    if quarantine:
        # Written after the dataset, naming its digest: a quarantine file left from an earlier run (a crash
        # between the two writes) is recognisable by a digest that does not match the dataset beside it.
        report = {"source": str(source), "format": fmt, "out_path": str(out_path), "dataset_digest": digest,
                  "n_read": n_read, "n_skipped": len(quarantine), "skipped": quarantine}
        write_text_atomic(quarantine_path, json.dumps(report, indent=1) + "\n")
    elif quarantine_path.exists():
        quarantine_path.unlink()
    counts = dataset.class_counts()
    return {
        "source": str(source),
        "format": fmt,
        "out_path": str(out_path),
        "n_samples": len(dataset),
        "n_classes": dataset.n_classes,
        "class_counts": {name: int(c) for name, c in zip(dataset.class_names, counts)},
        "image_shape": list(dataset.image_shape),
        "dataset_digest": digest,
        "n_read": n_read,
        "n_skipped": len(quarantine),
        "quarantine_path": str(quarantine_path) if quarantine else None,
    }


# ------------------------------------------------------------------------------------------- decoding machinery

@dataclass(frozen=True)
class _Options:
    image_size: tuple[int, int] | None
    on_bad_sample: str
    max_pixels: int
    progress: Progress | None


class _BadSample(Exception):
    """One sample cannot be decoded; the message is the reason."""


def _decode(open_image: Callable[[], Image.Image], image_size: tuple[int, int] | None,
            max_pixels: int) -> np.ndarray:
    try:
        with open_image() as im:
            width, height = im.size
            # Image.open has read only the header: refuse before the decoder allocates anything.
            if width * height > max_pixels:
                raise _BadSample(f"image declares {width}x{height} pixels, over the limit of {max_pixels} "
                                 "(possible decompression bomb); not decoded")
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            if image_size is not None and rgb.size != (image_size[1], image_size[0]):
                rgb = rgb.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except _BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _BadSample(f"refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise _BadSample(f"cannot decode image ({type(exc).__name__}: {exc})") from None


def _open_file(path: Path) -> Callable[[], Image.Image]:
    def opener() -> Image.Image:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO named x.png would block the read forever
            raise _BadSample("not a regular file")
        if st.st_size == 0:
            raise _BadSample("empty file (0 bytes)")
        return Image.open(path, formats=_PIL_FORMATS)
    return opener


def _open_bytes(data) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data), formats=_PIL_FORMATS)


def _missing(reason: str) -> Callable[[], Image.Image]:
    def opener() -> Image.Image:
        raise _BadSample(reason)
    return opener


class _Collector:
    """Decodes samples one by one straight into a preallocated uint8 array (never a list of PIL images)."""

    def __init__(self, capacity: int, source: Path, opts: _Options):
        self.capacity = capacity
        self.source = source
        self.opts = opts
        self.images: np.ndarray | None = None
        if opts.image_size is not None:
            self._allocate((*opts.image_size, 3), "image_size")
        self.first_where = ""
        self.sample_ids: list[str] = []
        self.labels: list[int] = []
        self.quarantine: list[dict] = []
        self.seen = 0

    def add(self, open_image: Callable[[], Image.Image], *, sample_id: str, label: int, where: str,
            locator: dict) -> None:
        self.seen += 1
        if self.opts.progress is not None and (self.seen % 1000 == 0 or self.seen == self.capacity):
            self.opts.progress(self.seen, self.capacity)
        try:
            pixels = _decode(open_image, self.opts.image_size, self.opts.max_pixels)
        except _BadSample as bad:
            if self.opts.on_bad_sample == "fail":
                raise DataError(f"{where}: {bad}") from None
            self.quarantine.append({"source": str(self.source), **locator, "sample_id": sample_id,
                                    "reason": str(bad)})
            return
        if self.images is None:
            self._allocate(pixels.shape, f"the first image, {where}")
            self.first_where = where
        elif pixels.shape != self.images.shape[1:]:
            h, w = pixels.shape[:2]
            fh, fw = self.images.shape[1:3]
            raise DataError(f"{where}: image is {h}x{w} (HxW) but the first image ({self.first_where}) is "
                            f"{fh}x{fw}; pass image_size=(H, W) to resize all images to one size")
        self.images[len(self.sample_ids)] = pixels
        self.sample_ids.append(sample_id)
        self.labels.append(label)

    def _allocate(self, shape: tuple[int, ...], size_from: str) -> None:
        h, w, c = shape
        check_memory_budget(self.capacity * h * w * c, str(self.source),
                            f"{self.capacity:,} images of {h}x{w}x{c}, size from {size_from}")
        self.images = np.empty((self.capacity, h, w, c), dtype=np.uint8)

    def finish(self, class_names: Sequence[str]) -> tuple[ImageSet, list[dict]]:
        n = len(self.sample_ids)
        if n == 0:
            if self.quarantine:
                raise DataError(f"no samples left in {self.source}: all {len(self.quarantine)} were bad "
                                f"(first: {self.quarantine[0]['reason']})")
            raise DataError(f"no samples in {self.source}")
        sample_ids = np.asarray(self.sample_ids, dtype=object)
        check_unique_ids(sample_ids, str(self.source))
        return ImageSet(self.images[:n], np.asarray(self.labels, dtype=np.int64), sample_ids,
                        list(class_names)), self.quarantine


# ------------------------------------------------------------------------------------------------- validation

def _quote(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value)


def _validate_labels(raw, n_classes: int | None, where: Callable[[int], str],
                     column: str) -> tuple[np.ndarray, int]:
    """Labels as int64 in 0..n_classes-1 (n_classes None: max+1); the error names the first bad row."""
    values = np.asarray(raw)
    if values.ndim != 1:
        raise DataError(f"{where(-1)}: {column} must be one-dimensional, got shape {values.shape}")
    shown = values  # what the messages quote: the value as the source holds it, not its float conversion
    if values.dtype.kind == "O":  # a Python list with mixed content (e.g. from a pickle): judge each element
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise DataError(f"{where(i)}: {column} {v!r} is not an integer")
            if isinstance(v, (int, np.integer)) and abs(int(v)) > 2**53:
                raise DataError(f"{where(i)}: {column} {v} is outside the class range")
            out[i] = float(v)
        values = out
    if values.dtype.kind not in "iuf":
        raise DataError(f"{where(-1)}: {column} has type {values.dtype}, expected integers")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.floor(values)))
        if len(bad):
            raise DataError(f"{where(int(bad[0]))}: {column} {_quote(shown[bad[0]])} is not an integer")
    if len(values) and values.min() < 0:
        i = int(np.flatnonzero(values < 0)[0])
        raise DataError(f"{where(i)}: {column} {_quote(shown[i])} is negative")
    limit = n_classes if n_classes is not None else _MAX_CLASSES
    if len(values) and values.max() >= limit:
        i = int(np.flatnonzero(values >= limit)[0])
        if n_classes is not None:
            raise DataError(f"{where(i)}: {column} {int(values[i])} is outside the {n_classes} classes "
                            f"(0..{n_classes - 1})")
        raise DataError(f"{where(i)}: {column} {int(values[i])} is implausibly large for a class index")
    labels = values.astype(np.int64)
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if len(labels) else 0
    return labels, n_classes


# Characters a hostile name could use to rewrite what a terminal, a log line or a report shows: C0/C1 controls
# (TAB, CR, LF and ESC included), DEL, the Unicode line/paragraph separators, the bidirectional overrides and
# isolates ("Trojan source"), and lone surrogates (not encodable as UTF-8).
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
MAX_CLASS_NAME_CHARS = 200


def unsafe_character(text: str) -> str | None:
    """A description of the first character of `text` that the name policy refuses, or None."""
    match = _UNSAFE_TEXT.search(text)
    if match is None:
        return None
    ch = match.group()
    kind = unicodedata.name(ch, "lone surrogate" if 0xD800 <= ord(ch) <= 0xDFFF else "control character")
    return f"U+{ord(ch):04X} ({kind})"


def check_class_names(class_names: Sequence[str], source: str | os.PathLike) -> None:
    """The class-name policy: refuse, never rewrite.

    A class name is display text only: it is stored in the dataset metadata and shown in reports, and no code
    path in incompat builds a file or folder name from it, so path separators, '..' or a drive letter in a name
    are harmless and kept as they are (GTSRB's "beware of ice/snow" has a '/'). Refused with DataError (naming
    the source and the class index): a non-string, an empty or blank name, a name over MAX_CLASS_NAME_CHARS
    characters, a control / bidi-override / line-separator character or a lone surrogate (see _UNSAFE_TEXT),
    and a name that appears twice.
    """
    seen: set[str] = set()
    for index, name in enumerate(class_names):
        if not isinstance(name, str):
            raise DataError(f"{source}: class {index} name {name!r} is not a string")
        if not name.strip():
            raise DataError(f"{source}: class {index} has an empty name")
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise DataError(f"{source}: class {index} name {name[:40]!r}... is {len(name)} characters long "
                            f"(at most {MAX_CLASS_NAME_CHARS})")
        bad = unsafe_character(name)
        if bad is not None:
            raise DataError(f"{source}: class {index} name {name!r} contains {bad}; class names with control "
                            "characters are refused")
        if name in seen:
            raise DataError(f"{source}: class name {name!r} appears twice")
        seen.add(name)


def _check_sample_ids(sample_ids: np.ndarray, source: Path) -> None:
    joined = "".join(sample_ids.tolist())
    if _UNSAFE_TEXT.search(joined) is None:
        return
    for row, sid in enumerate(sample_ids.tolist()):
        bad = unsafe_character(sid)
        if bad is not None:
            raise DataError(f"{source} row {row}: sample id {sid!r} contains {bad}; sample ids with control "
                            "characters are refused (rename the file)")


def _utf8_name(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: name is not valid UTF-8; rename it") from None
    return name


def _inside(root: Path, path: Path) -> Path:
    """`path` resolved, refusing any that leaves `root` (root already resolved) through a symlink or '..'."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{path}: resolves to {resolved}, outside the source folder {root}; refusing to read it")
    return resolved


# ------------------------------------------------------------------------------------------------ HF parquet

def _parquet_flavour(path: Path) -> str:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if b"incompat" in (schema.metadata or {}):
        return "canonical"
    if "img" in schema.names or "image" in schema.names:
        return "hf-parquet"
    raise DataError(f"{path}: Parquet file with neither incompat metadata nor an 'img'/'image' column")


def _hf_class_names(metadata: dict | None, label_column: str, path: Path) -> list[str] | None:
    raw = (metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        feature = info.get("info", {}).get("features", {}).get(label_column)
        names = feature.get("names") if isinstance(feature, dict) else None
    except (ValueError, AttributeError, TypeError):
        raise DataError(f"{path}: the 'huggingface' schema metadata is not the datasets JSON layout") from None
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: class names in the 'huggingface' metadata are not a list of strings")
    return names


def _image_batch_rows(pf, column: str, path: Path) -> int:
    return column_batch_rows(pf, column, path, _HF_BATCH_ROWS)


def _read_hf_parquet(path: Path, opts: _Options) -> tuple[ImageSet, list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        n_rows = pf.metadata.num_rows
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    image_column = "img" if "img" in schema.names else "image" if "image" in schema.names else None
    if image_column is None:
        raise DataError(f"{path}: no 'img' or 'image' column (columns: {schema.names})")
    if "label" not in schema.names:
        raise DataError(f"{path}: no 'label' column (columns: {schema.names})")
    image_type = schema.field(image_column).type
    if pa.types.is_struct(image_type):
        if image_type.get_field_index("bytes") < 0:
            raise DataError(f"{path}: column {image_column!r} is a struct without a 'bytes' field")
        if not (pa.types.is_binary(image_type.field("bytes").type)
                or pa.types.is_large_binary(image_type.field("bytes").type)):
            raise DataError(f"{path}: {image_column}.bytes has type {image_type.field('bytes').type}, "
                            "expected binary")
    elif not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataError(f"{path}: column {image_column!r} has type {image_type}, expected struct{{bytes, path}}")
    if n_rows == 0:
        raise DataError(f"no samples in {path}")
    batch_rows = _image_batch_rows(pf, image_column, path)
    names = _hf_class_names(schema.metadata, "label", path)
    try:
        raw_labels = pf.read(columns=["label"]).column("label")
        raw_labels = raw_labels.to_numpy(zero_copy_only=False) if len(raw_labels) else np.empty(0)
    except Exception as exc:
        raise DataError(f"{path}: cannot read column 'label' ({exc})") from None
    labels, n_classes = _validate_labels(raw_labels, len(names) if names is not None else None,
                                         lambda i: f"{path} row {i}" if i >= 0 else str(path), "label")
    class_names = names if names is not None else [str(c) for c in range(n_classes)]

    collector = _Collector(n_rows, path, opts)
    row = 0
    try:
        batches = pf.iter_batches(batch_size=batch_rows, columns=[image_column])
        for batch in batches:
            column = batch.column(0)
            missing = column.is_null().to_numpy(zero_copy_only=False)
            # flatten(), unlike field(), applies the struct's own offset and nulls to the child.
            blobs = (column.flatten()[column.type.get_field_index("bytes")] if pa.types.is_struct(column.type)
                     else column)
            missing = missing | blobs.is_null().to_numpy(zero_copy_only=False)
            blobs = blobs.cast(pa.large_binary())
            offsets = np.frombuffer(blobs.buffers()[1], dtype=np.int64)[blobs.offset: blobs.offset + len(blobs) + 1]
            data_buffer = blobs.buffers()[2]
            data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
            for i in range(len(blobs)):
                r = row + i
                opener = (_missing("no image bytes (null, or a reference to an external file)") if missing[i]
                          else _open_bytes(data[offsets[i]: offsets[i + 1]]))
                collector.add(opener, sample_id=f"{path.stem}-{r:05d}", label=int(labels[r]),
                              where=f"{path} row {r}", locator={"row": r})
            row += len(blobs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} near row {row}: cannot read column {image_column!r} ({exc})") from None
    if row != n_rows:
        raise DataError(f"{path}: read {row} image rows but the file declares {n_rows}")
    return collector.finish(class_names)


# ------------------------------------------------------------------------------------------------ canonical

def _to_rgb_array(images: np.ndarray) -> np.ndarray:
    channels = images.shape[3]
    if channels == 3:
        return images
    if channels == 1:
        return np.repeat(images, 3, axis=3)
    return np.ascontiguousarray(images[..., :3])  # RGBA: alpha dropped, as PIL's convert("RGB") does


def _resize_array(images: np.ndarray, image_size: tuple[int, int] | None) -> np.ndarray:
    if image_size is None or images.shape[1:3] == tuple(image_size):
        return images
    out = np.empty((len(images), *image_size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((image_size[1], image_size[0]),
                                                        Image.Resampling.BILINEAR))
    return out


def _read_canonical(path: Path, opts: _Options) -> ImageSet:
    dataset = read_dataset(path, verify=True)
    if len(dataset) == 0:
        raise DataError(f"no samples in {path}")
    if dataset.images.shape[3] not in (1, 3, 4):
        raise DataError(f"{path}: images have {dataset.images.shape[3]} channels, expected 1, 3 or 4")
    images = _resize_array(_to_rgb_array(dataset.images), opts.image_size)
    check_unique_ids(dataset.sample_ids, str(path))
    return ImageSet(images, dataset.labels, dataset.sample_ids, dataset.class_names, dataset.extra_metadata)


# --------------------------------------------------------------------------------------------- image folder

def _image_files(folder: Path) -> list[Path]:
    return sorted((f for f in folder.iterdir() if not f.name.startswith(".")
                   and f.suffix.lower() in IMAGE_EXTENSIONS), key=lambda f: f.name)


def _read_image_folder(root: Path, opts: _Options) -> tuple[ImageSet, list[dict]]:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    root_resolved = root.resolve()
    class_dirs = sorted((d for d in root.iterdir() if not d.name.startswith(".") and d.is_dir()),
                        key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    for class_dir in class_dirs:
        _utf8_name(class_dir.name, class_dir)
    # Before any message prints a folder name: a name with an escape sequence must not reach the terminal.
    check_class_names([d.name for d in class_dirs], root)
    entries: list[tuple[int, Path, Path | None]] = []
    for label, class_dir in enumerate(class_dirs):
        _inside(root_resolved, class_dir)
        files = _image_files(class_dir)
        if not files:
            raise DataError(f"{class_dir}: class folder {class_dir.name!r} holds no image files "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        for f in files:
            _utf8_name(f.name, f)
            entries.append((label, f, None if unsafe_character(f.name) else _inside(root_resolved, f)))
    collector = _Collector(len(entries), root, opts)
    for label, f, resolved in entries:
        rel = f"{f.parent.name}/{f.name}"
        if resolved is None:  # a bad sample like an undecodable one; messages show the name escaped
            opener = _missing(f"file name {f.name!r} contains {unsafe_character(f.name)}; rename the file")
            collector.add(opener, sample_id=rel, label=label, where=f"{f.parent}/{f.name!r}",
                          locator={"file": rel})
            continue
        collector.add(_open_file(resolved), sample_id=rel, label=label, where=str(f), locator={"file": rel})
    return collector.finish([d.name for d in class_dirs])


# ------------------------------------------------------------------------------------------------------ GTSRB

_GTSRB_SPLITS = {"Final_Training": "train", "Final_Test": "test"}
_DIGITS = re.compile(r"[0-9]+")


def _looks_like_gtsrb(path: Path) -> bool:
    if path.name == "Images" and path.parent.name in _GTSRB_SPLITS:
        return True
    return path.name in _GTSRB_SPLITS or any((path / name).is_dir() for name in _GTSRB_SPLITS)


def _gtsrb_split_dir(source: Path, split: str | None) -> tuple[str, Path]:
    path = source.parent if source.name == "Images" and source.parent.name in _GTSRB_SPLITS else source
    if path.name in _GTSRB_SPLITS:
        found = _GTSRB_SPLITS[path.name]
        if split is not None and split != found:
            raise DataError(f"{source}: this is the GTSRB {found} folder but split={split!r} was asked for")
        return found, path
    if split is None:
        split = "train" if (path / "Final_Training").is_dir() else "test"
    folder = path / ("Final_Training" if split == "train" else "Final_Test")
    if not folder.is_dir():
        raise DataError(f"{source}: no {folder.name} folder for the GTSRB {split} split")
    return split, folder


def _read_gt_csv(csv_path: Path) -> list[tuple[int, str, int]]:
    """(line number, file name, ClassId) per row of a GTSRB ground-truth CSV."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";")
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"no samples in {csv_path} (the file is empty)") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path} line 1: {exc}") from None
    if "Filename" not in header or "ClassId" not in header:
        hint = (" (GT-final_test.test.csv ships without labels: use GT-final_test.csv from "
                "GTSRB_Final_Test_GT.zip)" if "Filename" in header else "")
        raise DataError(f"{csv_path}: header {header} lacks Filename and ClassId{hint}")
    i_name, i_class = header.index("Filename"), header.index("ClassId")
    rows = []
    try:
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if len(fields) <= max(i_name, i_class):
                raise DataError(f"{csv_path} line {line}: {len(fields)} fields, expected {len(header)}")
            name, class_id = fields[i_name].strip(), fields[i_class].strip()
            # The CSV names a file beside it; anything path-like would let the CSV point anywhere.
            if (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
                    or unsafe_character(name)):
                raise DataError(f"{csv_path} line {line}: Filename {name!r} is not a plain file name")
            if not _DIGITS.fullmatch(class_id) or int(class_id) >= len(GTSRB_CLASS_NAMES):
                raise DataError(f"{csv_path} line {line}: ClassId {class_id!r} is not an integer in "
                                f"0..{len(GTSRB_CLASS_NAMES) - 1}")
            rows.append((line, name, int(class_id)))
    except csv.Error as exc:
        raise DataError(f"{csv_path} line {reader.line_num}: {exc}") from None
    if not rows:
        raise DataError(f"no samples in {csv_path}")
    return rows


def _read_gtsrb(source: Path, split: str | None, opts: _Options) -> tuple[ImageSet, list[dict]]:
    split, split_dir = _gtsrb_split_dir(source, split)
    root = split_dir.resolve()
    images_dir = split_dir / "Images"
    if not images_dir.is_dir():
        raise DataError(f"{split_dir}: no Images folder")
    _inside(root, images_dir)
    entries: list[tuple[str, Path, int, str, dict]] = []  # sample id, file, label, where, locator
    if split == "train":
        class_dirs = sorted((d for d in images_dir.iterdir()
                             if d.is_dir() and _DIGITS.fullmatch(d.name)), key=lambda d: d.name)
        if not class_dirs:
            raise DataError(f"no samples in {images_dir} (no 000NN class folders)")
        for class_dir in class_dirs:
            folder_class = int(class_dir.name)
            if folder_class >= len(GTSRB_CLASS_NAMES):
                raise DataError(f"{class_dir}: class folder number {folder_class} is outside 0..42")
            _inside(root, class_dir)
            csv_path = class_dir / f"GT-{class_dir.name}.csv"
            if not csv_path.is_file():
                raise DataError(f"{class_dir}: no ground-truth file {csv_path.name}")
            for line, name, class_id in _read_gt_csv(_inside(root, csv_path)):
                if class_id != folder_class:
                    raise DataError(f"{csv_path} line {line}: ClassId {class_id} but the file is in class "
                                    f"folder {class_dir.name}")
                rel = f"{class_dir.name}/{name}"
                entries.append((f"train/{rel}", class_dir / name, class_id, f"{class_dir / name}",
                                {"file": rel, "csv": str(csv_path), "line": line}))
    else:
        candidates = [images_dir / "GT-final_test.csv", split_dir / "GT-final_test.csv"]
        csv_path = next((c for c in candidates if c.is_file()), None)
        if csv_path is None:
            hint = (" (GT-final_test.test.csv has no labels: get GT-final_test.csv from GTSRB_Final_Test_GT.zip)"
                    if (images_dir / "GT-final_test.test.csv").exists() else "")
            raise DataError(f"{split_dir}: no GT-final_test.csv in {images_dir} or beside it{hint}")
        for line, name, class_id in _read_gt_csv(_inside(root, csv_path)):
            entries.append((f"test/{name}", images_dir / name, class_id, f"{images_dir / name}",
                            {"file": name, "csv": str(csv_path), "line": line}))
    resolved = [_inside(root, path) for _, path, _, _, _ in entries]
    collector = _Collector(len(entries), split_dir, opts)
    for (sample_id, path, label, where, locator), real in zip(entries, resolved):
        opener = _open_file(real) if real.exists() else _missing("file listed in the CSV does not exist")
        collector.add(opener, sample_id=sample_id, label=label, where=where, locator=locator)
    return collector.finish(GTSRB_CLASS_NAMES)


# -------------------------------------------------------------------------------------------- CIFAR batches

# Pickles run code by design. The batches hold only dicts, lists, bytes, ints and numpy arrays, so the
# unpickler resolves exactly the constructors those need and refuses every other global.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]          # numpy's _reconstruct, wherever this numpy keeps it
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]       # protocol 5 arrays are rebuilt by numpy's _frombuffer
_SCALAR = np.int64(0).__reduce__()[0]               # numpy scalars (labels saved as np.int64)


def _latin1_encode(text, encoding="latin1", *args):
    # Python 3 writes bytes into protocol <= 2 pickles as _codecs.encode(str, "latin1"); any other codec
    # (zlib, bz2, ...) has no business in a dataset file.
    if encoding not in ("latin1", "latin-1") or args or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    # ... and b"" as __builtin__.bytes(); bytes(n) with a forged n would allocate n bytes, so no arguments.
    if args:
        raise pickle.UnpicklingError("bytes() with arguments")
    return b""


class _NdarrayToken:
    """Stands for numpy.ndarray in a pickle: usable as _reconstruct's subtype argument, not callable, so a pickle
    cannot call the ndarray constructor itself (buffer/offset/strides arguments)."""


def _plain_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"{type(dtype).__name__} where a numpy dtype belongs")
    if dtype.kind not in "biufcSU" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"array dtype {dtype!r} (only plain numbers, bytes and str)")
    return dtype


def _checked_reconstruct(subtype, shape, dtype):
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by __setstate__ with the real
    # shape, dtype and bytes; a bigger shape here would only allocate memory.
    if subtype is not _NdarrayToken:
        raise pickle.UnpicklingError(f"array subtype {subtype!r}")
    if not isinstance(shape, tuple) or len(shape) != 1 or not isinstance(shape[0], int) or not 0 <= shape[0] <= 1:
        raise pickle.UnpicklingError(f"array placeholder shape {shape!r}")
    return _RECONSTRUCT(np.ndarray, shape, dtype)


def _checked_dtype(name, align=False, copy=False):
    if not isinstance(name, str) or align not in (0, 1) or copy not in (0, 1):
        raise pickle.UnpicklingError(f"numpy.dtype{(name, align, copy)!r}")
    # copy=True always: numpy's built-in dtypes are singletons, and the pickle's BUILD step that follows would
    # otherwise run __setstate__ on the process-wide np.dtype(name).
    return _plain_dtype(np.dtype(name, bool(align), True))


def _checked_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a non-plain type")
    return _SCALAR(_plain_dtype(dtype), data)


def _checked_frombuffer(buf, dtype, shape, order):
    return _FROMBUFFER(buf, _plain_dtype(dtype), shape, order)


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.multiarray", "scalar"): _checked_scalar,
    ("numpy._core.multiarray", "scalar"): _checked_scalar,
    ("numpy.core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))
_MAX_PICKLE_DEPTH = 8


def _check_plain(obj, path: Path) -> None:
    """Everything a CIFAR pickle yields must be a dict/list/tuple of str, bytes, numbers and plain numeric/bytes
    arrays: what the numpy constructors above could still be made to build (an array whose dtype a later
    __setstate__ turned into objects or records, say) is refused here."""
    stack = [(obj, 0)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, _PLAIN_SCALARS):
            continue
        if isinstance(item, np.ndarray):
            if item.dtype.kind not in "biufcSU" or item.dtype.fields is not None:
                raise DataError(f"{path}: the pickle holds an array of dtype {item.dtype}; only plain numeric, "
                                "bytes and str arrays are accepted")
            continue
        if isinstance(item, np.generic):
            if item.dtype.kind not in "biufcSU":
                raise DataError(f"{path}: the pickle holds a numpy scalar of dtype {item.dtype}")
            continue
        if not isinstance(item, (dict, list, tuple)) or type(item) not in (dict, list, tuple):
            raise DataError(f"{path}: the pickle holds a {type(item).__name__}; only dicts, lists, str, bytes, "
                            "numbers and plain arrays are accepted")
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth >= _MAX_PICKLE_DEPTH:
            raise DataError(f"{path}: the pickle nests containers more than {_MAX_PICKLE_DEPTH} levels deep")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(f"refusing to unpickle {exc} from {path}") from None
    except Exception as exc:  # a damaged pickle can raise nearly anything: EOFError, ValueError, MemoryError...
        raise DataError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, the pickle holds a {type(obj).__name__}")
    _check_plain(obj, path)
    return obj


def _key(batch: dict, key: str, path: Path, required: bool = True):
    # Files from Python 2 have bytes keys (encoding="bytes"); files re-pickled by Python 3 have str keys.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    if required:
        raise DataError(f"{path}: no {key!r} entry (keys: {sorted(map(repr, batch))})")
    return None


def _cifar_dir(path: Path) -> tuple[str, Path] | None:
    """("cifar10" | "cifar100", folder) when `path` is, or directly holds, a torchvision CIFAR folder."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "batches.meta").is_file():
            return "cifar10", folder
        if (folder / "meta").is_file() and ((folder / "train").is_file() or (folder / "test").is_file()):
            return "cifar100", folder
    return None


def _read_cifar(source: Path, split: str, opts: _Options) -> ImageSet:
    found = _cifar_dir(source)
    if found is None:
        raise DataError(f"{source}: not a CIFAR python-batches folder (no batches.meta or meta file)")
    variant, folder = found
    root = source.resolve()
    if variant == "cifar10":
        meta_name, names_key, labels_key = "batches.meta", "label_names", "labels"
        if split == "train":
            numbered = [f for f in folder.iterdir() if re.fullmatch(r"data_batch_[0-9]+", f.name)]
            files = sorted(numbered, key=lambda f: int(f.name.rsplit("_", 1)[1]))
        else:
            files = [folder / "test_batch"] if (folder / "test_batch").exists() else []
    else:
        meta_name, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        files = [folder / split] if (folder / split).exists() else []
    if not files:
        raise DataError(f"{folder}: no {split} batch files")
    # A batch file holds its pixels as raw bytes, so the files' size bounds what they decode to.
    raw_bytes = 0
    for f in files:
        try:
            raw_bytes += _inside(root, f).stat().st_size
        except OSError as exc:
            raise DataError(f"{f}: cannot read ({exc.strerror or exc})") from None
    scale = 1.0 if opts.image_size is None else opts.image_size[0] * opts.image_size[1] / 1024
    check_memory_budget(int(raw_bytes * max(1.0, 1.0 + scale)), str(folder),
                        f"{len(files)} batch file(s) of {raw_bytes:,} bytes, raw and as 32x32 images")
    meta = _load_pickle(_inside(root, folder / meta_name))
    raw_names = _key(meta, names_key, folder / meta_name)
    if not isinstance(raw_names, list) or not all(isinstance(n, (bytes, str)) for n in raw_names):
        raise DataError(f"{folder / meta_name}: {names_key} is not a list of strings")
    try:
        class_names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in raw_names]
    except UnicodeDecodeError:
        raise DataError(f"{folder / meta_name}: {names_key} are not UTF-8") from None

    parts, labels, sample_ids = [], [], []
    for f in files:
        batch = _load_pickle(_inside(root, f))
        data = _key(batch, "data", f)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{f}: 'data' must be a uint8 (N, 3072) array, got {desc}")
        raw_labels = _key(batch, labels_key, f)
        if not (isinstance(raw_labels, list) or (isinstance(raw_labels, np.ndarray) and raw_labels.ndim == 1)):
            raise DataError(f"{f}: {labels_key!r} must be a list of ints, got {type(raw_labels).__name__}")
        if len(raw_labels) != len(data):
            raise DataError(f"{f}: {len(data)} images but {labels_key!r} has {len(raw_labels)} entries")
        if len(data) == 0:
            raise DataError(f"no samples in {f}")
        batch_labels, _ = _validate_labels(np.asarray(raw_labels, dtype=object) if isinstance(raw_labels, list)
                                           else raw_labels, len(class_names),
                                           lambda i, f=f: f"{f} row {i}" if i >= 0 else str(f), labels_key)
        # Rows are channel planes (1024 R, 1024 G, 1024 B), each row-major 32x32.
        parts.append(_resize_array(np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)),
                                   opts.image_size))
        del data, batch
        labels.append(batch_labels)
        sample_ids.extend(f"{f.name}:{i}" for i in range(len(batch_labels)))
        if opts.progress is not None:
            opts.progress(len(sample_ids), len(sample_ids))
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    ids = np.asarray(sample_ids, dtype=object)
    check_unique_ids(ids, str(folder))
    return ImageSet(images, np.concatenate(labels), ids, class_names)


# --------------------------------------------------------------------------------------------------------- npz

_MAX_ARRAY_BYTES = 16 * 2**30  # a forged header could otherwise ask np.load for terabytes


def _npz_header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise DataError(f"{path}: key {key!r} uses .npy format version {version}, expected 1.0 or 2.0")
    if dtype.hasobject:
        raise DataError(f"{path}: key {key!r} holds Python objects (dtype {dtype}); refusing to unpickle them")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise DataError(f"{path}: key {key!r} declares shape {shape} of {dtype}, too large to load")
    return shape, dtype


def _npz_array(zf: zipfile.ZipFile, key: str) -> np.ndarray:
    with zf.open(f"{key}.npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def _read_npz(path: Path, opts: _Options) -> ImageSet:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            for key in ("x", "y"):
                if key not in keys:
                    raise DataError(f"{path}: no key {key!r} (keys: {sorted(keys)})")
            x_shape, x_dtype = _npz_header(zf, "x", path)
            if x_dtype != np.uint8 or len(x_shape) != 4 or x_shape[3] not in (1, 3, 4):
                raise DataError(f"{path}: key 'x' must be uint8 (N, H, W, C) with C in 1/3/4, "
                                f"got {x_dtype} {x_shape}")
            y_shape, y_dtype = _npz_header(zf, "y", path)
            if len(y_shape) != 1 or y_dtype.kind not in "iuf":
                raise DataError(f"{path}: key 'y' must be a 1-D integer array, got {y_dtype} {y_shape}")
            if y_shape[0] != x_shape[0]:
                raise DataError(f"{path}: key 'x' has {x_shape[0]} images but key 'y' has {y_shape[0]} labels")
            if x_shape[0] == 0:
                raise DataError(f"no samples in {path}")
            n, h, w, c = (int(v) for v in x_shape)
            out_h, out_w = opts.image_size or (h, w)
            converted = n * out_h * out_w * 3 if (c != 3 or (out_h, out_w) != (h, w)) else 0
            check_memory_budget(n * h * w * c + converted, str(path),
                                f"key 'x' of {n:,} images of {h}x{w}x{c}"
                                + (f", converted to {out_h}x{out_w}x3" if converted else ""))
            names = None
            if "class_names" in keys:
                n_shape, n_dtype = _npz_header(zf, "class_names", path)
                if len(n_shape) != 1 or n_dtype.kind not in "US":
                    raise DataError(f"{path}: key 'class_names' must be a 1-D string array, "
                                    f"got {n_dtype} {n_shape}")
                raw = _npz_array(zf, "class_names")
                names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw.tolist()]
            x = _npz_array(zf, "x")
            y = _npz_array(zf, "y")
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib and the .npy parser raise many types on damaged input
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    labels, n_classes = _validate_labels(y, len(names) if names is not None else None,
                                         lambda i: f"{path} key 'y'" + (f" row {i}" if i >= 0 else ""), "label")
    class_names = names if names is not None else [str(c) for c in range(n_classes)]
    images = _resize_array(_to_rgb_array(np.ascontiguousarray(x)), opts.image_size)
    del x
    ids = np.asarray([f"{path.stem}-{i:05d}" for i in range(len(labels))], dtype=object)
    return ImageSet(images, labels, ids, class_names)
