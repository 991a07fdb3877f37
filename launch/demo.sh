#!/usr/bin/env bash
# The README's main job: a 2-rank DeepSpeed pre-training of a tiny BERT on the shipped English
# corpus, on CPU, pruned to 50% on a compressed schedule, squeezed and re-partitioned, then a
# short NSP phase; ends with the report (heat map PNG, curves, Markdown) in runs/demo/.
# bash launch/demo.sh [DIR]: the output folder (default: runs/demo in the checkout; DIR is relative
# to where you are) is replaced: a fresh run every time (the same output_dir would resume instead).
# A DIR you give is deleted only when empty or written by an earlier demo (marked .vp_demo); any
# other existing DIR is refused.
set -euo pipefail
if [[ $# -gt 0 ]]; then
    PARENT=$(cd "$(dirname "$1")" 2>/dev/null && pwd) || { echo "demo.sh: no folder $(dirname "$1") (for $1)" >&2; exit 2; }
    OUT=$PARENT/$(basename "$1")
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/demo}
if [[ -e "$OUT" ]]; then
    if [[ $# -eq 0 || ( -d "$OUT" && ( -f "$OUT/.vp_demo" || -z "$(ls -A "$OUT")" ) ) ]]; then
        rm -rf "$OUT"
    else
        echo "demo.sh: $OUT exists and is not an earlier demo's output (no .vp_demo in it); not deleting it: give another DIR" >&2
        exit 2
    fi
fi
mkdir -p "$OUT" && touch "$OUT/.vp_demo"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}   # the interpreter with vp-dist installed (the tests pass their own)
# DeepSpeed's default port 29500 may be held by another job: take a free one unless MASTER_PORT is set.
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
"$PYTHON" -m deepspeed.launcher.runner --num_gpus 2 --master_port "$PORT" launch/pretrain.py \
    --config launch/configs/demo.yaml --output_dir "$OUT"
echo
echo "report:   $OUT/report.md"
echo "heat map: $OUT/sparsity_heatmap.png"
echo "squeezed model masks: $OUT/masks.safetensors"
