"""The trainer: the whole recipe in one file, airbench-style. This is the hot path of the product (a defense run
trains hundreds of small models), so every choice below was measured; the figures, with their dates and commands,
are in docs/results.md ("Speed and memory", "Design choices").

The tricks, in the order a batch meets them:
  1. The dataset lives once, as a uint8 tensor on the device (N, C, H, W in channels_last memory = NHWC bytes).
     No Dataset, no DataLoader, no PIL: a batch is one gather by an index tensor.
  2. Augmentation (pad-4 random crop + horizontal flip, as torchvision's RandomCrop(32, padding=4) +
     RandomHorizontalFlip) is folded into that gather: each sample's source rows/columns are shifted and, for a
     flipped sample, mirrored; pixels that fall into the padding are zeroed (torchvision pads with black). One
     gather on uint8, then one float conversion and one fused normalisation for the whole batch.
  3. channels_last activations and weights: oneDNN's fast convolution path on CPU.
  4. bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), fp16/bf16 autocast on CUDA.
  5. The small CNN pools right after each convolution (conv-pool-BN-ReLU): BN and ReLU see a quarter of the
     pixels (incompat/models.py).
  6. Nesterov SGD with a one-cycle (linear warm-up, linear decay) learning rate set per step.
  7. No host-device round trip per step: the random crops/flips drawn on the CPU generator travel through pinned
     memory without a wait, the losses stay on the device and are read once per epoch, predictions are gathered
     on the device and copied once. On a GPU the host can then queue steps ahead of the kernels.

Why these and not others:
  - channels_last with bf16 autocast is the fastest layout on CPUs with native bf16, and pooling before BN/ReLU
    beats the usual order at the same accuracy; fp32 stays where the CPU has no native bf16 (it is slower there).
  - One process with 2 threads is the fastest single training; models trained side by side (or on a busy
    machine) run faster with 1 thread each, because OpenMP threads wait on a busy core (TrainConfig.threads).
  - Wider nets cost more than their FLOPs suggest, so the small CNN stays at width 32.
  - Batch assembly and augmentation are a few ms against tens of ms for the step: not worth a second process.
  - torch.compile costs a long first step and was not faster; a hand-written maxpool was slower backwards.
  - On CPUs where glibc maps and unmaps the activation buffers on every step, tune_allocator keeps them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Iterator, Literal, Mapping, Sequence, get_args

import annotated_types as at
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from incompat.bounds import (Count, FractionBelowOne, NonNegativeFloat, PositiveFloat, PositiveFraction, Seed,
                             check_declared)
from incompat.models import MODEL_NAMES, build_model

__all__ = [
    "TrainConfig", "TensorData", "ComputeMeter", "TrainingDiverged", "SCHEDULES",
    "fit", "predict_logits", "predict", "per_sample_loss", "extract_features", "resolve_device",
    "cpu_has_native_bf16", "autocast_dtype", "autocast_for", "lr_at", "tune_allocator",
]

Schedule = Literal["onecycle", "cosine", "constant", "step"]
SCHEDULES = get_args(Schedule)
ModelName = Literal[MODEL_NAMES]
Milestone = Annotated[float, at.Interval(gt=0, lt=1)]

# The smallest last (partial) batch that is still trained on; a smaller remainder is dropped for that epoch
# (BatchNorm statistics of 1-3 samples are noise). A subset smaller than this is trained on as one batch.
MIN_LAST_BATCH = 4
# Inference batches of 256-512 were the fastest for small_cnn; 1024 is cache-bound and slower.
DEFAULT_EVAL_BATCH = 512


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite. Callers may retry with a lower learning rate."""


