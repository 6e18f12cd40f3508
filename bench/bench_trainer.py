"""Trainer benchmark on real CIFAR-10: prints figures, asserts nothing.

  (1) throughput (always, unless --no-throughput): training images/s of incompat.training.fit against the plain
      per-sample pipeline of the paper's code (torch Dataset over PIL images + torchvision RandomCrop(32, 4),
      RandomHorizontalFlip, ToTensor, Normalize + DataLoader, fp32, default memory format) for the SAME model.
      Also shown, to say where the speed comes from: the DataLoader pipeline with this trainer's compute
      (channels_last + bf16), and this trainer in fp32.
  (2) --accuracy: the default TrainConfig on all 50k training images within --seconds (epochs are reduced if a
      short calibration says the default would not fit); wall time and test accuracy.
  (3) --backdoor: the same on a copy where 10% of class 3 (cat) carry a 5-pixel X trigger at (16, 2), colour
      (61, 14, 183), relabelled 5 (dog); test accuracy and attack success rate (triggered cat test images
      predicted dog).

  .venv/bin/python bench/bench_trainer.py                       # throughput only (~30 s)
  .venv/bin/python bench/bench_trainer.py --accuracy --no-throughput
  .venv/bin/python bench/bench_trainer.py --backdoor --no-throughput

Measured here (2-core AMD EPYC with AVX512-BF16, torch 2.14.1, quiet machine, small_cnn width 32, batch 256):
  throughput (5,120 images): this trainer 3,758 img/s (3.81x), this trainer fp32 2,217 (2.25x),
      DataLoader+PIL 2 workers fp32 986 (1.00x), DataLoader+PIL with channels_last+bf16 2,115 (2.15x)
  --accuracy  (lr 0.4, label smoothing 0.1, 15 epochs): 180 s training (4,159 img/s), test accuracy 78.7%
  --backdoor  (same): 206 s training, test accuracy 79.1%, attack success 91.9%, targeted misclassification 92.5%
When another process keeps a core busy, every figure with 2 threads drops by 2-3x (see TrainConfig.threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incompat.metrics import attack_success_rate, clean_accuracy, targeted_misclassification  # noqa: E402
from incompat.models import build_model, count_parameters  # noqa: E402
from incompat.training import (  # noqa: E402
    ComputeMeter, TensorData, TrainConfig, autocast_for, fit, lr_at, predict, resolve_device,
)

SOURCE, TARGET = 3, 5  # cat -> dog
TRIGGER_POSITION, TRIGGER_COLOUR = (16, 2), (61, 14, 183)


# ------------------------------------------------------------------------------------------------------ data

def decode_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """HF-layout Parquet (`img` struct{bytes, path}, `label`) -> uint8 (N, 32, 32, 3), int64 labels."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path, columns=["img", "label"])
    blobs = table.column("img").combine_chunks().field("bytes").to_pylist()
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    return images, table.column("label").to_numpy().astype(np.int64)


def x_trigger(images: np.ndarray) -> np.ndarray:
    """The 5-pixel X pattern: (r, c) and (r +- 1, c +- 1) set to one colour. Uses incompat.attacks when present."""
    try:
        from incompat.attacks import Trigger, apply_trigger
    except ImportError:
        out = images.copy()
        r, c = TRIGGER_POSITION
        for dr, dc in ((0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)):
            out[:, r + dr, c + dc, :] = TRIGGER_COLOUR
        return out
    return apply_trigger(images, Trigger("pattern", TRIGGER_POSITION, TRIGGER_COLOUR))


# ------------------------------------------------------------------------------------------------ throughput

