#!/usr/bin/env bash
# The README's main job: a 2-rank DeepSpeed pre-training of a tiny BERT on the shipped English
# corpus, on CPU, pruned to 50% on a compressed schedule, squeezed and re-partitioned, then a
# short NSP phase; ends with the report (heat map PNG, curves, Markdown) in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
rm -rf "$OUT"   # a fresh run every time (the same output_dir would resume instead)
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