@dataclass
class TrainConfig:
    """One training run. Defaults: the CPU recipe for `small_cnn`, chosen by 8-epoch runs on full CIFAR-10 and
    checked by bench/bench_trainer.py --accuracy (figures: docs/results.md, "Design choices").
    """

    model: ModelName = "small_cnn"
    width: Count | None = None  # None: the model's standard width (small_cnn 32; wider is much slower)
    epochs: Count = 15  # most of the accuracy comes early; 15 fit a full CIFAR-10 training in minutes
    batch_size: Count = 256  # as fast as 128 on CPU; 512 is slower
    lr: PositiveFloat = 0.4  # peak learning rate
    momentum: FractionBelowOne = 0.9
    nesterov: bool = True
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Schedule = "onecycle"  # onecycle (linear up, linear down) | cosine | constant | step
    warmup: FractionBelowOne = 0.2  # fraction of all steps spent ramping the lr up linearly from ~0 to `lr`
    milestones: tuple[Milestone, ...] = (0.5, 0.75)  # "step": multiply the lr by `gamma` at these fractions
    gamma: PositiveFraction = 0.1
    label_smoothing: FractionBelowOne = 0.1
    # Fraction of each batch, highest losses first, left out of the gradient (trimmed loss, as in ITLM and
    # co-teaching's small-loss trick). A few mislabelled or poisoned samples keep a high loss while the bulk is
    # learned, so a model trained this way learns less of them. 0: the plain mean.
    loss_trim: FractionBelowOne = 0.0
    augment: bool = True  # pad-4 random crop + horizontal flip
    # False: crop only. For classes that are mirror images of each other (GTSRB: keep left/right, turn left/right
    # ahead, ...) a flip turns one class's image into the other's while keeping its label (flip_pairs relabels
    # those instead).
    flip: bool = True
    # Classes that are each other's mirror image, as (a, b) pairs: a flipped image of class a is trained as
    # class b and the other way round, so flips stay on for every class without teaching a model that a
    # keep-left sign is a keep-right one. Labels outside the pairs keep their label when flipped. A class is
    # named by its label or by its name in the dataset (["keep right", "keep left"]); names are turned into
    # labels by for_classes() once the dataset is known, so one params.yaml line survives a relabelled dataset.
    flip_pairs: tuple[tuple[int | str, int | str], ...] = ()
    seed: Seed = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # CUDA: autocast to bf16 (fp16 + grad scaling where bf16 is missing)
    # None: bf16 autocast where the CPU has native bf16: about twice the speed at the same accuracy (within seed
    # noise); emulated bf16 on other CPUs is slower than fp32.
    cpu_bf16: bool | None = None
    # torch.set_num_threads during fit (restored after); None leaves the process setting alone. On a quiet
    # machine 2 threads are the fastest single training; when another core is busy, OpenMP threads wait on each
    # other and a training slows down several-fold (a tiny fit, a hundredfold). Many small models side by side,
    # or a shared machine: use 1.
    threads: Count | None = None
    eval_batch_size: Count = DEFAULT_EVAL_BATCH  # for callers' predict(..., batch_size=cfg.eval_batch_size)

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        if isinstance(self.flip_pairs, (list, tuple)):  # YAML gives lists of lists
            self.flip_pairs = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in self.flip_pairs)
        self.validate()

    def validate(self) -> None:
        """Each field against its declaration (incompat.bounds), then the rules that tie fields together."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"train config: {msg}")

        check_declared(self, "train config: ")
        if self.nesterov and self.momentum == 0:
            raise bad("nesterov needs momentum > 0")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise bad(f"milestones must be increasing fractions in (0, 1), got {list(self.milestones)}")
        pairs = self.flip_pairs
        if not isinstance(pairs, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and all(_is_class_ref(c) for c in p) and p[0] != p[1]
                for p in pairs):
            raise bad(f"flip_pairs must be a list of [a, b] pairs of two different classes, each a label >= 0 "
                      f"or a class name, got {pairs!r}")
        seen = [c for p in pairs for c in p]
        if len(seen) != len(set(seen)):
            raise bad(f"flip_pairs: a class can be in one pair only, got {[list(p) for p in pairs]}")
        if self.flip_pairs and not (self.augment and self.flip):
            raise bad("flip_pairs needs augment and flip on (it relabels flipped images)")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @classmethod
    def from_dict(cls, values: Mapping) -> "TrainConfig":
        """Build from a plain mapping (params.yaml). An unknown key is an error that names it."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown train parameter(s) {unknown}; known: {known}")
        return cls(**dict(values))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["flip_pairs"] = [list(p) for p in self.flip_pairs]
        return d

    def for_classes(self, class_names: Sequence[str]) -> "TrainConfig":
        """This config with every class named in flip_pairs turned into its label in `class_names` (itself when
        nothing is named). An unknown name is an error that lists the closest of the dataset's names."""
        if not any(isinstance(c, str) for p in self.flip_pairs for c in p):
            return self
        names = [str(n) for n in class_names]
        position = {n: i for i, n in enumerate(names)}

        def label(c: int | str) -> int:
            if not isinstance(c, str):
                return c
            if c not in position:
                close = difflib.get_close_matches(c, names, n=3, cutoff=0.5)
                hint = f"; closest: {close}" if close else f"; the {len(names)} classes: {names}"
                raise ValueError(f"train config: flip_pairs names the class {c!r}, which the dataset does not "
                                 f"have{hint}")
            return position[c]

        return dataclasses.replace(self, flip_pairs=tuple((label(a), label(b)) for a, b in self.flip_pairs))


