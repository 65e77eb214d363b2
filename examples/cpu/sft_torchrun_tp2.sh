#!/usr/bin/env bash
# SED-SFT on CPU with 2 gloo processes: tensor parallel (TP=2) by default, or data
# parallel with MODE=dp. Same model and data as scripts/demo.sh, fewer iterations.
#   bash examples/cpu/sft_torchrun_tp2.sh            # TP=2
#   MODE=dp bash examples/cpu/sft_torchrun_tp2.sh    # DP=2 (same global batch)
set -euo pipefail
source "$(dirname "$0")/../../scripts/_venv.sh"
MODE="${MODE:-tp}"
OUT="${OUT:-runs/cpu_${MODE}2}"
TP=2; [ "$MODE" = dp ] && TP=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHONWARNINGS=ignore torchrun --standalone --nproc-per-node 2 -m megatron_sed.train \
  --tensor-model-parallel-size "$TP" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2 \
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 \
  --seq-length 256 --max-position-embeddings 256 --micro-batch-size 4 --global-batch-size 16 \
  --train-iters "${TRAIN_ITERS:-40}" --lr 2e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
  --loss-type sed --sed-top-k 2 --sed-threshold 0.5 \
  --synthetic-num-problems 400 --synthetic-cache-dir "$OUT/data" \
  --log-interval 5 --eval-iters 2 --save "$OUT/checkpoints" --save-interval 20 \
  --metrics-file "$OUT/metrics.jsonl" "$@"
