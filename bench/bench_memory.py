"""Peak memory of ingesting CIFAR-10 (50,000 images) and of reading the result back: prints figures, asserts nothing.

Each step runs in its own fresh Python process, so one step's peak is not another's; the figure is the kernel's
high-water mark of the resident set (VmHWM in /proc/self/status, the same as getrusage's ru_maxrss on Linux),
shown with the process's RSS right after its imports (the part that is Python, numpy, pyarrow and PIL, not data)
and the size of the decoded pixels.

  (1) ingest      incompat.readers.ingest(train.parquet -> canonical Parquet): PNG decoding into one uint8 array,
                  digests, the zstd write
  (2) read        incompat.data.read_dataset(canonical)
  (3) read+verify incompat.data.read_dataset(canonical, verify=True): every sample digest recomputed

  .venv/bin/python bench/bench_memory.py                       # ../shared/data/cifar10/train.parquet
  .venv/bin/python bench/bench_memory.py --source SOURCE [--limit-gib 1] [--json]

Measured here (2 cores, 24 GB, pyarrow's default mimalloc pool, 50,000 32x32 images = 146 MiB of pixels; four
runs): ingest 367-392 MiB peak, read 343 MiB, read+verify 333-350 MiB, each with 69 MiB after the imports: all
under 1 GiB. Before read_dataset streamed the image column (pq.read_table of the whole file): read 760 MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "cifar10" / "train.parquet"

_STEP = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import pyarrow.parquet
    from PIL import Image
    from incompat.data import read_dataset
    from incompat.readers import ingest

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

    after_imports = status("VmRSS")
    step, source, out = sys.argv[2:5]
    start = time.perf_counter()
    if step == "ingest":
        summary = ingest(source, out)
        n, pixels = summary["n_samples"], summary["n_samples"] * int(np.prod(summary["image_shape"]))
    else:
        ds = read_dataset(out, verify=(step == "read+verify"))
        n, pixels = len(ds), ds.images.nbytes
    print(json.dumps({"step": step, "seconds": time.perf_counter() - start, "n_samples": n, "pixels": pixels,
                      "after_imports": after_imports, "peak": status("VmHWM"),
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="what to ingest (default: %(default)s)")
    parser.add_argument("--limit-gib", type=float, default=1.0, help="the figure to compare against (1 GiB)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not Path(args.source).exists():
        print(f"bench_memory: {args.source} does not exist", file=sys.stderr)
        return 1
    limit = args.limit_gib * 2**30
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        out = str(Path(tmp) / "train.parquet")
        for step in ("ingest", "read", "read+verify"):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _STEP, str(ROOT), step, args.source, out],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"bench_memory: step {step} failed:\n{done.stderr}", file=sys.stderr)
                return 1
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures["wall_seconds"] = time.perf_counter() - t0
            results.append(figures)
    if args.json:
        print(json.dumps({"source": args.source, "limit_bytes": limit, "steps": results}, indent=2))
        return 0
    print(f"source {args.source}: {results[0]['n_samples']:,} images, {_mib(results[0]['pixels'])} of pixels")
    print(f"{'step':12} {'peak RSS':>10} {'after imports':>14} {'peak - imports':>15} {'seconds':>8}  "
          f"under {args.limit_gib:g} GiB")
    for r in results:
        print(f"{r['step']:12} {_mib(r['peak']):>10} {_mib(r['after_imports']):>14} "
              f"{_mib(r['peak'] - r['after_imports']):>15} {r['seconds']:8.1f}  "
              f"{'yes' if r['peak'] < limit else 'NO'}")
    print(f"(peak RSS = VmHWM of a fresh process per step; this process: "
          f"{_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