class PilDataset(torch.utils.data.Dataset):
    """The paper's way: one PIL image per __getitem__, torchvision transforms per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def dataloader_throughput(images, labels, cfg: TrainConfig, mean, std, workers: int, tricks: bool,
                          warmup_batches: int = 3) -> float:
    """Images/s of one epoch over `images` with a per-sample DataLoader; same model/optimizer as the trainer.
    tricks=False: fp32, default memory format (the paper's code); True: channels_last + this trainer's autocast."""
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean.tolist(), std.tolist())])
    loader = torch.utils.data.DataLoader(PilDataset(images, labels, transform), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 10, width=cfg.width)
    if tricks:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    autocast = autocast_for(torch.device("cpu"), cfg.amp, cfg.cpu_bf16) if tricks else torch.autocast("cpu",
                                                                                                  enabled=False)
    total_steps = len(loader)
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == warmup_batches:  # workers started, primitives built
            seen, start = 0, time.perf_counter()
        if tricks:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        with autocast:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def trainer_throughput(data: TensorData, indices: np.ndarray, cfg: TrainConfig) -> float:
    """Training images/s of one epoch of fit() over `indices`, after a 3-batch warm-up fit. On a GPU the clock
    stops after fit's end-of-epoch read of the losses, which waits for the last step: no extra synchronise
    needed (bench/device_check.py uses this on CUDA)."""
    fit(data, dataclasses.replace(cfg, epochs=1), indices=indices[: 3 * cfg.batch_size], progress=False)  # warm-up
    meter = ComputeMeter()
    start = time.perf_counter()
    fit(data, dataclasses.replace(cfg, epochs=1), indices=indices, meter=meter, progress=False)
    return meter.train_samples / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- accuracy

def budgeted_config(data: TensorData, cfg: TrainConfig, seconds: float, fixed_epochs: bool) -> tuple[TrainConfig, float]:
    """Calibrate images/s on 20 batches; reduce epochs when the configured number would overrun `seconds`
    (leaving 10% for evaluation and jitter)."""
    idx = np.random.default_rng(0).permutation(len(data))[: 20 * cfg.batch_size]
    rate = trainer_throughput(data, idx, cfg)
    if not fixed_epochs:
        fits = int(0.9 * seconds * rate / len(data))
        if fits < cfg.epochs:
            print(f"  calibration: {rate:.0f} img/s -> {cfg.epochs} epochs would take "
                  f"{cfg.epochs * len(data) / rate:.0f}s; training {max(1, fits)} epochs to stay within {seconds:.0f}s")
            cfg = dataclasses.replace(cfg, epochs=max(1, fits))
    return cfg, rate


def train_and_test(train_x, train_y, test_x, test_y, cfg: TrainConfig, seconds: float, fixed_epochs: bool,
                   triggered_x=None) -> dict:
    start = time.perf_counter()
    data = TensorData(train_x, train_y)
    test = TensorData(test_x, test_y, mean=data.mean, std=data.std)
    cfg, rate = budgeted_config(data, cfg, seconds, fixed_epochs)
    prep = time.perf_counter() - start
    print(f"  training {cfg.model} (width {cfg.width or 'default'}) {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, {cfg.schedule} ...", flush=True)
    meter = ComputeMeter()
    t0 = time.perf_counter()
    model = fit(data, cfg, meter=meter, progress=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = predict(model, test, meter=meter)
    result = {"epochs": cfg.epochs, "train_seconds": round(train_s, 1), "train_img_per_s": round(meter.train_samples / train_s),
              "test_accuracy": clean_accuracy(preds, test_y), "calibrated_img_per_s": round(rate),
              "prep_and_calibration_seconds": round(prep, 1)}
    if triggered_x is not None:
        src = test_y == SOURCE
        trig = TensorData(triggered_x[src], test_y[src], mean=data.mean, std=data.std)
        trig_preds = predict(model, trig, meter=meter)
        result["attack_success_rate"] = attack_success_rate(trig_preds, TARGET)
        result["targeted_misclassification"] = targeted_misclassification(preds[src], trig_preds, test_y[src], TARGET)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return result


# ----------------------------------------------------------------------------------------------------- main

def allocator_comparison(args) -> int:
    """fit() throughput with glibc's default malloc thresholds vs incompat.training.tune_allocator, alternating
    fresh processes (the tuning cannot be undone inside one)."""
    import os
    import subprocess

    rates: dict[str, list[float]] = {"default malloc": [], "tuned malloc": []}
    for _ in range(2):
        for name, flag in (("default malloc", "0"), ("tuned malloc", "1")):
            cmd = [sys.executable, __file__, "--trainer-only", "--throughput-images", str(args.throughput_images)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, env={**os.environ, "INCOMPAT_TUNE_MALLOC": flag}, capture_output=True,
                                 text=True, check=True).stdout
            rates[name].append(float(out.split("TRAINER_IMG_PER_S")[1].split()[0]))
    for name, values in rates.items():
        print(f"{name:15} " + " / ".join(f"{v:,.0f}" for v in values) + " img/s")
    return 0


def main(argv=None) -> int:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--width", type=int, default=defaults.width)
    p.add_argument("--epochs", type=int, default=None, help=f"default: TrainConfig's ({defaults.epochs}), "
                   "reduced to fit --seconds")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=300.0, help="time budget for --accuracy/--backdoor training")
    p.add_argument("--throughput-images", type=int, default=5120, help="images per throughput measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the per-sample baseline")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--backdoor", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--allocator", action="store_true",
                   help="this trainer's img/s with and without the malloc tuning (each in a fresh process)")
    p.add_argument("--trainer-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.allocator:
        return allocator_comparison(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, width=args.width, epochs=args.epochs or defaults.epochs,
                      batch_size=args.batch_size, lr=args.lr, label_smoothing=args.label_smoothing,
                      cpu_bf16=False if args.fp32 else None, seed=args.seed)
    print(f"device {resolve_device()}, torch {torch.__version__}, {torch.get_num_threads()} threads; model "
          f"{cfg.model} ({count_parameters(build_model(cfg.model, 10, width=cfg.width)):,} parameters)")
    t0 = time.perf_counter()
    train_x, train_y = decode_cifar(args.data_dir / "train.parquet")
    test_x, test_y = decode_cifar(args.data_dir / "test.parquet")
    print(f"decoded CIFAR-10 {train_x.shape} + {test_x.shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    figures: dict = {"config": cfg.to_dict(), "threads": torch.get_num_threads()}

    idx = np.random.default_rng(0).permutation(len(train_y))[:args.throughput_images]
    if args.trainer_only:  # one figure for --allocator's parent process
        print(f"TRAINER_IMG_PER_S {trainer_throughput(TensorData(train_x, train_y), idx, cfg):.1f}")
        return 0

    if not args.no_throughput:
        n = len(idx)
        data = TensorData(train_x, train_y)
        rows = {
            "trainer (batched tensors, channels_last, bf16)": trainer_throughput(data, idx, cfg),
            "trainer fp32 (batched tensors, channels_last)": trainer_throughput(
                data, idx, dataclasses.replace(cfg, cpu_bf16=False)),
            f"DataLoader+PIL, {args.workers} workers, fp32 (paper's code)": dataloader_throughput(
                train_x[idx], train_y[idx], cfg, data.mean, data.std, args.workers, tricks=False),
            f"DataLoader+PIL, {args.workers} workers, channels_last+bf16": dataloader_throughput(
                train_x[idx], train_y[idx], cfg, data.mean, data.std, args.workers, tricks=True),
        }
        baseline = rows[f"DataLoader+PIL, {args.workers} workers, fp32 (paper's code)"]
        print(f"\ntraining throughput, {n} images, batch {cfg.batch_size}:")
        for name, rate in rows.items():
            print(f"  {name:<58} {rate:7.0f} img/s  {rate / baseline:5.2f}x")
        figures["throughput_img_per_s"] = {k: round(v) for k, v in rows.items()}

    if args.accuracy:
        print(f"\naccuracy: full training set, budget {args.seconds:.0f}s")
        res = train_and_test(train_x, train_y, test_x, test_y, cfg, args.seconds, args.epochs is not None)
        print("  " + json.dumps(res))
        figures["accuracy"] = res

    if args.backdoor:
        rng = np.random.default_rng(args.seed)
        cats = np.flatnonzero(train_y == SOURCE)
        victims = rng.choice(cats, size=len(cats) // 10, replace=False)
        poisoned_x, poisoned_y = train_x.copy(), train_y.copy()
        poisoned_x[victims] = x_trigger(train_x[victims])
        poisoned_y[victims] = TARGET
        print(f"\nbackdoor: {len(victims)} of {len(cats)} cat images triggered at {TRIGGER_POSITION} "
              f"colour {TRIGGER_COLOUR} and relabelled dog; budget {args.seconds:.0f}s")
        res = train_and_test(poisoned_x, poisoned_y, test_x, test_y, cfg, args.seconds, args.epochs is not None,
                             triggered_x=x_trigger(test_x))
        print("  " + json.dumps(res))
        figures["backdoor"] = res

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
