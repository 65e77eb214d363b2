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
# preemption the command's exit status is returned.
sed_run_requeueable() {
  local ckpt_dir="$1"; shift
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
  return "$rc"
}
