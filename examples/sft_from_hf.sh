#!/usr/bin/env bash
# From your own Hugging Face model and chat data to an SED-SFT'd Hugging Face model:
#
#   1. megatron-sed-convert hf-to-mcore   the local HF folder -> a Megatron-Core checkpoint
#   2. megatron-sed-preprocess            your jsonl -> an indexed SFT dataset, tokenized
#                                         with the model's tokenizer and chat template,
#                                         loss on the assistant turns only
#   3. megatron-sed-train --loss-type sed tau calibrated on held-out data with the initial
#                                         model by the authors' recipe (--sed-mask-ratio:
#                                         the fraction of tokens regularised, top-10 mass)
#   4. megatron-sed-eval                  accuracy, pass@k and diversity on test prompts
#   5. megatron-sed-convert mcore-to-hf   the trained checkpoint -> a plain HF folder (RL,
#                                         inference)
#
#   HF=./Qwen2.5-0.5B-Instruct INPUT=my_sft.jsonl PROMPTS=my_test.jsonl \
#       bash examples/sft_from_hf.sh [extra megatron-sed-train flags, e.g. --bf16]
#
# Run it in the environment megatron-sed is installed in (`source .venv/bin/activate`
# after `bash scripts/demo.sh`, or your cluster's). Rows of INPUT: `messages`,
# `question`/`response`, `question`/`answer` or `prompt`/`completion` (docs/data.md);
# rows of PROMPTS: a question (or messages) and its `answer` (docs/evaluation.md).
# Without INPUT / PROMPTS the built-in synthetic math set is written as jsonl and used.
#
# Knobs (environment): HF (required), OUT (default runs/sft_from_hf), INPUT, PROMPTS,
# SYSTEM_PROMPT (default 'math': the math prompt; '' for none), SEQ (sequence length,
# default 2048), NPROC (processes, default 1; torchrun when > 1), TP, MBS, GBS,
# TRAIN_ITERS, LR, MASK_RATIO (default 0.3, the authors'), CALIBRATION_SAMPLES, N (samples
# per prompt, default 8), NUM_PROMPTS (default all), EVAL_FLAGS (extra eval flags).
set -euo pipefail

HF="${HF:?set HF to a local Hugging Face model folder (config.json, safetensors, tokenizer)}"
OUT="${OUT:-runs/sft_from_hf}"
SYSTEM_PROMPT="${SYSTEM_PROMPT-math}"
SEQ="${SEQ:-2048}"
NPROC="${NPROC:-1}"
TP="${TP:-1}"
MBS="${MBS:-1}"
GBS="${GBS:-8}"
TRAIN_ITERS="${TRAIN_ITERS:-100}"
LR="${LR:-1e-5}"
MASK_RATIO="${MASK_RATIO:-0.3}"
CALIBRATION_SAMPLES="${CALIBRATION_SAMPLES:-100}"
N="${N:-8}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

if [ -z "${INPUT:-}" ]; then
  INPUT="$OUT/train.jsonl"
  "$PYTHON" -m megatron_sed.data.synthetic --output "$INPUT" --num-problems 300 --split train
fi
if [ -z "${PROMPTS:-}" ]; then
  PROMPTS="$OUT/test.jsonl"
  "$PYTHON" -m megatron_sed.data.synthetic --output "$PROMPTS" --num-problems 50 --split test
fi
system=()
[ -n "$SYSTEM_PROMPT" ] && system=(--system-prompt "$SYSTEM_PROMPT")

echo "== 1/5 convert $HF -> $OUT/mcore"
megatron-sed-convert hf-to-mcore --hf "$HF" --out "$OUT/mcore" --force --no-progress

echo "== 2/5 preprocess $INPUT with the model's tokenizer and chat template -> $OUT/data/sft"
mkdir -p "$OUT/data"
megatron-sed-preprocess --input "$INPUT" --output-prefix "$OUT/data/sft" \
  --tokenizer-type hf --tokenizer-model "$HF" "${system[@]}" \
  --max-seq-length "$((SEQ + 1))" --overlength truncate --no-progress

echo "== 3/5 SED-SFT -> $OUT/checkpoints"
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --standalone --nproc-per-node "$NPROC" -m megatron_sed.train)
else
  LAUNCH=(megatron-sed-train)
fi
# The model shape, tokenizer and RoPE scaling come from the converted checkpoint;
# --load = --save: a requeued or rerun job resumes where it stopped.
"${LAUNCH[@]}" \
  --pretrained-checkpoint "$OUT/mcore" --load "$OUT/checkpoints" --save "$OUT/checkpoints" \
  --tensor-model-parallel-size "$TP" \
  --data-path "$OUT/data/sft" --split 95,5,0 --seq-length "$SEQ" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS" \
  --lr "$LR" --min-lr 0 --lr-decay-style cosine \
  --loss-type sed --sed-lambda 1.0 --sed-top-k 2 \
  --sed-mask-ratio "$MASK_RATIO" --sed-calibration authors \
  --sed-calibration-samples "$CALIBRATION_SAMPLES" \
  --log-interval 1 --eval-interval "$TRAIN_ITERS" --eval-iters 1 --save-interval "$TRAIN_ITERS" \
  --metrics-file "$OUT/metrics.jsonl" "$@"

echo "== 4/5 evaluate on $PROMPTS -> $OUT/eval.json"
num_prompts=()
[ -n "${NUM_PROMPTS:-}" ] && num_prompts=(--num-prompts "$NUM_PROMPTS")
# shellcheck disable=SC2086
megatron-sed-eval --load "$OUT/checkpoints" --prompts "$PROMPTS" --n "$N" "${num_prompts[@]}" \
  "${system[@]}" --output "$OUT/eval.json" --samples-output "$OUT/eval_samples.jsonl" ${EVAL_FLAGS:-}

echo "== 5/5 convert back -> $OUT/hf"
megatron-sed-convert mcore-to-hf --load "$OUT/checkpoints" --out "$OUT/hf" --force --no-progress

cat <<EOF

== artefacts
   converted model        $OUT/mcore
   SFT data               $OUT/data/sft.{bin,idx,json} (+ _loss_mask)
   training checkpoints   $OUT/checkpoints
   training metrics       $OUT/metrics.jsonl
   evaluation             $OUT/eval.json (samples: $OUT/eval_samples.jsonl)
   SED-SFT'd HF model     $OUT/hf
EOF
