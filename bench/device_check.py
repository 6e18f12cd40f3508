"""The GPU check of issue 26, run by bench/device_check.sh (which picks the python): prints figures, asserts
nothing, and writes under --out:

  throughput.csv      training images/s of incompat.training.fit, one epoch after a warm-up, per model
                      (small_cnn, resnet32, preact_resnet18), the dataset resident on the device as uint8
  device_check.log    everything printed, with the no-sync check (CUDA: synchronisations counted by
                      torch.cuda.set_sync_debug_mode for 4 and for 16 steps per epoch: equal counts = none per step)
  defense.csv         bench/bench_defense.py's rows (none / oracle / ispl per scenario) for as many CIFAR-10
                      scenarios with the `gpu` profile as fit in --budget; the run is stopped at the deadline and
                      keeps its finished rows
  summary.csv         scenarios finished, seconds to the first, the pace after it, and the 24-scenario grid
                      extrapolated from them
  device_params.yaml  the params file the scenarios ran with: params.yaml with the final retraining set to the gpu
                      profile's learner recipe for --retrain-epochs epochs

--smoke: synthetic 32x32 data (10 classes), width-8 models, 1-epoch everything, one scenario: runs on a CPU in
about a minute, so the test suite runs the same code.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_defense import scenario_list  # noqa: E402
from bench_trainer import trainer_throughput  # noqa: E402
from incompat.config import load_params  # noqa: E402
from incompat.data import ImageSet, read_dataset, write_dataset  # noqa: E402
from incompat.readers import ingest  # noqa: E402
from incompat.training import TensorData, TrainConfig, autocast_dtype, fit, resolve_device  # noqa: E402

THROUGHPUT_MODELS = ("small_cnn", "resnet32", "preact_resnet18")
THROUGHPUT_FIELDS = ["model", "device", "dtype", "batch_size", "images", "img_per_s"]
SUMMARY_FIELDS = ["profile", "scenarios_done", "scenarios_asked", "methods", "first_scenario_seconds",
                  "seconds_per_scenario_after", "seconds_for_24", "ispl_median_recall_pct",
                  "ispl_median_clean_removed_pct", "ispl_median_asr_after", "ispl_median_tmr_after",
                  "ispl_median_acc_after"]
DATA_PLACES = ("../shared/data/cifar10", "shared/data/cifar10", "bench/results/device_data/cifar10")
# The smoke run's defense: the gpu profile's algorithm with every count at its floor and a width-8 small CNN.
SMOKE_DEFENSE = ["warmup_epochs=1", "refit_epochs=1", "refit_rounds=1", "core_epochs=1", "refinement_rounds=1",
                 "refinement_epochs=1", "learner_train.model=small_cnn", "learner_train.width=8",
                 "learner_train.batch_size=64"]


class Log:
    """print() to stdout and to the log file, each line stamped with the seconds since the start."""

    def __init__(self, path: Path, start: float):
        self.fh = open(path, "a", buffering=1)
        self.start = start

    def __call__(self, *parts) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.fh.write(line + "\n")


# ------------------------------------------------------------------------------------------------------ data

def synthetic_split(n_per_class: int, seed: int, prefix: str) -> ImageSet:
    """10 learnable classes of 32x32 images (class k brightens one channel in band k), CIFAR-10's shape."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    images = rng.integers(0, 90, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    for k in range(10):
        images[labels == k, 3 * k:3 * k + 3, :, k % 3] += 150
    return ImageSet(images, labels, [f"{prefix}-{i:05d}" for i in range(len(labels))],
                    [f"class{k}" for k in range(10)])


