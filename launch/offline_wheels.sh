#!/usr/bin/env bash
# Build, on a machine with network, a wheelhouse of what a CUDA PyTorch image usually lacks for
# vp-dist, for an offline GPU node: then `WHEELS=DIR bash launch/gpu_check.sh OUT` there.
#
#   bash launch/offline_wheels.sh DIR [--python 3.12] [--platform manylinux2014_x86_64]
#
# deepspeed is built from its source distribution with `pip wheel --no-deps` (pure Python: its CUDA
# ops are JIT-built on the GPU node, which has the CUDA toolkit); the others are downloaded as
# binary wheels for the target Python and platform, without their dependencies (torch, numpy,
# transformers, ... come with the image). vp-dist itself is built from this checkout.
set -euo pipefail

usage() { echo "usage: $0 DIR [--python X.Y] [--platform TAG]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
DIR="$1"; shift
PYVER="3.12"
PLATFORM="manylinux2014_x86_64"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --platform) PLATFORM="$2"; shift 2 ;;
        *) usage ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"

TARGET=(--only-binary=:all: --python-version "$PYVER" --platform "$PLATFORM" --platform any)
# pydantic with its dependencies: pydantic-core must be the exact version this pydantic pins
# (with annotated-types, typing-inspection, typing-extensions).
"$PYTHON" -m pip download --dest "$DIR" "${TARGET[@]}" "pydantic>=2"
# The rest without dependencies (numpy, pyarrow, pandas, requests, ... come with the image).
PACKAGES=(hjson datasets dill multiprocess ninja py-cpuinfo msgpack einops)
"$PYTHON" -m pip download --dest "$DIR" --no-deps "${TARGET[@]}" "${PACKAGES[@]}"
"$PYTHON" -m pip wheel --no-deps --wheel-dir "$DIR" deepspeed
"$PYTHON" -m pip wheel --no-deps --wheel-dir "$DIR" "$REPO"
echo "offline_wheels.sh: $(ls "$DIR"/*.whl | wc -l) wheels in $DIR for Python $PYVER ($PLATFORM)"