def _is_class_ref(c: object) -> bool:
    """A class label (an int >= 0) or a class name (a non-empty string)."""
    if isinstance(c, str):
        return c.strip() != ""
    return isinstance(c, int) and not isinstance(c, bool) and c >= 0


# ------------------------------------------------------------------------------------------------- devices

@functools.cache
def tune_allocator() -> bool:
    """Keep glibc malloc from handing big buffers back to the kernel after every training step.

    A small-CNN step allocates and frees activation buffers of 33.5 MB (batch 256: 256x32x32x32 fp32), just
    above the 32 MiB ceiling of glibc's dynamic mmap threshold: each one is a fresh mmap whose every page is
    faulted in again on first touch. On a CPU without native bf16 (fp32 activations) that made half of the
    training CPU time kernel time. Raising the mmap and trim thresholds keeps those buffers in the heap (the
    gain, measured with bench/bench_trainer.py --allocator: docs/results.md).
    Linux/glibc only; elsewhere (or when the libc has no mallopt, or INCOMPAT_TUNE_MALLOC=0) it does nothing.
    Returns True when applied. Cached: fit() calls it every time, the work happens once per process."""
    if not sys.platform.startswith("linux") or os.environ.get("INCOMPAT_TUNE_MALLOC", "1") == "0":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    # glibc caps the mmap threshold (32 MiB on older 64-bit builds): try a roomy value first, then the cap.
    ok = bool(mallopt(m_mmap_threshold, 256 << 20)) or bool(mallopt(m_mmap_threshold, 32 << 20))
    return ok and bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_top_pad, 64 << 20))


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when available, else CPU. An explicit CUDA device that is missing is an error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
    return device


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, amp: bool = True, cpu_bf16: bool | None = None) -> torch.dtype:
    """The dtype the model body computes in on `device` (torch.float32: no autocast). The one place the choice
    is made, so a test can check it without a GPU.

    CUDA (TrainConfig.amp, default on): bf16 where the GPU has it (Ampere and later: no loss scaling, no
    overflow), else fp16 (fit adds a GradScaler, whose step reads a flag back from the GPU every step).
    CPU (TrainConfig.cpu_bf16): None follows the hardware (bf16 only where oneDNN runs it natively; emulated bf16
    is slower than fp32), True/False force it. Any other device: fp32."""
    if device.type == "cuda":
        if not amp:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        use = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if use else torch.float32
    return torch.float32