def prepare_cache(cache: Path, smoke: bool, data_dir: Path | None, log: Log) -> None:
    """cache/cifar10-{train,test}.parquet, as bench_defense.load_split reads them: synthetic for --smoke, else
    ingested from the first CIFAR-10 folder found."""
    cache.mkdir(parents=True, exist_ok=True)
    if smoke:
        write_dataset(synthetic_split(60, 0, "train"), cache / "cifar10-train.parquet")
        write_dataset(synthetic_split(20, 1, "test"), cache / "cifar10-test.parquet")
        log("smoke: synthetic data, 600 training and 200 test images of 32x32 in 10 classes")
        return
    places = [data_dir] if data_dir else [Path(os.environ["INCOMPAT_DATA_DIR"])] if os.environ.get(
        "INCOMPAT_DATA_DIR") else [ROOT / p for p in DATA_PLACES]
    found = next((p for p in places if (p / "train.parquet").exists() and (p / "test.parquet").exists()), None)
    if found is None:
        log(f"no CIFAR-10 (train.parquet and test.parquet) in any of {[str(p) for p in places]}: copy "
            f"../shared/data/cifar10 to bench/results/device_data/cifar10 and carry bench/results/device_data")
        sys.exit(3)
    t0 = time.monotonic()
    for split in ("train", "test"):
        ingest(found / f"{split}.parquet", cache / f"cifar10-{split}.parquet")
    log(f"ingested CIFAR-10 from {found} in {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------ throughput

def throughput(train: ImageSet, out: Path, smoke: bool, batch_size: int, log: Log) -> None:
    device = resolve_device()
    data = TensorData(train.images, train.labels, num_classes=train.n_classes)  # uint8, on the device
    n = (len(train) // batch_size) * batch_size  # whole batches only: one batch shape for cuDNN's autotuner
    indices = np.random.default_rng(0).permutation(len(train))[:n]
    rows = []
    for model in THROUGHPUT_MODELS:
        cfg = TrainConfig(model=model, width=8 if smoke else None, batch_size=batch_size, epochs=1, lr=0.1,
                          cpu_bf16=False if smoke else None)
        rate = trainer_throughput(data, indices, cfg)
        dtype = str(autocast_dtype(device, cfg.amp, cfg.cpu_bf16)).replace("torch.", "")
        rows.append({"model": model, "device": device.type, "dtype": dtype, "batch_size": batch_size, "images": n,
                     "img_per_s": round(rate, 1)})
        log(f"throughput {model:16} {rate:10,.0f} img/s ({device.type}, {dtype}, batch {batch_size}, {n} images)")
    with open(out / "throughput.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=THROUGHPUT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def sync_check(train: ImageSet, log: Log) -> None:
    """CUDA only: how many times fit makes the host wait for the GPU, at 4 and at 16 steps per epoch (2 epochs
    each). Equal counts: none happens per step (tests/test_gpu_path.py checks the same on the CPU)."""
    if not torch.cuda.is_available():
        log("sync check: no CUDA here (tests/test_gpu_path.py counts read-backs on the CPU)")
        return
    counts = {}
    for steps in (4, 16):
        data = TensorData(train.images[: 64 * steps], train.labels[: 64 * steps], num_classes=train.n_classes)
        cfg = TrainConfig(model="small_cnn", batch_size=64, epochs=2, lr=0.1)
        fit(data, dataclasses.replace(cfg, epochs=1), progress=False)  # warm-up: cuDNN, allocator
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(data, cfg, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
    verdict = "none per step" if counts[4] == counts[16] else "PER-STEP SYNCS REMAIN"
    log(f"sync check: {counts[4]} synchronisations for 2 epochs of 4 steps, {counts[16]} for 2 epochs of 16 "
        f"steps: {verdict}")


# --------------------------------------------------------------------------------------------------- defense

def write_params(path: Path, profile: str, retrain_epochs: int, smoke: bool) -> None:
    """params.yaml with the final retraining (the `train` group) set to the profile's learner recipe."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    learner = load_params(ROOT / "params.yaml", profile=profile).defense.learner_train
    retrain = dataclasses.replace(learner, epochs=retrain_epochs)
    if smoke:
        retrain = dataclasses.replace(retrain, model="small_cnn", width=8, batch_size=64)
    raw["train"] = retrain.to_dict()
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def complete_scenarios(csv_path: Path, methods: list[str]) -> list[str]:
    if not csv_path.exists():
        return []
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    seen: dict[str, set] = {}
    for r in rows:
        seen.setdefault(r["scenario"], set()).add(r["method"])
    return [s for s, m in seen.items() if set(methods) <= m]


def run_scenarios(args, cache: Path, out: Path, deadline: float, log: Log) -> tuple[dict, str | None]:
    """bench/bench_defense.py in a child process until the scenarios are done or the deadline; returns when each
    scenario finished (seconds since the child started) and what went wrong, if the child failed."""
    params = out / "device_params.yaml"
    write_params(params, args.profile, args.retrain_epochs, args.smoke)
    csv_path = out / "defense.csv"
    csv_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "bench_defense.py"), "--dataset", "cifar10", "--cache", str(cache),
           "--params", str(params), "--profile", args.profile, "--methods", args.methods,
           "--scenarios", args.scenarios, "--csv", str(csv_path)]
    for override in SMOKE_DEFENSE if args.smoke else []:
        cmd += ["--set", override]
    log("defense: " + " ".join(cmd[1:]))
    methods = args.methods.split(",")
    started = time.monotonic()
    finished_at: dict[str, float] = {}
    error = None
    with open(out / "device_check.log", "a") as child_log:
        child = subprocess.Popen(cmd, stdout=child_log, stderr=subprocess.STDOUT, cwd=ROOT)
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            for s in complete_scenarios(csv_path, methods):
                if s not in finished_at:
                    finished_at[s] = time.monotonic() - started
                    log(f"scenario {s} done at {finished_at[s]:.1f}s")
        if child.poll() is None:
            log("deadline reached: stopping the scenario run (finished rows are kept)")
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        elif child.returncode != 0:
            error = f"bench_defense.py exited with status {child.returncode} (its output is above)"
    for s in complete_scenarios(csv_path, methods):
        finished_at.setdefault(s, time.monotonic() - started)
    return finished_at, error


def summarise(args, finished_at: dict, out: Path, log: Log) -> None:
    asked = len(scenario_list(args.scenarios))
    done = sorted(finished_at.values())
    first = done[0] if done else None
    pace = (done[-1] - done[0]) / (len(done) - 1) if len(done) >= 2 else first
    for_24 = None if first is None else first + 23 * pace
    ispl = []
    if (out / "defense.csv").exists():
        with open(out / "defense.csv") as fh:
            ispl = [r for r in csv.DictReader(fh) if r["method"] == "ispl" and r["scenario"] in finished_at]

    def median(key):
        values = [float(r[key]) for r in ispl if r.get(key) not in (None, "")]
        return round(float(np.median(values)), 2) if values else None

    row = {"profile": args.profile, "scenarios_done": len(done), "scenarios_asked": asked, "methods": args.methods,
           "first_scenario_seconds": None if first is None else round(first, 1),
           "seconds_per_scenario_after": None if pace is None else round(pace, 1),
           "seconds_for_24": None if for_24 is None else round(for_24, 1),
           "ispl_median_recall_pct": median("recall_pct"), "ispl_median_clean_removed_pct": median("clean_removed_pct"),
           "ispl_median_asr_after": median("asr_after"), "ispl_median_tmr_after": median("tmr_after"),
           "ispl_median_acc_after": median("acc_after")}
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerow(row)
    if for_24 is None:
        log("extrapolated to 24 scenarios: no scenario finished in the budget, nothing to extrapolate from")
    else:
        log(f"{len(done)} of {asked} scenarios in the budget: the first at {first:.1f}s (start-up included), then "
            f"{pace:.1f}s each; extrapolated to 24 scenarios: {for_24:.0f}s ({for_24 / 60:.1f} min)")


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    start = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="synthetic data, width-8 models, 1 epoch: runs on a CPU")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check; the scenario run is stopped at the deadline (default 440, "
                        "--smoke: no deadline)")
    p.add_argument("--data-dir", type=Path, default=None, help="the folder of CIFAR-10's train/test.parquet")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the full check without CUDA (ResNet-32 on all of CIFAR-10: hours on two cores)")
    p.add_argument("--profile", default="gpu")
    p.add_argument("--scenarios", default=None, help="default paper:100:0-23 (--smoke: paper:100:0)")
    p.add_argument("--methods", default="none,oracle,ispl")
    p.add_argument("--retrain-epochs", type=int, default=15,
                   help="epochs of the final retraining (none / oracle / ispl), with the profile's learner recipe")
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch (default 512, --smoke 32)")
    p.add_argument("--throughput-images", type=int, default=None,
                   help="throughput epoch size (default: the whole training set, --smoke 64)")
    args = p.parse_args(argv)
    args.scenarios = args.scenarios or ("paper:100:0" if args.smoke else "paper:100:0-23")
    budget = args.budget if args.budget is not None else (1e9 if args.smoke else 440.0)
    if args.smoke:
        args.retrain_epochs = 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.log").unlink(missing_ok=True)
    log = Log(out / "device_check.log", start)
    device = resolve_device()
    if device.type != "cuda" and not (args.smoke or args.allow_cpu):
        log("no CUDA device here: the full check is meant for the GPU machine; --smoke runs its code on a CPU "
            "(--allow-cpu forces the full one)")
        return 3
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    log(f"device_check{' (smoke)' if args.smoke else ''}: torch {torch.__version__}, python "
        f"{sys.version.split()[0]}, device {device} ({gpu}), training autocast "
        f"{str(autocast_dtype(device)).replace('torch.', '')}, {torch.get_num_threads()} CPU threads, "
        f"budget {'none' if args.smoke and args.budget is None else f'{budget:.0f}s'}")

    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        cache = Path(tmp) / "cache"
        prepare_cache(cache, args.smoke, args.data_dir, log)
        train = read_dataset(cache / "cifar10-train.parquet")
        if args.throughput_images or args.smoke:
            train_t = train.subset(np.arange(min(len(train), args.throughput_images or 64)))
        else:
            train_t = train
        # One lease, one try: a phase that fails is logged with its traceback and the next one still runs.
        failed = []
        guarded(failed, log, "throughput", throughput, train_t, out, args.smoke,
                args.batch_size or (32 if args.smoke else 512), log)
        guarded(failed, log, "sync check", sync_check, train, log)
        del train, train_t
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the scenarios run in a child process: give it the memory
        finished_at, error = guarded(failed, log, "scenarios", run_scenarios, args, cache, out, start + budget - 5,
                                     log) or ({}, None)
        if error:
            log(error)
            failed.append("scenarios")
        guarded(failed, log, "summary", summarise, args, finished_at, out, log)
    log(f"device_check done{'; FAILED: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


def guarded(failed: list, log: Log, name: str, phase, *args):
    """phase(*args), or None after logging its traceback and adding `name` to `failed`."""
    try:
        return phase(*args)
    except Exception:  # noqa: BLE001 -- reported, and the exit status says so
        import traceback

        log(f"{name} failed:\n{traceback.format_exc()}")
        failed.append(name)
        return None


if __name__ == "__main__":
    sys.exit(main())
