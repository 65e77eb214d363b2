#!/bin/bash
# Shared launcher of the multi-node GPU sbatch scripts (sed_sft_llama3_3b.sbatch,
# sed_sft_qwen25_math_7b.sbatch); they set the model's MODEL_ARGS and layout defaults
# and source this file. One srun task per GPU is one training rank (lib/rank.sh), the
# rendezvous is the NodeAddr of the first node of SLURM_JOB_NODELIST and each task picks
# the socket interface that routes there (lib/rendezvous.sh) -- the same code the
# two-node CPU test exercises (tests/slurm/). A preemption (USR1 before the time limit)
# saves a checkpoint on every rank and requeues the job (lib/requeue.sh).
#
# LAUNCHER=megatron-sed (default) runs `python -m megatron_sed.train` (Megatron's
# pretrain with the SED plugin); LAUNCHER=megatron-lm runs a patched Megatron-LM's
# pretrain_gpt.py (MEGATRON_LM_DIR, see scripts/apply_megatron_patch.sh): same flags.
# Every knob is an environment variable with a default; extra arguments ("$@" of the
# sbatch script) go to the trainer last, so they win. DRY_RUN=1 prints the launch command
# instead of running it (works outside SLURM).
set -euo pipefail

# ---- cluster / launch
LAUNCHER="${LAUNCHER:-megatron-sed}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${SLURM_NNODES:-${NNODES:-1}}"
HERE="${SED_EXAMPLES_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
# shellcheck source=lib/rendezvous.sh
source "$HERE/lib/rendezvous.sh"
sed_rendezvous_master
PYTHON="${PYTHON:-python}"
MEGATRON_LM_DIR="${MEGATRON_LM_DIR:-}"
CONTAINER_ARGS="${CONTAINER_ARGS:-}"   # e.g. "--container-image=... --container-mounts=..." (pyxis)
DRY_RUN="${DRY_RUN:-0}"

# ---- layout: TP x PP x DP = NNODES x GPUS_PER_NODE
WORLD=$((NNODES * GPUS_PER_NODE))
TP="${TP:?}"; PP="${PP:?}"
if [ $((WORLD % (TP * PP))) -ne 0 ]; then
  echo "error: world size $WORLD (NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE) is not divisible by TP=$TP x PP=$PP" >&2
  exit 1
fi
DP=$((WORLD / (TP * PP)))
MICRO_BATCH="${MICRO_BATCH:-1}"
GLOBAL_BATCH="${GLOBAL_BATCH:-$((DP * MICRO_BATCH * 8))}"
if [ $((GLOBAL_BATCH % (DP * MICRO_BATCH))) -ne 0 ]; then
  echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of DP=$DP x MICRO_BATCH=$MICRO_BATCH" >&2
  exit 1
fi

# ---- run
RUN_DIR="${RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$RUN_NAME}"
CKPT_DIR="${CKPT_DIR:-$RUN_DIR/checkpoints}"
INIT_CKPT="${INIT_CKPT:-}"             # Megatron-Core torch_dist checkpoint of the base model
DATA_PATH="${DATA_PATH:-}"             # prefix of a megatron-sed-preprocess output (.bin/.idx)
TOKENIZER_MODEL="${TOKENIZER_MODEL:-}" # HF tokenizer dir (or hub name cached on the nodes)
TRAIN_ITERS="${TRAIN_ITERS:-2000}"
LR="${LR:-2e-5}"; MIN_LR="${MIN_LR:-2e-6}"; WARMUP="${WARMUP:-50}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"; LOG_INTERVAL="${LOG_INTERVAL:-10}"
EVAL_INTERVAL="${EVAL_INTERVAL:-200}"; EVAL_ITERS="${EVAL_ITERS:-10}"
PRECISION="${PRECISION:-bf16}"         # bf16 | fp8 (bf16 + FP8 hybrid via Transformer Engine)
LOSS_TYPE="${LOSS_TYPE:-sed}"
SED_COEF="${SED_COEF:-1.0}"; SED_TOP_K="${SED_TOP_K:-2}"
SED_THRESHOLD="${SED_THRESHOLD:-}"     # empty: calibrate tau with SED_MASK_RATIO (needs PP=1 with megatron-lm)
SED_MASK_RATIO="${SED_MASK_RATIO:-0.3}"
SED_CALIBRATION="${SED_CALIBRATION:-authors}"  # authors (the paper's script) or supervised: docs/evaluation.md
# A collective that waits longer than this fails the job (a rank that hangs without dying:
# a stuck node, a wedged GPU). A rank that dies fails it at once (srun --kill-on-bad-exit).
# Must exceed the longest wait of a healthy job: ranks wait for the slowest writer of a
# checkpoint save or load. Megatron's default is 10 minutes.
DIST_TIMEOUT_MIN="${DIST_TIMEOUT_MIN:-5}"

