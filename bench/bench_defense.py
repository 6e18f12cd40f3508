"""End-to-end defense benchmark: poison -> defend -> retrain on what is kept -> evaluate.

Methods per scenario: none (train on everything), oracle (train on the truly clean set), ispl (ISPL+B with the
chosen profile), spectral (spectral signatures), ac (activation clustering), spectre (robust whitening + QUantum
Entropy scores). The baselines read the features of the `none` model, as in their papers. A method's attack is
`neutralised` when its targeted misclassification after retraining is at most max(1%, the oracle's + 0.5 points)
(the oracle must run first in the same invocation); `learned` marks scenarios whose undefended model has TMR >= 10%. Prints a table and appends rows to a CSV as each method finishes, so a
long run that is stopped keeps what it measured.

  .venv/bin/python bench/bench_defense.py --dataset cifar10 --scenarios paper:100:0-23
  .venv/bin/python bench/bench_defense.py --dataset cifar10 --subset 10000 --scenarios paper:100:2 --methods none,ispl
  .venv/bin/python bench/bench_defense.py --dataset gtsrb --scenarios gtsrb   # 4 GTSRB scenarios
  OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/bench_defense.py --threads 1 ...   # on a shared machine
  .venv/bin/python bench/bench_defense.py ... --checkpoints bench/results/checkpoints   # resumable defense
  .venv/bin/python bench/bench_defense.py ... --methods none,ispl,spectral,ac --detect-only   # no retraining
  .venv/bin/python bench/bench_defense.py ... --methods none,oracle,ispl,spectral,ac,spectre --peers-detect-only
  .venv/bin/python bench/bench_defense.py ... --csv bench/results/mine.csv --resume   # go on after a stop
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incompat.attacks import Scenario, Trigger, parse_scenario_spec, poison, triggered_test  # noqa: E402
from incompat.baselines import activation_clustering, spectral_signatures, spectre  # noqa: E402
from incompat.config import load_params, parse_overrides  # noqa: E402
from incompat.data import read_dataset  # noqa: E402
from incompat.evaluation import evaluate, train_and_evaluate  # noqa: E402
from incompat.ispl import run_defense  # noqa: E402
from incompat.metrics import attack_neutralised, detection_confusion  # noqa: E402
from incompat.readers import ingest, subsample_stratified  # noqa: E402
from incompat.steps import load_model, save_model  # noqa: E402
from incompat.training import TensorData, cpu_has_native_bf16, extract_features, fit, resolve_device  # noqa: E402

# Four GTSRB scenarios across sign types, one per trigger kind plus a second pattern, rates 5-20% of the source.
GTSRB_SCENARIOS = [
    Scenario("gtsrb-1to14-pixel-0.05", Trigger("pixel", (5, 20), (250, 10, 200)), 1, 14, rate=0.05, seed=1),
    Scenario("gtsrb-2to38-pattern-0.1", Trigger("pattern", (24, 8), (20, 240, 30)), 2, 38, rate=0.1, seed=2),
    Scenario("gtsrb-12to25-ell-0.2", Trigger("ell", (10, 27), (255, 255, 0)), 12, 25, rate=0.2, seed=3),
    Scenario("gtsrb-13to33-pattern-0.1", Trigger("pattern", (16, 16), (0, 0, 255)), 13, 33, rate=0.1, seed=4),
]

FIELDS = ["dataset", "n_train", "scenario", "method", "poison_total", "poison_removed", "clean_removed",
          "clean_removed_pct", "recall_pct", "asr_before", "asr_after", "tmr_before", "tmr_after", "acc_before",
          "acc_after", "learned", "neutralised",
          "defense_seconds", "epoch_equivalents", "retrain_seconds"]
LEARNED_TMR = 10.0  # percent: the undefended model's TMR from which an attack counts as learned (issue 23)


def neutralised(tmr_after: float | None, oracle_tmr: float | None) -> int | None:
    """1/0 from incompat.metrics.attack_neutralised on the rows' percentages; None without both figures."""
    if tmr_after is None or oracle_tmr is None:
        return None
    return int(attack_neutralised(tmr_after / 100, oracle_tmr / 100))


