#!/usr/bin/env bash
# Build, on a machine with network, a wheelhouse of what a CUDA PyTorch image (e.g. NVIDIA's NGC
# PyTorch) usually lacks for vp-dist, for an offline GPU node; there:
#   WHEELS=DIR bash launch/gpu_check.sh OUT
#
#   bash launch/offline_wheels.sh DIR [--python 3.12] [--platform manylinux2014_x86_64] [--extra "pkg ..."]
#                                     [--image-hf]
#
# - deepspeed: built from its source distribution with `pip wheel --no-deps` (pure Python; its CUDA
#   ops are JIT-built on the GPU node, whose image has the CUDA toolkit; ninja is in the wheelhouse);
# - pydantic with its exact pydantic-core pin (annotated-types, typing-inspection, typing-extensions);
# - hjson, datasets, dill, multiprocess, the Hugging Face stack and DeepSpeed's small dependencies,
#   as binary wheels for the target Python and platform, without dependencies (torch, numpy,
#   pyarrow, pandas, requests ... come with the image);
# - vp-dist itself, from this checkout.
# --image-hf leaves the Hugging Face stack (transformers, tokenizers, huggingface-hub, hf-xet and
# huggingface-hub 2.x's httpx2, httpcore2, truststore) out: the node's image has its own, and a
# newer huggingface-hub carried beside an older image stack can break `import datasets`.
# Each package is pinned to the version installed in this Python where there is one (the versions
# the test suite ran with), else the newest.
set -euo pipefail

usage() { echo "usage: $0 DIR [--python X.Y] [--platform TAG] [--extra \"pkg ...\"]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
DIR="$1"; shift
PYVER="3.12"
PLATFORM="manylinux2014_x86_64"
EXTRA=""
IMAGE_HF=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --platform) PLATFORM="$2"; shift 2 ;;
        --extra) EXTRA="$2"; shift 2 ;;
        --image-hf) IMAGE_HF=1; shift ;;
        *) usage ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"

pinned() {  # "name==installed version" where this Python has the package, else "name"
    for name in "$@"; do
        "$PYTHON" - "$name" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
name = sys.argv[1]
try:
    print(f"{name}=={version(name)}")
except PackageNotFoundError:
    print(name)
PY
    done
}

TARGET=(--only-binary=:all: --python-version "$PYVER" --platform "$PLATFORM" --platform any)
"$PYTHON" -m pip download --dest "$DIR" "${TARGET[@]}" $(pinned pydantic)
# shellcheck disable=SC2086  # EXTRA is a list of names
PACKAGES=(hjson datasets dill multiprocess xxhash fsspec safetensors regex ninja py-cpuinfo msgpack einops $EXTRA)
if [[ "$IMAGE_HF" == 0 ]]; then  # huggingface-hub 2.x needs httpx2 -> httpcore2, truststore
    PACKAGES+=(transformers tokenizers huggingface-hub hf-xet httpx2 httpcore2 truststore)
fi
"$PYTHON" -m pip download --dest "$DIR" --no-deps "${TARGET[@]}" $(pinned "${PACKAGES[@]}")
"$PYTHON" -m pip wheel --no-deps --no-binary deepspeed --wheel-dir "$DIR" $(pinned deepspeed)
"$PYTHON" -m pip wheel --no-deps --wheel-dir "$DIR" "$REPO"
echo "offline_wheels.sh: $(ls "$DIR"/*.whl | wc -l) wheels in $DIR for Python $PYVER ($PLATFORM)"