def autocast_for(device: torch.device, amp: bool = True, cpu_bf16: bool | None = None):
    """The autocast context for `device` (a no-op one when mixed precision is off): see autocast_dtype."""
    dtype = autocast_dtype(device, amp, cpu_bf16)
    if dtype == torch.float32 or device.type not in ("cuda", "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device` without making the host wait for the GPU. A plain `.to("cuda")` from
    pageable memory synchronises the stream: once per training step (the batch's random crops and flips are
    drawn on the CPU generator) it would stall the host until all queued work is done. A pinned copy is queued
    like a kernel; the caching host allocator keeps the pinned buffer until the copy has run."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------- meter

_METER_LOCK = threading.Lock()  # one lock for all meters: an add is a few nanoseconds, contention is nil


@dataclass
class ComputeMeter:
    """Counts sample passes: `train_samples` forward+backward, `infer_samples` forward only.

    `epoch_equivalents(n)` expresses the total as passes over an n-sample dataset, an inference pass costing a
    third of a training pass (forward ~1/3 of forward+backward). Safe to share between threads; plain
    dataclass fields, so `dataclasses.asdict(meter)` / `ComputeMeter(**d)` round-trip through JSON."""

    train_samples: int = 0
    infer_samples: int = 0
    # Wall time of the work counted here, where the owner records it (run_defense does, so that a run resumed
    # from checkpoints reports the time of the interrupted runs' reused work too, not just its own).
    seconds: float = 0.0

    def add_train(self, n: int) -> None:
        with _METER_LOCK:
            self.train_samples += int(n)

    def add_infer(self, n: int) -> None:
        with _METER_LOCK:
            self.infer_samples += int(n)

    def epoch_equivalents(self, n: int) -> float:
        if n <= 0:
            raise ValueError(f"epoch_equivalents needs a dataset size > 0, got {n}")
        return (self.train_samples + self.infer_samples / 3) / n


# ---------------------------------------------------------------------------------------------------- data

class TensorData:
    """The whole dataset, once, as tensors on one device.

    images: (N, C, H, W) uint8 in channels_last memory: the NHWC bytes of the input, shared with the numpy
            array on CPU (no copy; do not modify that array while this object is in use)
    labels: (N,) int64
    mean, std: per-channel statistics in [0, 1] pixel units (np.float64 (C,)); computed from `images` when not
               given. Pass the training set's values when wrapping a test set.
    `num_classes` defaults to max(label) + 1.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: str | torch.device | None = None,
                 mean: Sequence[float] | np.ndarray | None = None, std: Sequence[float] | np.ndarray | None = None,
                 num_classes: int | None = None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be a 1-D array with one label per image: {labels.shape} labels for "
                             f"{len(images)} images")
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        n, h, w, c = images.shape
        if h < 8 or w < 8:
            raise ValueError(f"images must be at least 8x8 pixels, got {h}x{w}")
        self.device = resolve_device(device)
        self.num_classes = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if n else 0)
        if n and labels.max() >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} is outside num_classes={self.num_classes}")
        nhwc = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self._nhwc = nhwc  # (N, H, W, C) contiguous: the gather below indexes it directly
        self.images = nhwc.permute(0, 3, 1, 2)  # (N, C, H, W) view, channels_last strides
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.mean = self._channel_stat(mean, "mean", c) if mean is not None else None
        self.std = self._channel_stat(std, "std", c) if std is not None else None
        if self.mean is None or self.std is None:
            computed_mean, computed_std = self._compute_stats(nhwc)
            self.mean = computed_mean if self.mean is None else self.mean
            # A constant channel has std 0; dividing by a tiny floor keeps it at 0 instead of NaN.
            self.std = np.maximum(computed_std, 1e-3) if self.std is None else self.std
        if (self.std <= 0).any():
            raise ValueError(f"std must be > 0 in every channel, got {self.std.tolist()}")
        # x_normalised = uint8 * scale + shift, per channel (applied on NHWC, where (C,) broadcasts cheaply)
        self._scale = torch.tensor(1.0 / (255.0 * self.std), dtype=torch.float32, device=self.device)
        self._shift = torch.tensor(-self.mean / self.std, dtype=torch.float32, device=self.device)

    @staticmethod
    def _channel_stat(value, what: str, channels: int) -> np.ndarray:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        if arr.shape != (channels,) or not np.isfinite(arr).all():
            raise ValueError(f"{what} must be {channels} finite per-channel values in [0, 1] pixel units, got "
                             f"{np.asarray(value).tolist()}")
        return arr

    @staticmethod
    def _compute_stats(nhwc: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Exact per-channel mean/std from a 256-bin histogram per channel (faster than float32 sums and free
        of rounding)."""
        c = nhwc.shape[-1]
        if len(nhwc) == 0:
            return np.zeros(c), np.ones(c)
        hist = torch.stack([torch.bincount(nhwc[..., k].reshape(-1), minlength=256) for k in range(c)])
        hist = hist.cpu().numpy().astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        count = hist.sum(1)
        mean = hist @ values / count
        var = np.maximum(hist @ (values * values) / count - mean**2, 0.0)
        return mean / 255.0, np.sqrt(var) / 255.0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)"""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, idx: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None,
              pad: int = 4, flip: bool = True) -> torch.Tensor:
        """Images `idx` (int64 tensor on self.device) as a normalised float32 (B, C, H, W) channels_last batch,
        augmented with a random pad-`pad` crop and (when `flip`) a horizontal flip when `augment` (draws from
        `generator`, a CPU generator, so a seed gives the same batches on every device)."""
        # Measured (batch 256, 2 threads): index_select 0.03 ms vs 0.34 ms for x[idx]; addcmul on NHWC with a
        # (C,) scale 0.57 ms vs 2.2 ms for in-place mul/add with a (1,C,1,1) scale on the channels_last view.
        # Whole batch: 0.6 ms plain, 1.7 ms augmented (a training step of the small CNN is ~60 ms).
        if augment:
            return self.augmented_batch(idx, generator, pad, flip)[0]
        return self._normalised(self._nhwc.index_select(0, idx))

    def augmented_batch(self, idx: torch.Tensor, generator: torch.Generator | None, pad: int = 4,
                        flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """batch(idx, augment=True, ...) and which of its samples were flipped (bool (B,) on self.device)."""
        x, flipped = self._augmented(idx, generator, pad, flip)
        return self._normalised(x), flipped

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self._shift, x, self._scale)  # uint8 -> float32, normalised, (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W) view with channels_last strides

    def _augmented(self, idx: torch.Tensor, generator: torch.Generator | None, pad: int,
                   allow_flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop + flip as one gather: sample b's output pixel (i, j) comes from source pixel
        (i + dy_b, j' + dx_b) with j' = W-1-j when b is flipped, else j; a source outside the image is black.
        Returns the uint8 NHWC batch and the flip mask."""
        b = len(idx)
        n, h, w, c = self._nhwc.shape
        shifts = torch.randint(-pad, pad + 1, (2, b), generator=generator)
        flip = torch.randint(0, 2, (b,), generator=generator).bool() & allow_flip  # drawn either way: same stream
        shifts, flip = _to_device(shifts, self.device), _to_device(flip, self.device)
        ar_h = torch.arange(h, device=self.device)
        ar_w = torch.arange(w, device=self.device)
        rows = ar_h[None, :] + shifts[0][:, None]  # (B, H)
        cols = torch.where(flip[:, None], ar_w.flip(0)[None, :], ar_w[None, :]) + shifts[1][:, None]  # (B, W)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
        flat = (idx[:, None, None] * h + rows.clamp(0, h - 1)[:, :, None]) * w + cols.clamp(0, w - 1)[:, None, :]
        x = self._nhwc.view(n * h * w, c).index_select(0, flat.view(-1)).view(b, h, w, c)
        return x.mul_(inside[..., None]), flip  # uint8 * bool: zero the padding