def load_split(name: str, split: str, cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{name}-{split}.parquet"
    if not out.exists():
        ingest(ROOT.parent / "shared" / "data" / name / f"{split}.parquet", out)
    return read_dataset(out)


def scenario_list(spec: str) -> list[Scenario]:
    if spec == "gtsrb":
        return list(GTSRB_SCENARIOS)
    if spec.startswith("gtsrb:"):  # gtsrb:0,1 picks some of the four
        picked = spec.split(":", 1)[1].split(",")
        if not all(i.isdigit() and int(i) < len(GTSRB_SCENARIOS) for i in picked):
            sys.exit(f"--scenarios {spec!r}: gtsrb:I,J,... takes indices 0-{len(GTSRB_SCENARIOS) - 1} of the "
                     "GTSRB scenarios, e.g. gtsrb:1,3")
        return [GTSRB_SCENARIOS[int(i)] for i in picked]
    scenarios = []
    for part in spec.split(","):
        if part.startswith("paper:") and "-" in part.split(":")[-1]:
            _, seed, ids = part.split(":")
            lo, hi = (int(v) for v in ids.split("-"))
            scenarios += [parse_scenario_spec(f"paper:{seed}:{i}") for i in range(lo, hi + 1)]
        else:
            scenarios.append(parse_scenario_spec(part))
    return scenarios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    ap.add_argument("--scenarios", default="paper:100:0-23")
    ap.add_argument("--methods", default="none,oracle,ispl,spectral,ac,spectre")
    ap.add_argument("--subset", type=int, default=None, help="stratified subset of the training set")
    ap.add_argument("--profile", default=None,
                    help="a name under defense_profiles (default: defense.profile of --params)")
    ap.add_argument("--set", action="append", default=[], help="defense override key=value")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache",
                    help="ingested datasets (<dataset>-<split>.parquet), made from ../shared/data when missing")
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results" / "defense.csv"))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="keep ISPL+B's checkpoints here (one folder per dataset, scenario and profile): a stopped "
                         "benchmark resumes its defense, and a rerun with other refinement or vote parameters "
                         "reuses the weak learners; the folder also gets each scenario's keep-mask and scores, "
                         "and the undefended model, which a resumed run reads instead of training it again")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every training and inference (1 on a shared machine)")
    ap.add_argument("--detect-only", action="store_true",
                    help="measure what each defense removes, without retraining on its kept set (ASR and accuracy "
                         "after stay empty): about a third of the time per scenario, for detection over many "
                         "scenarios; the none model is still trained (or, with --checkpoints and --resume, read "
                         "back), for the baselines' features")
    ap.add_argument("--peers-detect-only", action="store_true",
                    help="measure what the peers (spectral, ac, spectre) remove without retraining on their kept sets: "
                         "issue 23 compares them on detection, and each retraining costs as much as the whole peer")
    ap.add_argument("--resume", action="store_true",
                    help="skip the scenarios whose every method already has a row in --csv (one CSV per profile "
                         "and settings: the rows do not name them), so a benchmark longer than a session goes on")
    args = ap.parse_args()
    if args.detect_only and "oracle" in args.methods.split(","):
        ap.error("--detect-only has nothing to measure for the oracle (it removes exactly the poisons)")

    overrides = parse_overrides(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
        overrides.setdefault("learner_train", {})["threads"] = args.threads
    params = load_params(args.params, profile=args.profile, defense_overrides=overrides)
    args.profile = params.profile
    train_cfg = params.train if not args.threads else dataclasses.replace(params.train, threads=args.threads)
    cache = args.cache
    train_full = load_split(args.dataset, "train", cache)
    test = load_split(args.dataset, "test", cache)
    train_base = subsample_stratified(train_full, args.subset, seed=0) if args.subset else train_full
    methods = args.methods.split(",")
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    done: dict[tuple[str, str, str], dict] = {}  # (n_train, scenario, method) -> the row the CSV already holds
    if not new_file:
        with open(csv_path, newline="") as existing:
            reader = csv.DictReader(existing)
            if reader.fieldnames != FIELDS:
                sys.exit(f"{csv_path} has other columns ({len(reader.fieldnames or [])}); pass --csv NEW_FILE")
            done = {(r["n_train"], r["scenario"], r["method"]): r for r in reader if r["dataset"] == args.dataset}
    rows = []
    # Wall times differ 2-3x between the machine kinds this project has run on: say which one measured them.
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {resolve_device()}, native bf16 {cpu_has_native_bf16()}", flush=True)
    print(f"# {args.dataset}: {len(train_base)} training images, profile {args.profile}, "
          f"defense {json.dumps(dataclasses.asdict(params.defense), default=str)}", flush=True)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
            fh.flush()  # the first row comes only after a training: a second run must not find an empty file
        for scenario in scenario_list(args.scenarios):
            train, poison_mask = poison(train_base, scenario)
            test_trig = triggered_test(test, scenario)
            base = {"dataset": args.dataset, "n_train": len(train), "scenario": scenario.name,
                    "poison_total": int(poison_mask.sum())}
            if args.resume and all((str(len(train)), scenario.name, m) in done for m in methods):
                print(f"# {scenario.name}: every method already in {csv_path}, skipped (--resume)", flush=True)
                continue
            before = None
            oracle_tmr = None

            def retrain(indices, skip=args.detect_only):
                if skip:  # detection only: nothing to evaluate
                    return None, None
                t0 = time.monotonic()
                ev = train_and_evaluate(train, test, train_cfg, indices=indices, test_triggered=test_trig,
                                        target=scenario.target, progress=args.progress)
                return ev, time.monotonic() - t0

            def recorded(method):
                """The CSV's row of a method a stopped run already measured on this scenario (--resume)."""
                return done.get((str(len(train)), scenario.name, method)) if args.resume else None

            def record(method, removed, ev, seconds, defense_seconds=0.0, cost=0.0):
                if recorded(method):  # measured before the stop: one row per method, the first one
                    again = "" if ev is None else (f" (this run: TMR {100 * ev.targeted_misclassification:.2f}%, "
                                                   f"accuracy {100 * ev.clean_accuracy:.2f}%)")
                    print(f"# {scenario.name} {method}: already in {csv_path}, not written again{again}", flush=True)
                    return
                conf = detection_confusion(removed, poison_mask)
                tmr_after = None if ev is None else round(100 * ev.targeted_misclassification, 2)
                tmr_before = None if before is None else round(100 * before.targeted_misclassification, 2)
                row = {**base, "method": method, "poison_removed": conf["poison_removed"],
                       "clean_removed": conf["clean_removed"],
                       "clean_removed_pct": round(100 * conf["clean_removed_fraction"], 2),
                       "recall_pct": round(100 * conf["recall"], 2),
                       "asr_before": None if before is None else round(100 * before.attack_success_rate, 2),
                       "asr_after": None if ev is None else round(100 * ev.attack_success_rate, 2),
                       "tmr_before": tmr_before, "tmr_after": tmr_after,
                       "acc_before": None if before is None else round(100 * before.clean_accuracy, 2),
                       "acc_after": None if ev is None else round(100 * ev.clean_accuracy, 2),
                       "learned": None if tmr_before is None else int(tmr_before >= LEARNED_TMR),
                       "neutralised": neutralised(tmr_after, oracle_tmr),
                       "defense_seconds": round(defense_seconds, 1), "epoch_equivalents": round(cost, 2),
                       "retrain_seconds": None if seconds is None else round(seconds, 1)}
                rows.append(row)
                writer.writerow(row)
                fh.flush()
                print(format_row(row), flush=True)

            nothing = np.zeros(len(train), dtype=bool)
            scenario_dir = (args.checkpoints / f"{args.dataset}-{args.subset or 'full'}" / scenario.name
                            if args.checkpoints else None)
            digest = train.dataset_digest() if scenario_dir is not None else ""  # names what was trained on it
            if any(m in methods for m in ("none", "spectral", "ac", "spectre")):
                before, secs = undefended(train, test, test_trig, scenario, train_cfg, scenario_dir, digest,
                                          reuse=recorded("none") is not None, progress=args.progress)
                record("none", nothing, before, secs)
            if "oracle" in methods:
                prior = recorded("oracle")
                if prior:  # not retrained: its TMR, from the CSV, still judges whether ISPL+B neutralised the attack
                    oracle_tmr = float(prior["tmr_after"]) if prior["tmr_after"] else None
                else:
                    ev, secs = retrain(np.flatnonzero(~poison_mask))
                    oracle_tmr = None if ev is None else round(100 * ev.targeted_misclassification, 2)
                    record("oracle", poison_mask, ev, secs)
            if "ispl" in methods and not recorded("ispl"):
                # learners of other data (another digest) in that folder are discarded
                ckdir = scenario_dir / args.profile if scenario_dir is not None else None
                result = run_defense(train.images, train.labels, train.n_classes,
                                     params.defense.for_classes(train.class_names),
                                     checkpoint_dir=ckdir, progress=args.progress, fingerprint=digest)
                defense_seconds = result.wall_seconds  # includes the time of any checkpointed work it reused
                if ckdir is not None:
                    np.savez(ckdir / "result.npz", keep=result.keep_mask, suspicion=result.suspicion,
                             correct=result.refinement_correct, poison=poison_mask, labels=train.labels)
                ev, secs = retrain(np.flatnonzero(result.keep_mask))
                record("ispl", ~result.keep_mask, ev, secs, defense_seconds,
                       result.meter.epoch_equivalents(len(train)))
            if before is not None and any(m in methods for m in ("spectral", "ac", "spectre")):
                t0 = time.monotonic()
                feats = extract_features(before.model, TensorData(train.images, train.labels))
                feat_seconds = time.monotonic() - t0
                removed_by = {}
                for method, detect in (("spectral", spectral_signatures), ("ac", activation_clustering),
                                       ("spectre", spectre)):
                    if method not in methods or recorded(method):
                        continue
                    t0 = time.monotonic()
                    found = detect(feats, train.labels, train.n_classes)
                    detect_seconds = time.monotonic() - t0 + feat_seconds
                    removed_by[method] = found.remove_mask
                    ev, secs = retrain(np.flatnonzero(~found.remove_mask),
                                       skip=args.detect_only or args.peers_detect_only)
                    # Their cost: the poisoned model's training (counted once) + one inference pass.
                    record(method, found.remove_mask, ev, secs, detect_seconds, train_cfg.epochs + 1 / 3)
                if scenario_dir is not None:  # their removals, beside ISPL+B's result.npz, for later study
                    scenario_dir.mkdir(parents=True, exist_ok=True)
                    np.savez(scenario_dir / "baselines.npz", poison=poison_mask, labels=train.labels,
                             **{f"removed_{m}": mask for m, mask in removed_by.items()})
    print_summary(rows)


def undefended(train, test, test_trig, scenario: Scenario, train_cfg, scenario_dir: Path | None, digest: str,
               reuse: bool, progress: bool = False):
    """The model trained on everything (the `none` row; the baselines read its features) and its training seconds.

    With a checkpoint folder the model is kept there, named by the training data's digest and the settings; when
    its row is already in the CSV (`reuse`, a resumed run) it is read back and evaluated, so the peers read the
    model the table measured and a resumed scenario does not train it again (seconds None)."""
    path = None
    if scenario_dir is not None:
        key = hashlib.sha256(f"{digest}\n{json.dumps(dataclasses.asdict(train_cfg), default=str)}".encode())
        path = scenario_dir / f"none-{key.hexdigest()[:16]}.pt"
    t0 = time.monotonic()
    data = TensorData(train.images, train.labels, num_classes=train.n_classes)
    cfg = train_cfg.for_classes(train.class_names)
    read_back = reuse and path is not None and path.exists()
    if read_back:
        model, _ = load_model(path)
        model = model.to(data.device).to(memory_format=torch.channels_last)
        print(f"# {scenario.name} none: model read back from {path}", flush=True)
    else:
        model = fit(data, cfg, progress=progress)
    ev = evaluate(model, data, test, test_trig, scenario.target, len(train))
    seconds = None if read_back else time.monotonic() - t0  # as train_and_evaluate's: training and evaluation
    if path is not None and not read_back:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path, cfg, train.n_classes, data.image_shape[0], data.mean, data.std)
    return ev, seconds


