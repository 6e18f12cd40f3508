#!/usr/bin/env bash
# The prepared GPU check (issue 26): trainer throughput, a no-sync check, then as many CIFAR-10 paper:100:*
# scenarios with the `gpu` defense profile as fit in the time left, and the pace extrapolated to 24 scenarios.
# Everything lands under $OUT (device_check.log, throughput.csv, defense.csv, summary.csv, device_params.yaml).
#
#   bash bench/device_check.sh            # on the device machine: real CIFAR-10, about 7.5 minutes
#   bash bench/device_check.sh --smoke    # anywhere: synthetic data, tiny models, 1 epoch (tests/test_gpu_path.py)
#   bash bench/device_check.sh --budget 300 --scenarios paper:100:0-3   # other options: bench/device_check.py -h
#
# The device machine gets a copy of the work tree and no internet. Its own python3 holds torch, pyarrow, PyYAML,
# Pillow and tqdm; a carried .venv is used first when it works. It lacks pydantic and annotated-types (the engine
# and incompat/config.py import them): when they are missing, the wheels in $INCOMPAT_WHEELS (default
# bench/results/device_wheels, named in the run's carry) are installed into a temporary folder on PYTHONPATH.
# Made here, once, for the device's Python 3.12 (the versions of .venv):
#   mkdir -p bench/results/device_wheels && cd bench/results/device_wheels && ../../../.venv/bin/python -m pip \
#     download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing_extensions==4.16.0
# CIFAR-10 is looked for in $INCOMPAT_DATA_DIR, ../shared/data/cifar10, shared/data/cifar10, then
# bench/results/device_data/cifar10 (the place to copy it to and name in the run's carry: ../shared does not travel).
# Exit status 3: no usable python, a package missing, or (outside --smoke) no CUDA or no CIFAR-10; the message says
# which. Exit status 1: a phase failed (its traceback is in the log; the other phases still ran).
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

missing_packages() {
    "$python" -c '
import importlib.util
needed = {"torch": "torch", "numpy": "numpy", "pyarrow": "pyarrow", "yaml": "PyYAML", "PIL": "Pillow",
          "tqdm": "tqdm", "annotated_types": "annotated-types", "pydantic": "pydantic"}
print(" ".join(pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None))
'
}

missing=$(missing_packages)
wheels=${INCOMPAT_WHEELS:-bench/results/device_wheels}
if [ -n "$missing" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/device-check-site.XXXXXX)
    echo "device_check: $python lacks: $missing; installing the wheels of $wheels into $site"
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$wheels"/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        missing=$(missing_packages)
    fi
fi
if [ -n "$missing" ]; then
    echo "device_check: $python lacks: $missing (carry them as wheels in $wheels: see the top of this script)" >&2
    exit 3
fi

export PYTHONUNBUFFERED=1
exec "$python" bench/device_check.py --out "$OUT" "$@"
