#!/bin/bash
# Patched Megatron-LM's pretrain_gpt.py with --loss-type sed on one GPU node: a tiny
# GPT on Megatron's mock data, to check a patched checkout end to end.
#
#   scripts/apply_megatron_patch.sh "$MEGATRON_LM_DIR"
#   MEGATRON_LM_DIR=/path/Megatron-LM bash examples/megatron_lm/pretrain_gpt_sed_tiny.sh [extra flags]
#
# Knobs: MEGATRON_LM_DIR (required), GPUS (8), TP (1), TRAIN_ITERS (50), SED_THRESHOLD (0.9),
# SED_COEF (1.0), RUN_DIR (./runs/mlm-sed-tiny). The log shows `sed mask rate`, `entropy`,
# `target prob`, ... next to `lm loss`; TensorBoard gets the same scalars.
set -euo pipefail
: "${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout patched by scripts/apply_megatron_patch.sh}"
GPUS="${GPUS:-8}"; TP="${TP:-1}"; TRAIN_ITERS="${TRAIN_ITERS:-50}"
SED_THRESHOLD="${SED_THRESHOLD:-0.9}"; SED_COEF="${SED_COEF:-1.0}"
RUN_DIR="${RUN_DIR:-$PWD/runs/mlm-sed-tiny}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --nproc-per-node "$GPUS" "$MEGATRON_LM_DIR/pretrain_gpt.py" \
  --tensor-model-parallel-size "$TP" \
  --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 512 \
  --max-position-embeddings 512 --micro-batch-size 4 --global-batch-size $((GPUS / TP * 4)) \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5 --train-iters "$TRAIN_ITERS" \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --bf16 \
  --log-interval 5 --eval-interval 25 --eval-iters 2 \
  --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 25 \
  --tensorboard-dir "$RUN_DIR/tensorboard" \
  --loss-type sed --sed-threshold "$SED_THRESHOLD" --sed-coef "$SED_COEF" --sed-top-k 2 \
  "$@"