# ----------------------------------------------------------------------------------------------- schedules

def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    peak = config.lr
    warm = int(round(config.warmup * total_steps))
    if step < warm:
        return peak * (step + 1) / warm
    if config.schedule == "constant":
        return peak
    if config.schedule == "step":
        frac = step / total_steps
        return peak * config.gamma ** sum(frac >= m for m in config.milestones)
    rest = max(1, total_steps - warm)
    progress = (step - warm) / rest  # 0 at the peak, -> 1 at the end
    if config.schedule == "onecycle":  # linear down; the last step still gets a small positive lr
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


# ------------------------------------------------------------------------------------------------ training

def _as_indices(indices, n: int, what: str = "indices") -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"a boolean {what} mask must have one entry per sample ({n}), got {arr.shape}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array (or a boolean mask), got {arr.dtype} {arr.shape}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{what} out of range: min {int(arr.min())}, max {int(arr.max())}, dataset has {n} samples")
    return arr.astype(np.int64)


def _progress_bar(progress: bool | str, total: int, desc: str):
    """A bar on a terminal; without one (DVC, nohup, a Prefect worker) a line every so often."""
    from incompat.progress import progress as make_progress

    return make_progress(progress, total, desc, unit="img", unit_scale=True, dynamic_ncols=True)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


def _mirror_labels(pairs: tuple[tuple[int, int], ...], num_classes: int,
                   device: torch.device) -> torch.Tensor | None:
    """label -> the label of its flipped image (itself outside `pairs`); None when there are no pairs."""
    if not pairs:
        return None
    named = [c for p in pairs for c in p if isinstance(c, str)]
    if named:
        raise ValueError(f"train config: flip_pairs names classes {named}; turn the names into labels with "
                         f"TrainConfig.for_classes(the dataset's class_names) before training")
    beyond = sorted(c for p in pairs for c in p if c >= num_classes)
    if beyond:
        raise ValueError(f"train config: flip_pairs name class(es) {beyond}, but the data has {num_classes} "
                         f"classes (labels 0-{num_classes - 1})")
    mirror = torch.arange(num_classes)
    for a, b in pairs:
        mirror[a], mirror[b] = b, a
    return mirror.to(device)


