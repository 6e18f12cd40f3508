"""Scale-out benchmark: a small scenario grid run one at a time vs on a local Dask cluster (2 workers), and the
scheduling overhead per scenario.

    .venv/bin/python bench/bench_grid.py [--subset 2000] [--scenarios paper:100:0-3] [--workers 2]

Overhead per scenario: on each worker process, the time between one scenario's body ending (or the submission,
for its first) and the next one's body starting, plus the time from the last body ending to the flow holding the
results: everything the grid spends that is not a scenario's own work (Prefect task submission, Dask scheduling,
result transfer), averaged over scenarios. A cached rerun is excluded by a fresh output folder per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overhead(summary: dict) -> tuple[float, float, float, float]:
    """(overhead per scenario, the same once a worker is warm, the first scenario's wait per worker, compute)."""
    timing = summary["timing"]
    by_pid: dict[int, list[dict]] = {}
    for t in timing["scenarios"]:
        by_pid.setdefault(t["pid"], []).append(t)
    warm, cold = [], []
    for runs in by_pid.values():
        runs.sort(key=lambda t: t["start"])
        previous_end = timing["submitted"]
        for i, t in enumerate(runs):
            (cold if i == 0 else warm).append(t["start"] - previous_end)
            previous_end = t["end"]
    tail = timing["gathered"] - max(t["end"] for t in timing["scenarios"])
    compute = sum(t["end"] - t["start"] for t in timing["scenarios"])
    n = len(timing["scenarios"])
    # the first task on each worker also pays for everything before it (submission of the whole grid)
    warm_per_scenario = (sum(warm) + tail) / max(1, n - len(cold))
    return (sum(warm) + tail + sum(cold)) / n, warm_per_scenario, sum(cold) / max(1, len(cold)), compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--scenarios", default="paper:100:0-3")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "bench" / "results" / "cache"))
    args = ap.parse_args()
    spec = args.scenarios.rsplit(":", 1)
    lo, _, hi = spec[1].partition("-")
    scenarios = [f"{spec[0]}:{i}" for i in range(int(lo), int(hi or lo) + 1)]

    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    os.chdir(work)
    from tasks.runtime import configure

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    configure(work)
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cache = Path(args.cache)
    params["ingest"].update(source=str(cache / "cifar10-train.parquet") if (cache / "cifar10-train.parquet").exists()
                            else str(ROOT / params["ingest"]["source"]), subset=args.subset, test_source=None)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    from flows.grid import run_grid

    print(f"# grid of {len(scenarios)} scenarios on a {args.subset}-image CIFAR-10 subset, cpu profile, no "
          f"retraining; {os.cpu_count()} cores")
    results = {}
    for label, workers in (("sequential", 1), (f"dask x{args.workers}", args.workers)):
        t0 = time.monotonic()
        summary = run_grid(workers=workers, scenarios=scenarios, out=str(work / label.replace(" ", "")),
                           retrain=False, threads_per_scenario=None if workers > 1 else None)
        wall = time.monotonic() - t0
        per_scenario, warm, first_wait, compute = overhead(summary)
        results[label] = wall
        rss = max(t["max_rss_mib"] for t in summary["timing"]["scenarios"])
        print(f"{label:12s} wall {wall:7.1f} s  scenario compute {compute:7.1f} s  "
              f"overhead per scenario {per_scenario:5.2f} s (warm worker {warm:4.2f} s; first task per worker "
              f"waited {first_wait:5.2f} s)  "
              f"peak RSS of a scenario's process {rss:6.0f} MiB")
    seq, par = results["sequential"], results[f"dask x{args.workers}"]
    print(f"speed-up {seq / par:.2f}x (wall includes starting the flow, ingesting the subset, and for Dask the "
          f"local cluster)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
