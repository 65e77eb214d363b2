# Rendezvous helpers for multi-node SLURM jobs (bash; source this file).
#
#   source examples/slurm/lib/rendezvous.sh
#   sed_rendezvous_master        # batch script: export MASTER_ADDR, MASTER_PORT
#   srun bash -c 'source .../rendezvous.sh; sed_rendezvous_ifname; exec python ...'
#                                # every task: export GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#
# MASTER_ADDR is the first host of SLURM_JOB_NODELIST as SLURM reaches it: its NodeAddr
# (`scontrol show node`), which on most clusters is the NodeName itself (resolved by DNS)
# and elsewhere an address. The socket interface is the one that carries the route to
# MASTER_ADDR on *this* node (`ip route get`), so it must be chosen per task, inside srun:
# the batch shell runs on the first node only and srun copies its environment to all.
#
# Knobs: MASTER_ADDR / MASTER_PORT (kept when set; port default 20000 + job id % 20000);
# SED_SOCKET_IFNAME overrides the interface for both gloo and NCCL (`none`: set neither);
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME already set by the user are kept.

# sed_node_addr NAME: the address SLURM uses for node NAME (NodeAddr), else NAME.
sed_node_addr() {
  local addr=""
  if command -v scontrol >/dev/null 2>&1; then
    addr="$(scontrol show node -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)" || addr=""
  fi
  echo "${addr:-$1}"
}

# sed_master_addr: the address of the first host of SLURM_JOB_NODELIST (NODELIST outside SLURM).
sed_master_addr() {
  local nodelist="${SLURM_JOB_NODELIST:-${NODELIST:-localhost}}" first
  if command -v scontrol >/dev/null 2>&1 && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    first="$(scontrol show hostnames "$nodelist" | head -n 1)" || first=""
    [ -n "$first" ] || first="${nodelist%%,*}"
    sed_node_addr "$first"
  else
    echo "${nodelist%%,*}"
  fi
}

# sed_ipv4 HOST: HOST as an IPv4 address (as is when it already is one).
sed_ipv4() {
  if [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "$1"
  else
    getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }' || true
  fi
}

# sed_socket_ifname ADDR: the interface this node reaches ADDR through. On the node that
# owns ADDR the route is via `lo`; then the interface that holds ADDR (what peers reach).
sed_socket_ifname() {
  local addr dev
  command -v ip >/dev/null 2>&1 || return 1
  addr="$(sed_ipv4 "$1")"
  [ -n "$addr" ] || return 1
  dev="$(ip route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)" || dev=""
  if [ "$dev" = lo ] && [[ "$addr" != 127.* ]]; then
    dev="$(ip -o -4 addr show to "$addr" 2>/dev/null | awk '{ print $2 }' | head -n 1)" || dev=""
  fi
  [ -n "$dev" ] || return 1
  echo "$dev"
}

# sed_rendezvous_master: export MASTER_ADDR and MASTER_PORT (kept when already set).
sed_rendezvous_master() {
  MASTER_ADDR="${MASTER_ADDR:-$(sed_master_addr)}"
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  export MASTER_ADDR MASTER_PORT
}

# sed_rendezvous_ifname: per task; also sets MASTER_ADDR/PORT when the batch shell did not.
sed_rendezvous_ifname() {
  local ifname="${SED_SOCKET_IFNAME:-}"
  sed_rendezvous_master
  [ "$ifname" = none ] && return 0
  if [ -n "$ifname" ]; then
    export GLOO_SOCKET_IFNAME="$ifname" NCCL_SOCKET_IFNAME="$ifname"
    return 0
  fi
  ifname="$(sed_socket_ifname "$MASTER_ADDR")" || ifname=""
  if [ -z "$ifname" ]; then
    echo "rendezvous.sh: no interface found for MASTER_ADDR=$MASTER_ADDR; GLOO/NCCL pick their own" >&2
    return 0
  fi
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ifname}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
}
