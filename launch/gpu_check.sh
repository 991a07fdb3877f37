#!/usr/bin/env bash
# One-GPU proof of vp-dist on CUDA/NCCL: nothing is downloaded, at most 8 minutes on an H100.
#
#   bash launch/gpu_check.sh [OUT]                     # OUT defaults to runs/gpu_check
#   WHEELS=/path/to/wheelhouse bash launch/gpu_check.sh OUT   # offline node: install what the image lacks
#   VP_GPU_CHECK_SMOKE=1 bash launch/gpu_check.sh OUT  # CPU smoke run of this script (tiny shapes)
#
# Steps (each with its own timeout; a failure is recorded in the JSON and the next step runs):
#   a. deepspeed --num_gpus 1 launch/pretrain.py, BERT-base shape, bf16, ZeRO-2 then ZeRO-3
#      (parameters partitioned): prune to 50% on a compressed schedule, squeeze, train on;
#      pruned rows zero in every ZeRO state, P+G+O bytes and steady-state peak before/after
#   b. the same in fp16 with DeepSpeed's loss scaler (ZeRO-2)
#   c. dense vs squeezed BERT-large, bf16: launch/bench_squeeze.py (batch 32 x seq 128 with a
#      kernel profile and CUDA-graph eval, rebuilt and frozen, of the MLM model and the encoder alone; under torch.compile at 8 layers;
#      again at batch 128, with VPConfig(pad_ffn=8), head groups, (align=8) and (align=64)), launch/bench_gemm_align.py (the folded
#      FFN's GEMMs at odd widths and rounded up to 8 and 64) and launch/bench_finetune.py (SQuAD
#      shape, seq 384, batches 1 and 16; OOM noted)
#   d. statistics overhead: launch/bench_stats.py (observed vs unobserved steps)
#   e. the suite's GPU tests (tests/test_gpu.py, tests/test_stats_gpu.py, tests/test_fused.py)
# The most telling steps run first (a: bf16 ZeRO-2, c: batch 32, gemm, compile, d, a: ZeRO-3, e, b, ...), so that
# a short budget keeps what matters.
# Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (a Markdown table); logs in OUT/logs/.
# WHEELS=DIR: `launch/offline_wheels.sh DIR` built it on a connected machine; installed here with
# `pip install --no-index --no-deps --target OUT/site` and put first on PYTHONPATH.
# VP_GPU_CHECK_TORCH_ADAM=1 uses torch's AdamW instead of DeepSpeed's FusedAdam (no JIT build).
# VP_GPU_CHECK_BUDGET=S: seconds for the whole check (default 480); steps left when it is spent are
# recorded as skipped. VP_GPU_CHECK_STEPS=a,b: only these steps, in this order (names as in gpu_check.json).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/runs/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [[ -n "${WHEELS:-}" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu_check.sh: WHEELS=$WHEELS holds no .whl files (build them with launch/offline_wheels.sh)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$OUT/site" "${wheels[@]}"
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

args=("$OUT")
if [[ -n "${VP_GPU_CHECK_SMOKE:-}" && "${VP_GPU_CHECK_SMOKE}" != "0" ]]; then
    export DS_ACCELERATOR=cpu
    args+=(--smoke)
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: no CUDA GPU visible to torch (set VP_GPU_CHECK_SMOKE=1 for the CPU smoke run)" >&2
        exit 2
    fi
fi
for module in deepspeed datasets transformers; do
    "$PYTHON" -c "import $module" 2>/dev/null || {
        echo "gpu_check.sh: python cannot import $module: pass WHEELS=DIR (launch/offline_wheels.sh)" >&2; exit 2; }
done
exec "$PYTHON" "$REPO/launch/gpu_check.py" "${args[@]}"