def _figure(value, spec: str = "6.2f") -> str:
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def format_row(row: dict) -> str:
    return (f"{row['scenario']:32} {row['method']:8} poison {row['poison_removed']:>4}/{row['poison_total']:<4} "
            f"clean-removed {row['clean_removed']:>5} ({row['clean_removed_pct']:5.2f}%) "
            f"ASR {_figure(row['asr_before'])}->{_figure(row['asr_after'])} "
            f"TMR {_figure(row['tmr_before'])}->{_figure(row['tmr_after'])} "
            f"acc {_figure(row['acc_before'])}->{_figure(row['acc_after'])} "
            f"defense {row['defense_seconds']:7.1f}s cost {row['epoch_equivalents']:6.2f} ep-eq")


def print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n# summary per method (median over scenarios; ASR and accuracy over the scenarios that retrained)")
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        retrained = [r for r in sel if r["asr_after"] is not None]
        med = lambda k, rs=sel: float(np.median([r[k] for r in rs])) if rs else None  # noqa: E731
        asr_ok = sum(r["asr_after"] <= 1.0 for r in retrained)
        judged = [r for r in sel if r["neutralised"] is not None]
        learned = [r for r in judged if r["learned"]]
        print(f"{method:8} n={len(sel):2} recall {med('recall_pct'):6.2f}% clean-removed "
              f"{med('clean_removed_pct'):5.2f}% ASR<=1%: {asr_ok}/{len(retrained)} "
              f"neutralised {sum(r['neutralised'] for r in judged)}/{len(judged)} "
              f"(learned attacks {sum(r['neutralised'] for r in learned)}/{len(learned)}) "
              f"acc {_figure(med('acc_after', retrained))} "
              f"defense {med('defense_seconds'):7.1f}s cost {med('epoch_equivalents'):6.2f} ep-eq")


if __name__ == "__main__":
    main()
