#!/usr/bin/env bash
# The main job (README's first command): SED-SFT of a tiny GPT on CPU.
#
# Trains a 4-layer Megatron-Core GPT (RMSNorm, SwiGLU, RoPE, GQA) with --loss-type sed on the
# built-in synthetic multi-path math SFT set (byte-level tokenizer, packed sequences, loss on
# assistant tokens only), k=2, lambda=1. The paper calibrates tau once on a *pretrained*
# model (the default --sed-calibration authors); this demo starts from random weights,
# whose top-k masses grow by orders of magnitude in the first iterations, so a fixed tau
# would soon select nothing: it tracks the 30% quantile of supervised tokens with an EMA
# instead (--sed-calibration supervised --sed-threshold-update ema). Prints Megatron-style
# lines, a validation loss, and a final summary; the metrics land in $OUT/metrics.jsonl and
# a checkpoint in $OUT/checkpoints.
#
# Knobs (environment): OUT, NPROC (torchrun processes, default 2: data parallel), TP
# (tensor parallel, default 1), TRAIN_ITERS, THREADS (per process).
# Extra arguments go to megatron-sed-train, e.g.
#   bash scripts/demo.sh --loss-type ce
set -euo pipefail
source "$(dirname "$0")/_venv.sh"

OUT="${OUT:-runs/demo}"
# Two single-threaded data-parallel processes by default: on a small (or busy) CPU this is
# much faster than one process with two OpenMP threads, whose barriers stall under load.
NPROC="${NPROC:-$(( $(nproc) >= 2 ? 2 : 1 ))}"
TP="${TP:-1}"
TRAIN_ITERS="${TRAIN_ITERS:-200}"
THREADS="${THREADS:-1}"
export OMP_NUM_THREADS="$THREADS"
rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl"
mkdir -p "$OUT"

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc-per-node "$NPROC" -m megatron_sed.train)
else
  LAUNCH=(python -m megatron_sed.train)
fi

start=$(date +%s)
PYTHONWARNINGS=ignore "${LAUNCH[@]}" \
  --tensor-model-parallel-size "$TP" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --group-query-attention --num-query-groups 2 \
  --normalization RMSNorm --swiglu --disable-bias-linear \
  --position-embedding-type rope --untie-embeddings-and-output-weights \
  --hidden-dropout 0 --attention-dropout 0 \
  --seq-length 256 --max-position-embeddings 256 --micro-batch-size 8 --global-batch-size 16 \
  --train-iters "$TRAIN_ITERS" --lr 2e-3 --min-lr 1e-4 --lr-decay-style cosine \
  --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 \
  --loss-type sed --sed-lambda 1.0 --sed-top-k 2 --sed-mask topk_mass \
  --sed-mask-ratio 0.3 --sed-calibration supervised --sed-calibration-samples 16 \
  --sed-threshold-update ema \
  --synthetic-num-problems 400 --synthetic-cache-dir "$OUT/data" --split 90,10,0 \
  --log-interval 20 --eval-interval 100 --eval-iters 2 \
  --save "$OUT/checkpoints" --save-interval 100 \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
  "$@"
end=$(date +%s)

python - "$OUT/metrics.jsonl" "$((end - start))" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "lm_loss" in r]
valid = [r for r in rows if "valid_lm_loss" in r]
first, last = train[0], train[-1]
print("\n== demo summary")
print(f"   iterations {last['iteration']}, wall time {sys.argv[2]} s, "
      f"{last['tokens_per_sec']:.0f} tokens/s at the end")
print(f"   SED threshold tau {last['sed_threshold']:.4f}")
for k in ("lm_loss", "sed_reg", "sed_mask_rate", "entropy", "target_prob", "top1_acc"):
    print(f"   {k:14s} {first[k]:9.4f} (iteration {first['iteration']}) -> {last[k]:9.4f}")
if valid:
    print(f"   validation lm loss {valid[-1]['valid_lm_loss']:.4f}, top-1 accuracy "
          f"{valid[-1]['valid_top1_acc']:.3f} (iteration {valid[-1]['iteration']})")
PY
echo "   metrics: $OUT/metrics.jsonl  checkpoint: $OUT/checkpoints  tensorboard: $OUT/tensorboard"
