#!/usr/bin/env bash
# Download, HERE (a machine with PyPI access), the wheels that benchmarks/gpu.sh installs on a GPU machine
# without internet: the packages keras==3.15.1 needs that the GPU image lacks, for CPython 3.12 manylinux
# x86_64, into .whl/ at the repository root (git-ignored; pass it to the GPU run as a carried path).
#
#     bash benchmarks/gpu_wheels.sh
#
# The GPU image has jax (+ CUDA plugin), numpy, networkx, scipy, h5py, ml-dtypes, absl-py, pytest, matplotlib,
# rich, packaging. keras 3.15.1 also requires namex and optree; optree requires typing-extensions.
# The script prints keras's Requires-Dist so that a new keras's requirements can be checked by eye.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 typing_extensions==4.16.0)

mkdir -p .whl
# keep .whl/ out of git: it is in .gitignore; add it to the repository's exclude file only where it is not
# ignored already (in a worktree, info/exclude is the main repository's, shared by all worktrees)
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"

echo "wheels in .whl/:"
ls -l .whl/
echo "keras's requirements (each must be one of the wheels above or on the GPU image):"
unzip -p .whl/keras-*.whl '*/METADATA' | grep ^Requires-Dist || true
echo "optree's requirements:"
unzip -p .whl/optree-*.whl '*/METADATA' | grep ^Requires-Dist | grep -v "extra ==" || true