def fit(data: TensorData, config: TrainConfig, indices: np.ndarray | None = None, model: nn.Module | None = None,
        meter: ComputeMeter | None = None, progress: bool | str = True,
        sample_weights: np.ndarray | None = None) -> nn.Module:
    """Train on `data[indices]` (all samples when None; repeats allowed, e.g. a bootstrap bag; a boolean mask
    is accepted too) and return the model, in eval mode.

    A fresh model (config.model, seeded by config.seed) is built unless `model` is given; a given model is
    trained further in place with a fresh optimizer and a schedule over `config.epochs`. Batches and
    augmentation draw from a torch.Generator seeded by config.seed: the same seed gives bit-identical weights
    on CPU (with the same thread count). `sample_weights` (one per sample of `data`, >= 0) scale each sample's
    loss: batch loss = mean(weight * cross-entropy). Raises TrainingDiverged on a NaN/inf loss, at the end of the
    epoch it occurred in: the hot loop never reads a value back from the device (tests/test_gpu_path.py).
    """
    config.validate()
    tune_allocator()
    idx_np = _as_indices(indices, len(data))
    n = len(idx_np)
    if n == 0:
        raise ValueError("cannot train on an empty set of samples")
    device = data.device if config.device == "auto" else resolve_device(config.device)
    weights_t = None
    if sample_weights is not None:
        w = np.asarray(sample_weights, dtype=np.float32)
        if w.shape != (len(data),):
            raise ValueError(f"sample_weights must have one weight per sample of the data ({len(data)}), "
                             f"got shape {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("sample_weights must be finite and >= 0")
        weights_t = torch.from_numpy(w).to(data.device)

    with _num_threads(config.threads):
        if model is None:
            with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
                torch.manual_seed(config.seed)
                model = build_model(config.model, max(data.num_classes, 1), in_channels=data.image_shape[0],
                                    width=config.width)
        model = model.to(device).to(memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
        use_scaler = device.type == "cuda" and autocast_dtype(device, config.amp) == torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        autocast = autocast_for(device, config.amp, config.cpu_bf16)

        generator = torch.Generator().manual_seed(config.seed)
        idx_all = torch.from_numpy(idx_np).to(data.device)
        mirror = _mirror_labels(config.flip_pairs, data.num_classes, data.device)
        bs = min(config.batch_size, n)
        full, rest = divmod(n, bs)
        steps_per_epoch = full + (1 if rest >= MIN_LAST_BATCH else 0)
        per_epoch = full * bs + (rest if rest >= MIN_LAST_BATCH else 0)
        total_steps = steps_per_epoch * config.epochs
        bar = _progress_bar(progress, per_epoch * config.epochs, f"train {config.model}")
        step = 0
        try:
            for epoch in range(config.epochs):
                order = idx_all[_to_device(torch.randperm(n, generator=generator), data.device)]
                # Each step's loss stays on the device; the host reads them once, at the end of the epoch. A read
                # per step (loss.item(), bool(isfinite)) makes the host wait for the GPU every step, so the next
                # step's kernels are not queued while this one runs. The price: a run that diverges is noticed at
                # the end of its epoch, not at the step (the error still names the first non-finite step).
                step_losses = torch.empty(steps_per_epoch, device=device)
                for s in range(steps_per_epoch):
                    batch_idx = order[s * bs: (s + 1) * bs]
                    y = data.labels[batch_idx]
                    if config.augment:
                        x, flipped = data.augmented_batch(batch_idx, generator, flip=config.flip)
                        if mirror is not None:
                            y = torch.where(flipped, mirror[y], y)
                    else:
                        x = data.batch(batch_idx)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    lr = lr_at(step, total_steps, config)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with autocast:
                        logits = model(x)
                    losses = F.cross_entropy(logits.float(), y, reduction="none",
                                             label_smoothing=config.label_smoothing)
                    if weights_t is not None:
                        losses = losses * weights_t[batch_idx].to(device)
                    if config.loss_trim > 0:
                        kept = max(1, math.ceil((1 - config.loss_trim) * len(losses)))
                        losses = losses.topk(kept, largest=False, sorted=False).values
                    loss = losses.mean()
                    step_losses[s] = loss.detach()
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    step += 1
                    if meter is not None:
                        meter.add_train(len(batch_idx))
                    bar.update(len(batch_idx))
                epoch_losses = step_losses.tolist()  # the epoch's one read from the device
                bad = [i for i, v in enumerate(epoch_losses) if not math.isfinite(v)]
                if bad:
                    first = bad[0]
                    raise TrainingDiverged(
                        f"non-finite training loss ({epoch_losses[first]}) at epoch {epoch + 1}/{config.epochs}, "
                        f"step {first + 1}/{steps_per_epoch} (checked at the end of the epoch), "
                        f"lr {lr_at(epoch * steps_per_epoch + first, total_steps, config):g}, "
                        f"model {config.model}: lower the learning rate")
                if bar.disable is False:
                    bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}",
                                    loss=f"{sum(epoch_losses) / len(epoch_losses):.3f}", refresh=False)
        finally:
            bar.close()
        model.eval()
    return model