# ---- NCCL (InfiniBand clusters; override per site)
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
[ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron's TP/SP overlap needs it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

common=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  "${MODEL_ARGS[@]}"
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
  --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
  --train-iters "$TRAIN_ITERS" --log-interval "$LOG_INTERVAL"
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  --save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL"
  --use-distributed-optimizer --transformer-impl transformer_engine --bf16
  --tensorboard-dir "$RUN_DIR/tensorboard"
  --loss-type "$LOSS_TYPE" --sed-coef "$SED_COEF" --sed-top-k "$SED_TOP_K"
)
[ "$TP" -gt 1 ] && common+=(--sequence-parallel)
case "$PRECISION" in
  bf16) ;;
  fp8) common+=(--fp8-format hybrid) ;;
  *) echo "error: PRECISION must be bf16 or fp8, got $PRECISION" >&2; exit 1 ;;
esac
[ -n "$DATA_PATH" ] && common+=(--data-path "$DATA_PATH")
[ -n "$SED_THRESHOLD" ] && common+=(--sed-threshold "$SED_THRESHOLD")
# Megatron's own resume logic: --load CKPT_DIR when it holds a checkpoint (a requeued
# job), else --pretrained-checkpoint INIT_CKPT with fine-tuning semantics (weights only,
# iteration 0). A preemption signal saves on every rank (--exit-signal-handler).
common+=(--load "$CKPT_DIR" --exit-signal-handler --exit-signal SIGUSR1)
common+=(--distributed-timeout-minutes "$DIST_TIMEOUT_MIN")
[ -n "$INIT_CKPT" ] && common+=(--pretrained-checkpoint "$INIT_CKPT")
[ -n "$TOKENIZER_MODEL" ] && common+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")

if [ "$LAUNCHER" = megatron-sed ]; then
  entry=(-m megatron_sed.train --metrics-file "$RUN_DIR/metrics.jsonl")
  [ -z "$SED_THRESHOLD" ] && [ "$LOSS_TYPE" = sed ] && entry+=(--sed-mask-ratio "$SED_MASK_RATIO" --sed-calibration "$SED_CALIBRATION")
elif [ "$LAUNCHER" = megatron-lm ]; then
  if [ -z "$MEGATRON_LM_DIR" ] && [ "$DRY_RUN" != 1 ]; then
    echo "error: LAUNCHER=megatron-lm needs MEGATRON_LM_DIR (a checkout patched by scripts/apply_megatron_patch.sh)" >&2
    exit 1
  fi
  entry=("${MEGATRON_LM_DIR:-MEGATRON_LM_DIR}/pretrain_gpt.py" --ckpt-format torch_dist)
  [ -z "$SED_THRESHOLD" ] && [ "$LOSS_TYPE" = sed ] && entry+=(--sed-mask-ratio "$SED_MASK_RATIO" --sed-calibration "$SED_CALIBRATION")
else
  echo "error: LAUNCHER must be megatron-sed or megatron-lm, got $LAUNCHER" >&2
  exit 1
fi
if [ -z "$SED_THRESHOLD" ] && [ "$LOSS_TYPE" = sed ] && [ "$PP" -gt 1 ]; then
  echo "error: PP=$PP needs SED_THRESHOLD (tau): calibrating it (SED_MASK_RATIO) needs the logits, which only the last pipeline stage has; calibrate once at PP=1" >&2
  exit 1
fi

launch=(srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 $CONTAINER_ARGS
        bash "$HERE/lib/rank.sh" "$PYTHON" "${entry[@]}" "${common[@]}" "$@")

echo "== $RUN_NAME: $LAUNCHER, $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD ranks: TP=$TP PP=$PP DP=$DP," \
     "global batch $GLOBAL_BATCH, $PRECISION, rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${launch[@]}"; echo
  exit 0
fi

mkdir -p "$RUN_DIR" "$CKPT_DIR"
# shellcheck source=lib/requeue.sh
source "$HERE/lib/requeue.sh"
sed_run_requeueable "$CKPT_DIR" "${launch[@]}"
