#!/usr/bin/env bash
# CPU-scale check of SED-SFT's claim: after SFT, SED keeps accuracy on par with CE and
# keeps more diversity; SED without the mask is worse. About 20 minutes on 2 CPU cores.
#
# Setting (synthetic multi-path arithmetic, byte tokenizer, tiny GPT):
#   1. initial model: CE on problems shown with all 3 valid solution paths each
#      (it "knows" several ways to solve a problem: the role of a pretrained/instruct model);
#   2. SFT from that one model on OTHER problems with ONE path each (like real SFT data: one
#      reference response per question), with
#        ce          plain cross-entropy
#        sed         SED-SFT, the authors' setting: k=2, lambda=1, tau calibrated on the
#                    initial model so 30% of supervised tokens are regularised (--sed-mask-ratio 0.3)
#        sed_nomask  SED without the mask (the paper's ablation: every token regularised)
#      for each seed in $SEEDS;
#   3. sample N completions per held-out problem (temperature 1) from every model and score
#      accuracy, pass@k, Self-BLEU, distinct-n, distinct correct paths, token entropy;
#   4. write the table and plot (docs/results_table.md, docs/results.png by default).
#
# Knobs (environment): OUT, SEEDS, PRE_ITERS, SFT_ITERS, NUM_PROMPTS, N, MAX_NEW_TOKENS,
# DOCS (where the table/plot go), PYTHON.
set -euo pipefail

PY=${PYTHON:-python}
OUT=${OUT:-runs/reproduce_toy}
SEEDS=${SEEDS:-"1 2 3"}
PRE_ITERS=${PRE_ITERS:-150}
SFT_ITERS=${SFT_ITERS:-40}
NUM_PROMPTS=${NUM_PROMPTS:-30}
N=${N:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
DOCS=${DOCS:-docs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

MODEL=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 256
       --max-position-embeddings 256 --position-embedding-type rope --normalization RMSNorm
       --swiglu --hidden-dropout 0 --attention-dropout 0 --micro-batch-size 16
       --global-batch-size 16 --log-interval 10)

mkdir -p "$OUT/data" "$OUT/ckpt" "$OUT/eval" "$OUT/logs"
start=$(date +%s)
log() { echo "[reproduce_toy +$(( $(date +%s) - start ))s] $*"; }

# ---- 1. data ---------------------------------------------------------------------------
if [ ! -f "$OUT/data/sft.json" ]; then
  log "writing the synthetic sets"
  "$PY" - "$OUT/data" <<'PYEOF'
import json, sys
from megatron_sed.data.synthetic import make_synthetic_math
out = sys.argv[1]
sets = {
    "initial": make_synthetic_math(600, seed=1, split="train"),                     # 3 paths each
    "sft": make_synthetic_math(600, seed=2, split="train", paths_per_problem=1),    # 1 path each
    "test": make_synthetic_math(200, seed=3, split="test"),                         # held out
}
for name, rows in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{name}: {len(rows)} rows")
PYEOF
  for s in initial sft; do
    "$PY" -m megatron_sed.data.preprocess --input "$OUT/data/$s.jsonl" --output-prefix "$OUT/data/$s" \
      --tokenizer-type byte --no-progress
  done
fi

# ---- 2. the initial model --------------------------------------------------------------
if [ ! -f "$OUT/ckpt/initial/latest_checkpointed_iteration.txt" ]; then
  log "training the initial model (CE, all paths, $PRE_ITERS iterations)"
  "$PY" -m megatron_sed.train "${MODEL[@]}" --data-path "$OUT/data/initial" --split 95,5,0 \
    --loss-type ce --train-iters "$PRE_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine \
    --lr-warmup-iters 10 --seed 1234 --save "$OUT/ckpt/initial" > "$OUT/logs/initial.log" 2>&1 \
    || { tail -20 "$OUT/logs/initial.log"; exit 1; }
  grep "done:" "$OUT/logs/initial.log" || true
fi

# ---- 3. SFT: CE, SED, SED without mask ---------------------------------------------------
declare -A METHOD
METHOD[ce]="--loss-type ce"
METHOD[sed]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask topk_mass --sed-mask-ratio 0.3 --sed-calibration-samples 20"
METHOD[sed_nomask]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask all"
for seed in $SEEDS; do
  for m in ce sed sed_nomask; do
    ck="$OUT/ckpt/${m}_s${seed}"
    [ -f "$ck/latest_checkpointed_iteration.txt" ] && continue
    log "SFT $m seed $seed ($SFT_ITERS iterations)"
    # shellcheck disable=SC2086
    "$PY" -m megatron_sed.train "${MODEL[@]}" --data-path "$OUT/data/sft" --split 90,10,0 \
      ${METHOD[$m]} --load "$OUT/ckpt/initial" --finetune --train-iters "$SFT_ITERS" \
      --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 4 --seed "$seed" \
      --save "$ck" --metrics-file "$OUT/logs/${m}_s${seed}.jsonl" > "$OUT/logs/${m}_s${seed}.log" 2>&1 \
      || { tail -20 "$OUT/logs/${m}_s${seed}.log"; exit 1; }
    grep "calibrated SED threshold" "$OUT/logs/${m}_s${seed}.log" || true
  done
done

# ---- 4. evaluation -----------------------------------------------------------------------
evaluate() {  # label checkpoint output
  [ -f "$3" ] && return 0
  log "evaluating $1"
  "$PY" -m megatron_sed.eval --load "$2" --prompts "$OUT/data/test.jsonl" --num-prompts "$NUM_PROMPTS" \
    --n "$N" --temperature 1.0 --top-p 1.0 --max-new-tokens "$MAX_NEW_TOKENS" --system-prompt "" \
    --seed 1234 --label "$1" --output "$3" --samples-output "${3%.json}.samples.jsonl" \
    > "${3%.json}.log" 2>&1 || { tail -20 "${3%.json}.log"; exit 1; }
}
evaluate initial "$OUT/ckpt/initial" "$OUT/eval/initial.json"
for seed in $SEEDS; do
  for m in ce sed sed_nomask; do
    evaluate "$m" "$OUT/ckpt/${m}_s${seed}" "$OUT/eval/${m}_s${seed}.json"
  done
done

# ---- 5. table and plot -------------------------------------------------------------------
results=("$OUT/eval/initial.json")
for m in ce sed sed_nomask; do for seed in $SEEDS; do results+=("$OUT/eval/${m}_s${seed}.json"); done; done
"$PY" -m megatron_sed.eval report "${results[@]}" --output "$DOCS/results_table.md"
"$PY" -m megatron_sed.eval plot "${results[@]}" --output "$DOCS/results.png" \
  --title "SFT from one initial model: CE vs SED vs SED w/o mask (mean, min-max over seeds)"
cat "$DOCS/results_table.md"
log "done"
