#!/usr/bin/env bash
# CPU-scale check of SED-SFT's claim end to end: SFT with SED keeps the exploration that
# the RL stage after it needs, so "SED -> RL" should beat "CE -> RL" (and SED without the
# mask should be worse). About 25 minutes on 2 CPU cores; docs/results.md has the reading.
#
# Task (megatron_sed.data.synthetic, kind "pick3", byte tokenizer): "Ben has books numbered
# 4, 1 and 8. Add two and take away the third to make 11." The response's FIRST token
# picks which number comes first, hence which one is subtracted: 8+4=12. 12-1=11.
# \boxed{11}. Exactly one of the three choices reaches the target.
#   1. initial model: CE on P_INIT problems shown with all three choices each (right and
#      wrong: a model that explores, first-token entropy ~ln 3 = 1.10 nats, 1/3 right);
#   2. SFT from it on P_SFT other problems with the ONE correct choice each, in the
#      authors' regime (2 epochs, cosine decay, 3% warmup; lr SFT_LR), with
#        ce          plain cross-entropy
#        sed         SED-SFT, the authors' setting: k=2, lambda=1, tau by the authors'
#                    recipe (--sed-calibration authors: top-10 mass at every position of
#                    the first 100 held-out samples, cumsum_ratio 0.7)
#        sed_nomask  SED without the mask (the paper's ablation)
#      for each seed in $SEEDS; evaluated after SFT (diversity: Self-BLEU, paths, entropy);
#   3. GRPO (python -m megatron_sed.rl, the authors' verl settings: n=8, temperature 1, no
#      KL, clip 0.2/0.28, token-mean; reward: the boxed answer of true equations) from the
#      initial model and from every SFT model, RL_ITERS iterations on P_RL further
#      problems, held-out avg@8 / pass@8 every EVAL_INTERVAL iterations;
#   4. preconditions, table and plot (python -m megatron_sed.rl.report).
# Deterministic; finished steps are skipped, so an interrupted run resumes (delete $OUT to
# start over).
#
# Knobs (environment): OUT, SEEDS, METHODS, P_INIT, P_SFT, P_RL, NUM_PROMPTS, PRE_ITERS,
# SFT_EPOCHS, SFT_LR, RL_ITERS, RL_LR, RL_PROMPTS (per GRPO iteration), RL_MINI_BATCH (prompts
# per update), RL_INIT_SEEDS (GRPO runs from the initial model), EVAL_INTERVAL, N, JOBS,
# NPROC, DOCS, PYTHON.
set -euo pipefail

