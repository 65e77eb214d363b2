#!/bin/bash
# srun's per-task entry of the job scripts: one SLURM task = one training rank.
#
#   srun --kill-on-bad-exit=1 bash examples/slurm/lib/rank.sh python -m megatron_sed.train ...
#
# Picks the socket interface on this task's own node (rendezvous.sh: the one that routes
# to MASTER_ADDR; SED_SOCKET_IFNAME overrides), sets torch.distributed's env:// variables
# from SLURM's (RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID:
# the GPU of this task on its node) and execs the command, so signals reach it directly.
set -euo pipefail
# shellcheck source=rendezvous.sh
source "$(dirname "${BASH_SOURCE[0]}")/rendezvous.sh"
sed_rendezvous_ifname
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
exec "$@"
