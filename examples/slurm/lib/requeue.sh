# Lossless preemption for the job scripts (bash; source this file).
#
#   sed_run_requeueable CKPT_DIR srun ... bash lib/rank.sh python -m megatron_sed.train \
#       --exit-signal-handler --exit-signal SIGUSR1 --save CKPT_DIR --load CKPT_DIR ...
#
# Runs the srun command in the background. When SLURM sends USR1 to the batch shell
# (#SBATCH --signal=B:USR1@<seconds before the time limit>, or scancel --signal=USR1
# --batch), the signal is forwarded to every rank through srun; Megatron's signal handler
# saves a checkpoint at the end of the current iteration on every rank and exits; then
# the job is requeued and resumes from exactly that checkpoint (--load). Without a
# preemption the command's exit status is returned, after a line saying that the ranks
# failed (srun's own "error: NODE: task N: ..." lines say how each ended: task N = RANK N).
# Before the launch, sed_checkpoint_report says what --load will find in CKPT_DIR.
sed_run_requeueable() {
  local ckpt_dir="$1"; shift
  sed_checkpoint_report "$ckpt_dir"
  _sed_preempted=0
  trap '_sed_preempted=1
        echo "[$(date -Is)] caught USR1: ranks save a checkpoint and stop; then requeueing job ${SLURM_JOB_ID:-?}"
        kill -USR1 "$_sed_srun_pid" 2>/dev/null || true' USR1
  "$@" &
  _sed_srun_pid=$!
  local rc=0
  while true; do  # `wait` returns early when the trap fires; keep waiting for srun
    set +e; wait "$_sed_srun_pid"; rc=$?; set -e
    kill -0 "$_sed_srun_pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$_sed_preempted" = 1 ]; then
    echo "[$(date -Is)] ranks stopped (exit $rc) at iteration" \
         "$(cat "$ckpt_dir/latest_checkpointed_iteration.txt" 2>/dev/null || echo none): requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  if [ "$rc" != 0 ]; then
    echo "[$(date -Is)] training failed: srun exited with $rc; its 'error: <node>: task <N>: ...' lines" \
         "above say how each rank ended (task N = RANK N): one killed before the others exited is the" \
         "lost rank; 'Timed out' errors mean the others waited the collective timeout for a hung one;" \
         "last complete checkpoint: iteration $(cat "$ckpt_dir/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)"
  fi
  return "$rc"
}

# sed_checkpoint_report CKPT_DIR: what Megatron's --load will make of CKPT_DIR. Megatron
# writes latest_checkpointed_iteration.txt (the tracker) only after every rank finished
# writing iter_<N>/, so the tracker names the last complete checkpoint and --load reads
# only that one; an iter_<N>/ newer than it (or any, without a tracker) is what a save
# that never finished left behind (a node died, the job was killed mid-save): --load
# ignores it silently and a later save of iteration N overwrites it. Say so.
sed_checkpoint_report() {
  local dir="$1" latest="" d it n
  [ -d "$dir" ] || return 0
  [ -f "$dir/latest_checkpointed_iteration.txt" ] && latest="$(tr -d '[:space:]' < "$dir/latest_checkpointed_iteration.txt")"
  for d in "$dir"/iter_[0-9]*; do
    [ -d "$d" ] || continue
    it=$((10#${d##*/iter_}))
    if [ -z "$latest" ] || { [[ "$latest" =~ ^[0-9]+$ ]] && [ "$it" -gt "$latest" ]; }; then
      n="$(find "$d" -type f | wc -l)"
      echo "[$(date -Is)] checkpoint ${d##*/} is incomplete (a save that did not finish, $n file(s);" \
           "the tracker names ${latest:-no checkpoint}): --load ignores it; a save of iteration $it overwrites it"
    fi
  done
  if [ -z "$latest" ]; then
    echo "[$(date -Is)] no complete checkpoint in $dir: nothing to resume, training starts at iteration 0"
  elif [[ "$latest" =~ ^[0-9]+$ ]]; then
    d="$dir/$(printf 'iter_%07d' "$latest")"
    if [ ! -d "$d" ]; then
      echo "[$(date -Is)] error: the tracker names iteration $latest but $d does not exist: --load will fail" >&2
    elif compgen -G "$d/*.distcp" >/dev/null && [ ! -f "$d/metadata.json" ]; then
      echo "[$(date -Is)] warning: $d (named by the tracker) has no metadata.json: it may be damaged" >&2
    else
      echo "[$(date -Is)] last complete checkpoint: iteration $latest: --load resumes there"
    fi
  fi
}