# ----------------------------------------------------------------------------------------------- inference

def _forward_batches(model: nn.Module, data: TensorData, indices, batch_size: int | None, meter: ComputeMeter | None,
                     features: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(outputs, labels) per batch: eval mode, no augmentation, inference_mode; the model's mode is restored.

    The body runs under the training autocast (bf16 on this CPU: 1.6-2x faster), the classifier in fp32 on
    the features: logits and the per-sample losses ISPL ranks are then not rounded to bf16's 8-bit mantissa
    (rounded logits make many confident samples tie exactly)."""
    idx_np = _as_indices(indices, len(data))
    device = _model_device(model, data.device)
    batch_size = batch_size or DEFAULT_EVAL_BATCH
    was_training = model.training
    model.eval()
    autocast = autocast_for(device, True, None)
    try:
        with torch.inference_mode():
            idx_all = torch.from_numpy(idx_np).to(data.device)
            for start in range(0, len(idx_np), batch_size):
                batch_idx = idx_all[start: start + batch_size]
                x = data.batch(batch_idx).to(device, non_blocking=True)
                if not hasattr(model, "features"):  # any nn.Module: plain forward
                    with autocast:
                        out = model(x).float()
                else:
                    with autocast:
                        out = model.features(x).float()
                    if not features:
                        out = model.classifier(out)
                if meter is not None:
                    meter.add_infer(len(batch_idx))
                yield out, data.labels[batch_idx].to(device)
    finally:
        model.train(was_training)


def _gathered(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch outputs as one CPU tensor: concatenated where they were computed, then one copy to the host (a
    copy per batch would make the host wait for the GPU after every batch)."""
    return torch.cat(parts).cpu()


def predict_logits(model: nn.Module, data: TensorData, indices: np.ndarray | None = None,
                   meter: ComputeMeter | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Logits (len(indices), num_classes), float32 on the CPU."""
    outs = [out for out, _ in _forward_batches(model, data, indices, batch_size, meter)]
    if not outs:
        return torch.zeros(0, 0)
    return _gathered(outs)


def predict(model: nn.Module, data: TensorData, indices: np.ndarray | None = None, meter: ComputeMeter | None = None,
            batch_size: int | None = None) -> np.ndarray:
    """Predicted classes, int64 (len(indices),)."""
    preds = [out.argmax(1) for out, _ in _forward_batches(model, data, indices, batch_size, meter)]
    return _gathered(preds).numpy().astype(np.int64) if preds else np.zeros(0, dtype=np.int64)


def per_sample_loss(model: nn.Module, data: TensorData, indices: np.ndarray | None = None,
                    meter: ComputeMeter | None = None, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy losses float32, predictions int64) per sample, without augmentation, in eval mode."""
    losses, preds = [], []
    for out, y in _forward_batches(model, data, indices, batch_size, meter):
        losses.append(F.cross_entropy(out, y, reduction="none"))
        preds.append(out.argmax(1))
    if not losses:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return _gathered(losses).numpy().astype(np.float32), _gathered(preds).numpy().astype(np.int64)


def extract_features(model: nn.Module, data: TensorData, indices: np.ndarray | None = None,
                     meter: ComputeMeter | None = None, batch_size: int | None = None) -> np.ndarray:
    """Penultimate-layer activations `model.features(x)`, float32 (len(indices), D)."""
    feats = [out for out, _ in _forward_batches(model, data, indices, batch_size, meter, features=True)]
    if not feats:
        return np.zeros((0, 0), dtype=np.float32)
    return _gathered(feats).numpy().astype(np.float32)
