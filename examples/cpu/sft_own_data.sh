#!/usr/bin/env bash
# Your own SFT data on CPU: preprocess a jsonl (messages / question+response /
# prompt+completion rows) into a Megatron indexed dataset, then train with SED on it.
#   INPUT=my_sft.jsonl bash examples/cpu/sft_own_data.sh [extra megatron-sed-train flags]
# Without INPUT it writes the synthetic math set as a jsonl first.
set -euo pipefail
source "$(dirname "$0")/../../scripts/_venv.sh"
OUT="${OUT:-runs/own_data}"
mkdir -p "$OUT"
INPUT="${INPUT:-}"
if [ -z "$INPUT" ]; then
  INPUT="$OUT/synthetic_math.jsonl"
  python -m megatron_sed.data.synthetic --output "$INPUT" --num-problems 300
fi
python -m megatron_sed.data.preprocess --input "$INPUT" --output-prefix "$OUT/sft" \
  --tokenizer-type byte --max-seq-length 1024 --overlength truncate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHONWARNINGS=ignore python -m megatron_sed.train \
  --data-path "$OUT/sft" --split 95,5,0 \
  --num-layers 2 --hidden-size 128 --num-attention-heads 4 --position-embedding-type rope \
  --normalization RMSNorm --swiglu --hidden-dropout 0 --attention-dropout 0 \
  --seq-length 256 --max-position-embeddings 256 --micro-batch-size 4 --global-batch-size 8 \
  --train-iters "${TRAIN_ITERS:-30}" \
  --lr 1e-3 --lr-warmup-iters 3 --loss-type sed --sed-mask-ratio 0.3 --sed-calibration-samples 8 \
  --log-interval 5 --eval-interval 15 --eval-iters 2 \
  --save "$OUT/checkpoints" --metrics-file "$OUT/metrics.jsonl" "$@"
