#!/usr/bin/env bash
# CPU-scale check of SED-SFT's claim: after SFT, SED keeps accuracy on par with CE and
# keeps more diversity; SED without the mask is worse. Under 20 minutes on 2 CPU cores.
#
# Setting (synthetic multi-path arithmetic "add3": a+b+c with operands 1-9, byte tokenizer,
# tiny GPT). Each problem has 3 valid solution paths that start with a, b and c
# respectively, so the path is chosen by the FIRST response token, a 3-way choice whose
# top-2 mass is ~2/3 in a model that knows all paths: exactly the kind of token SED's
# top-k mask is meant to protect.
#   1. initial model: CE on P_INIT problems shown with all 3 paths each (it "knows" several
#      ways to solve a problem: the role of a pretrained/instruct model);
#   2. SFT from that one model on P_SFT OTHER problems with ONE path each (path 0, like real
#      SFT data: one reference response per question, in one consistent style), with
#        ce          plain cross-entropy
#        sed         SED-SFT, the authors' setting: k=2, lambda=1, tau calibrated on the
#                    initial model so 30% of supervised tokens are regularised (--sed-mask-ratio 0.3)
#        sed_nomask  SED without the mask (the paper's ablation: every token regularised)
#        sed_r005    SED with --sed-mask-ratio 0.05 (ours: the ratio matched to this data,
#                    where only ~4% of supervised tokens are real branch points)
#      for each seed in $SEEDS;
#   3. sample N completions per held-out problem (temperature 1) from every model and score
#      accuracy, pass@k, Self-BLEU, distinct-n, distinct correct paths, token entropy;
#   4. write the table and plot (docs/results_table.md, docs/results.png by default).
# Finished steps are skipped, so an interrupted run can be resumed (delete $OUT to restart).
#
# Processes: the initial model trains with 2 single-threaded data-parallel processes; the
# SFT runs and evaluations run JOBS (default 2) at a time, one thread each (on a small CPU,
# independent single-threaded processes beat OpenMP threads, whose barriers stall).
#
# Knobs (environment): OUT, SEEDS, METHODS, P_INIT, P_SFT, MAX_OPERAND, PRE_ITERS, SFT_ITERS,
# NUM_PROMPTS, N, MAX_NEW_TOKENS, JOBS, NPROC (initial model), DOCS (where the table/plot
# go), PYTHON.
set -euo pipefail

PY=${PYTHON:-python}
OUT=${OUT:-runs/reproduce_toy}
SEEDS=${SEEDS:-"1 2 3"}
METHODS=${METHODS:-"ce sed sed_nomask sed_r005"}
P_INIT=${P_INIT:-360}
P_SFT=${P_SFT:-240}
MAX_OPERAND=${MAX_OPERAND:-9}
PRE_ITERS=${PRE_ITERS:-1000}
SFT_ITERS=${SFT_ITERS:-48}
NUM_PROMPTS=${NUM_PROMPTS:-64}
N=${N:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-40}
JOBS=${JOBS:-2}
NPROC=${NPROC:-2}
DOCS=${DOCS:-docs}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

MODEL=(--num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention
       --num-query-groups 2 --normalization RMSNorm --swiglu --disable-bias-linear
       --position-embedding-type rope --untie-embeddings-and-output-weights
       --hidden-dropout 0 --attention-dropout 0 --seq-length 256 --max-position-embeddings 256
       --global-batch-size 16 --weight-decay 0.01 --clip-grad 1.0 --log-interval 50)

mkdir -p "$OUT/data" "$OUT/ckpt" "$OUT/eval" "$OUT/logs"
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
if [ ! -f "$OUT/data/sft.json" ]; then
  log "writing the synthetic sets"
  "$PY" - "$OUT/data" "$P_INIT" "$P_SFT" "$MAX_OPERAND" "$NUM_PROMPTS" <<'PYEOF'
import json, random, sys
from megatron_sed.data.synthetic import make_synthetic_math
out, p_init, p_sft, max_operand, n_test = sys.argv[1], *map(int, sys.argv[2:])
kw = dict(kinds=("add3",), max_value=max_operand)
rows = make_synthetic_math(p_init + p_sft, seed=1, split="train", **kw)  # 3 paths each
order = list(dict.fromkeys(r["problem_id"] for r in rows))
init_ids = set(order[:p_init])
sets = {
    "initial": [r for r in rows if r["problem_id"] in init_ids],                        # all paths
    "sft": [r for r in rows if r["problem_id"] not in init_ids and r["path_id"] == 0],  # 1 path
    "test": make_synthetic_math(n_test, seed=3, split="test", **kw),                    # held out
}
random.Random(0).shuffle(sets["initial"])  # a problem's 3 paths must not sit side by side
for name, rs in sets.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rs)
    print(f"{name}: {len(rs)} rows, {len({r['problem_id'] for r in rs})} problems")