PY=${PYTHON:-python}
OUT=${OUT:-runs/reproduce_toy}
SEEDS=${SEEDS:-"1 2 3"}
METHODS=${METHODS:-"ce sed sed_nomask"}
P_INIT=${P_INIT:-400}
P_SFT=${P_SFT:-240}
P_RL=${P_RL:-320}
NUM_PROMPTS=${NUM_PROMPTS:-64}
PRE_ITERS=${PRE_ITERS:-700}
SFT_EPOCHS=${SFT_EPOCHS:-2}
SFT_LR=${SFT_LR:-1e-4}
RL_ITERS=${RL_ITERS:-8}
RL_LR=${RL_LR:-3e-5}
RL_PROMPTS=${RL_PROMPTS:-16}
RL_MINI_BATCH=${RL_MINI_BATCH:-4}
RL_INIT_SEEDS=${RL_INIT_SEEDS:-1}
EVAL_INTERVAL=${EVAL_INTERVAL:-4}
N=${N:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
JOBS=${JOBS:-2}
NPROC=${NPROC:-2}
DOCS=${DOCS:-docs}
GBS=16
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

MODEL=(--num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention
       --num-query-groups 2 --normalization RMSNorm --swiglu --disable-bias-linear
       --position-embedding-type rope --untie-embeddings-and-output-weights
       --hidden-dropout 0 --attention-dropout 0 --seq-length 256 --max-position-embeddings 256
       --global-batch-size "$GBS" --weight-decay 0.01 --clip-grad 1.0 --log-interval 10)

mkdir -p "$OUT/data" "$OUT/ckpt" "$OUT/eval" "$OUT/rl" "$OUT/logs"
rm -f "$OUT"/logs/*.failed
start=$(date +%s)
log() { echo "[reproduce_toy +$(( $(date +%s) - start ))s] $*"; }

# Run "$@" in the background with its output in $1 (a log file), at most JOBS at a time.
job() {
  local logf=$1; shift
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  ( "$@" > "$logf" 2>&1 || { echo "FAILED ($logf):"; tail -20 "$logf"; touch "$logf.failed"; } ) &
}
wait_jobs() {
  wait
  if compgen -G "$OUT/logs/*.failed" > /dev/null; then echo "some steps failed"; exit 1; fi
}

# ---- 1. data ---------------------------------------------------------------------------
if [ ! -f "$OUT/data/valid.idx" ]; then
  log "writing the pick3 sets"
  "$PY" - "$OUT/data" "$P_INIT" "$P_SFT" "$P_RL" "$NUM_PROMPTS" <<'PYEOF'
import json, random, sys
from megatron_sed.data.synthetic import make_synthetic_math
out, p_init, p_sft, p_rl, n_test = sys.argv[1], *map(int, sys.argv[2:])
kw = dict(kinds=("pick3",), max_value=9)
rows = make_synthetic_math(p_init + p_sft + p_rl, seed=1, split="train", **kw)  # 3 choices each
order = list(dict.fromkeys(r["problem_id"] for r in rows))
part = {pid: ("initial" if i < p_init else "sft" if i < p_init + p_sft else "rl") for i, pid in enumerate(order)}
sets = {
    "initial": [r for r in rows if part[r["problem_id"]] == "initial"],                  # all choices
    "sft": [r for r in rows if part[r["problem_id"]] == "sft" and r["path_id"] == 0],    # the right one
    "rl": [r for r in rows if part[r["problem_id"]] == "rl" and r["path_id"] == 0],      # prompts
    "test": make_synthetic_math(n_test, seed=3, split="test", **kw),                     # held out
    # SFT's validation set: tau is calibrated on its first 100 samples, as the authors
    # calibrate on the first 100 samples of their test set (one correct path each)
    "valid": make_synthetic_math(100, seed=4, split="test", paths_per_problem=1, **kw),
}
random.Random(0).shuffle(sets["initial"])  # a problem's 3 choices must not sit side by side
for name, rs in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rs)
    print(f"{name}: {len(rs)} rows, {len({r['problem_id'] for r in rs})} problems")
PYEOF
  for s in initial sft valid; do
    "$PY" -m megatron_sed.data.preprocess --input "$OUT/data/$s.jsonl" --output-prefix "$OUT/data/$s" \
      --tokenizer-type byte --no-progress
  done
fi

# ---- 2. the initial model --------------------------------------------------------------
if [ ! -f "$OUT/ckpt/initial/latest_checkpointed_iteration.txt" ]; then
  log "training the initial model (CE, all three choices, $PRE_ITERS iterations, $NPROC processes)"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_sed.train \
    "${MODEL[@]}" --micro-batch-size $(( GBS / NPROC )) --data-path "$OUT/data/initial" \
    --split 98,2,0 --loss-type ce --train-iters "$PRE_ITERS" --lr 2e-3 --min-lr 1e-4 \
    --lr-decay-style cosine --lr-warmup-iters 30 --seed 1234 --save "$OUT/ckpt/initial" \
    --save-interval "$PRE_ITERS" \
    --metrics-file "$OUT/logs/initial.jsonl" > "$OUT/logs/initial.log" 2>&1 \
    || { tail -20 "$OUT/logs/initial.log"; exit 1; }
fi

# ---- 3. SFT (CE, SED, SED without mask), evaluation, and GRPO from each ------------------
# The authors' regime: SFT_EPOCHS epochs of one sample per sequence, cosine, 3% warmup.
sft_rows=$(wc -l < "$OUT/data/sft.jsonl")
SFT_ITERS=$(( (SFT_EPOCHS * sft_rows + GBS - 1) / GBS ))
SFT_WARMUP=$(( (SFT_ITERS * 3 + 99) / 100 ))
declare -A METHOD
METHOD[ce]="--loss-type ce"
METHOD[sed]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask topk_mass --sed-mask-ratio 0.3 --sed-calibration authors --sed-calibration-samples 100"
METHOD[sed_nomask]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask all"

evaluate() {  # label checkpoint output
  [ -f "$3" ] && return 0
  "$PY" -m megatron_sed.eval --load "$2" --prompts "$OUT/data/test.jsonl" --num-prompts "$NUM_PROMPTS" \
    --n "$N" --temperature 1.0 --top-p 1.0 --max-new-tokens "$MAX_NEW_TOKENS" --system-prompt "" \
    --seed 1234 --label "$1" --output "$3" --samples-output "${3%.json}.samples.jsonl" || return 1
}
grpo() {  # label checkpoint seed
  local ck="$OUT/rl/$1"
  [ -f "$OUT/rl/$1.done" ] && return 0
  "$PY" -m megatron_sed.rl --load "$2" --save "$ck" --prompts "$OUT/data/rl.jsonl" \
    --eval-prompts "$OUT/data/test.jsonl" --eval-num-prompts "$NUM_PROMPTS" \
    --eval-interval "$EVAL_INTERVAL" --eval-n "$N" --train-iters "$RL_ITERS" --n "$N" \
    --prompts-per-step "$RL_PROMPTS" --mini-batch-prompts "$RL_MINI_BATCH" --micro-batch-size 64 \
    --max-new-tokens "$MAX_NEW_TOKENS" --lr "$RL_LR" --reward checked --seed "$3" \
    --system-prompt "" --metrics-file "$OUT/rl/$1.jsonl" || return 1
  touch "$OUT/rl/$1.done"
}
sft_eval_rl() {  # method seed
  local m=$1 seed=$2 ck="$OUT/ckpt/$1_s$2"
  if [ ! -f "$ck/latest_checkpointed_iteration.txt" ]; then
    # shellcheck disable=SC2086
    "$PY" -m megatron_sed.train "${MODEL[@]}" --micro-batch-size "$GBS" --train-data-path "$OUT/data/sft" \
      --valid-data-path "$OUT/data/valid" --no-pack ${METHOD[$m]} --load "$OUT/ckpt/initial" --finetune \
      --train-iters "$SFT_ITERS" --lr "$SFT_LR" --min-lr 0 --lr-decay-style cosine \
      --lr-warmup-iters "$SFT_WARMUP" --seed "$seed" --save "$ck" --save-interval "$SFT_ITERS" \
      --metrics-file "$OUT/logs/${m}_s${seed}.jsonl" || return 1
  fi
  # (a function run as `f || handler` does not stop at a failing command: chain them)
  evaluate "$m" "$ck" "$OUT/eval/${m}_s${seed}.json" && grpo "${m}_s${seed}" "$ck" "$seed"
}

log "SFT ($SFT_ITERS iterations = $SFT_EPOCHS epochs of $sft_rows samples, warmup $SFT_WARMUP), evaluation and GRPO ($RL_ITERS iterations): seeds $SEEDS x {$METHODS}, $JOBS jobs at a time"
job "$OUT/logs/eval_initial.log" evaluate initial "$OUT/ckpt/initial" "$OUT/eval/initial.json"
for seed in $RL_INIT_SEEDS; do
  job "$OUT/logs/rl_initial_s${seed}.log" grpo "initial_s${seed}" "$OUT/ckpt/initial" "$seed"
done
for seed in $SEEDS; do
  for m in $METHODS; do
    job "$OUT/logs/${m}_s${seed}.log" sft_eval_rl "$m" "$seed"
  done
done
wait_jobs
grep -h "calibrated SED threshold" "$OUT"/logs/sed_s*.log 2>/dev/null | sort -u || true

# ---- 4. preconditions, table and plot -----------------------------------------------------
"$PY" -m megatron_sed.rl.report --eval-dir "$OUT/eval" --rl-dir "$OUT/rl" --methods initial $METHODS \
  --table "$DOCS/results_table.md" --plot "$DOCS/results.png"
log "done"
