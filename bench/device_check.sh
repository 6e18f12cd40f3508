#!/usr/bin/env bash
# The prepared GPU check (issue 26): trainer throughput, a no-sync check, then as many CIFAR-10 paper:100:*
# scenarios with the `gpu` defense profile as fit in the time left, and the pace extrapolated to 24 scenarios.
# Everything lands under $OUT (device_check.log, throughput.csv, defense.csv, summary.csv, device_params.yaml).
#
#   bash bench/device_check.sh            # on the device machine: real CIFAR-10, about 7.5 minutes
#   bash bench/device_check.sh --smoke    # anywhere: synthetic data, tiny models, 1 epoch (tests/test_gpu_path.py)
#   bash bench/device_check.sh --budget 300 --scenarios paper:100:0-3   # other options: bench/device_check.py -h
#
# The device machine gets a copy of the work tree and no internet: nothing is installed here. Its own python3 holds
# torch, pyarrow, PyYAML, Pillow and tqdm; a carried .venv is used first when it works. CIFAR-10 is looked for in
# $INCOMPAT_DATA_DIR, ../shared/data/cifar10, shared/data/cifar10, then bench/results/device_data/cifar10 (the
# place to copy it to and name in the run's carry: ../shared does not travel).
set -u
cd "$(dirname "$0")/.."

if [ -z "${OUT:-}" ]; then
    OUT=bench/results/device_check
    echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT"

python=""
for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "device_check: no python with torch found (tried .venv/bin/python, python3, python)" >&2
    exit 3
fi
missing=$("$python" - <<'EOF'
import importlib.util
needed = {"torch": "torch", "numpy": "numpy", "pyarrow": "pyarrow", "yaml": "PyYAML", "PIL": "Pillow",
          "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "device_check: $python lacks: $missing (carry them as wheels: .library/device/README.md)" >&2
    exit 3
fi

export PYTHONUNBUFFERED=1
exec "$python" bench/device_check.py --out "$OUT" "$@"