PYEOF
  for s in initial sft; do
    "$PY" -m megatron_sed.data.preprocess --input "$OUT/data/$s.jsonl" --output-prefix "$OUT/data/$s" \
      --tokenizer-type byte --no-progress
  done
fi

# ---- 2. the initial model --------------------------------------------------------------
if [ ! -f "$OUT/ckpt/initial/latest_checkpointed_iteration.txt" ]; then
  log "training the initial model (CE, all paths, $PRE_ITERS iterations, $NPROC processes)"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_sed.train \
    "${MODEL[@]}" --micro-batch-size $(( 16 / NPROC )) --data-path "$OUT/data/initial" \
    --split 98,2,0 --loss-type ce --train-iters "$PRE_ITERS" --lr 2e-3 --min-lr 1e-4 \
    --lr-decay-style cosine --lr-warmup-iters 30 --seed 1234 --save "$OUT/ckpt/initial" \
    --metrics-file "$OUT/logs/initial.jsonl" > "$OUT/logs/initial.log" 2>&1 \
    || { tail -20 "$OUT/logs/initial.log"; exit 1; }
  grep "done:" "$OUT/logs/initial.log" || true
fi

# ---- 3. SFT (CE, SED, SED without mask) and evaluation, JOBS at a time ------------------
declare -A METHOD
METHOD[ce]="--loss-type ce"
METHOD[sed]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask topk_mass --sed-mask-ratio 0.3 --sed-calibration-samples 10"
METHOD[sed_nomask]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask all"
# Ablation: the mask ratio matched to this data. Only the first response token branches
# (1 of ~28 supervised tokens, 3.6%); at 0.3 the mask also catches near-deterministic
# arithmetic tokens (top-2 mass just under 1).
METHOD[sed_r005]="--loss-type sed --sed-top-k 2 --sed-coef 1.0 --sed-mask topk_mass --sed-mask-ratio 0.05 --sed-calibration-samples 10"

evaluate() {  # label checkpoint output
  [ -f "$3" ] && return 0
  "$PY" -m megatron_sed.eval --load "$2" --prompts "$OUT/data/test.jsonl" --num-prompts "$NUM_PROMPTS" \
    --n "$N" --temperature 1.0 --top-p 1.0 --max-new-tokens "$MAX_NEW_TOKENS" --system-prompt "" \
    --seed 1234 --label "$1" --output "$3" --samples-output "${3%.json}.samples.jsonl"
}
sft_and_eval() {  # method seed
  local m=$1 seed=$2 ck="$OUT/ckpt/$1_s$2"
  if [ ! -f "$ck/latest_checkpointed_iteration.txt" ]; then
    # shellcheck disable=SC2086
    "$PY" -m megatron_sed.train "${MODEL[@]}" --micro-batch-size 16 --data-path "$OUT/data/sft" \
      --split 90,10,0 ${METHOD[$m]} --load "$OUT/ckpt/initial" --finetune \
      --train-iters "$SFT_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine \
      --lr-warmup-iters 4 --seed "$seed" --save "$ck" --metrics-file "$OUT/logs/${m}_s${seed}.jsonl"
  fi
  evaluate "$m" "$ck" "$OUT/eval/${m}_s${seed}.json"
}

log "SFT and evaluation: seeds $SEEDS x {$METHODS}, $SFT_ITERS iterations each, $JOBS jobs at a time"
job "$OUT/logs/eval_initial.log" evaluate initial "$OUT/ckpt/initial" "$OUT/eval/initial.json"
for seed in $SEEDS; do
  for m in $METHODS; do
    job "$OUT/logs/${m}_s${seed}.log" sft_and_eval "$m" "$seed"
  done
done
wait_jobs
grep -h "calibrated SED threshold" "$OUT"/logs/sed_s*.log || true

# ---- 4. table and plot -------------------------------------------------------------------
results=("$OUT/eval/initial.json")
for m in $METHODS; do for seed in $SEEDS; do results+=("$OUT/eval/${m}_s${seed}.json"); done; done
"$PY" -m megatron_sed.eval report "${results[@]}" --output "$DOCS/results_table.md"
"$PY" -m megatron_sed.eval plot "${results[@]}" --output "$DOCS/results.png" \
  --title "SFT from one initial model: CE vs SED vs SED w/o mask (mean, min-max over seeds)"
cat "$DOCS/results_table.md"
log "done"
