#!/usr/bin/env bash
# An emulated multi-node SLURM cluster on one Linux host (root needed).
#
#   jobs/emulated-cluster.sh start N       # N nodes node1..nodeN (1..8 tested); prints `export SLURM_CONF=...` last
#   jobs/emulated-cluster.sh stop          # ends only what this script started; removes bridge, veths, rules
#   jobs/emulated-cluster.sh status        # what runs (exit 0 when controller and all nodes are up)
#   jobs/emulated-cluster.sh env           # prints just `export SLURM_CONF=...`
#   jobs/emulated-cluster.sh holder-pid K  # pid (root namespace view) of node K's namespace init;
#                                          # `kill -KILL` it to simulate losing node K
#   jobs/emulated-cluster.sh exec K CMD... # run CMD inside node K's namespaces (net, uts, ipc, mount, pid)
#
# Each node is one long-lived "holder" process with private network, UTS,
# IPC, mount and PID namespaces: hostname nodeK, eth0 = 10.77.0.K/24 on a
# bridge in the root namespace, a private tmpfs /dev/shm, a private boot_id and
# its own slurmd. The file system is shared (like NFS on a real cluster).
# slurmctld and munged run in the root network namespace; slurmctld sees the
# host name "mnctl" (own UTS namespace) and is reached at the bridge address.
# Recipe and pitfalls: /work/shared/MULTINODE.md, docs/cluster.md.
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 "cannot run here" (no root / no
# CAP_SYS_ADMIN / no CAP_NET_ADMIN / no apt for missing packages) so that test
# suites can skip.
set -euo pipefail

STATE_DIR="${PROVHPC_MN_DIR:-/tmp/provhpc-mn-$UID}"
# Exports MPICH OFI/tcp to every task: see the file (SLURM 22.05 pmi2 vs long PMI-1 lines).
TASK_PROLOG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm-task-prolog.sh"
CONF="$STATE_DIR/slurm.conf"
BRIDGE="${PROVHPC_MN_BRIDGE:-mnbr0}"
NET="${PROVHPC_MN_NET:-10.77.0}"  # /24; nodes are .1 .. .N, the controller .254
CTL_IP="$NET.254"
CTL_HOST=mnctl
# Distinct from jobs/local-slurm.sh (6827/6828) and SLURM's defaults (6817/6818).
CTLD_PORT="${PROVHPC_MN_CTLD_PORT:-6917}"
SLURMD_PORT="${PROVHPC_MN_SLURMD_PORT:-6918}"
# 2 CPUs per node so `-N 3 -n 6` lands 2/2/2 (SLURM packs tasks by advertised CPUs).
NODE_CPUS="${PROVHPC_MN_CPUS:-2}"
START_TIMEOUT=60

log() { echo "emulated-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
skip() { log "cannot run here: $*"; exit 3; }

node_dir() { echo "$STATE_DIR/nodes/node$1"; }
veth_out() { echo "mnv$1"; }  # root-namespace end, enslaved to the bridge
veth_in() { echo "mnp$1"; }   # temporary name of the inside end (renamed eth0)

# Number of nodes of the running (or last started) cluster.
node_count() { cat "$STATE_DIR/nodes.count" 2>/dev/null || echo 0; }

# --- processes: only pids from our own files, with comm/namespace checks -------

# pid_from FILE COMM: the pid in FILE when alive and its comm is COMM.
pid_from() {
  local file="$1" comm="$2" pid
  [[ -r "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
  echo "$pid"
}

# holder_pid K: node K's namespace init (pid 1 inside the node), when alive and
# still in the network namespace recorded at start (guards against pid reuse).
holder_pid() {
  local d pid ns
  d="$(node_dir "$1")"
  pid="$(pid_from "$d/holder.pid" bash)" || return 1
  ns="$(readlink "/proc/$pid/ns/net" 2>/dev/null)" || return 1
  [[ "$ns" == "$(cat "$d/netns" 2>/dev/null)" ]] || return 1
  echo "$pid"
}

# wait_gone PID SECONDS: wait for PID to exit (polling, 0.1 s steps).
wait_gone() {
  local pid="$1" i
  for ((i = 0; i < $2 * 10; i++)); do
    [[ -d "/proc/$pid" ]] || return 0
    sleep 0.1
  done
  return 1
}

# stop_daemons: TERM slurmctld and munged (from our pid files) together,
# up to 3 s grace, then KILL. slurmctld waits up to ~8 s for RPCs to nodes
# that are already gone; its state is not needed (start uses -c).
stop_daemons() {
  local name pid pids=()
  for name in slurmctld munged; do
    if pid="$(pid_from "$STATE_DIR/$name.pid" "$name")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    if ! wait_gone "$pid" 3; then
      log "pid $pid still running after TERM, killing"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
  done
  rm -f "$STATE_DIR/slurmctld.pid" "$STATE_DIR/munged.pid"
}

# kill_netns_members NSLINK...: KILL every process whose network namespace is
# one of NSLINK (e.g. "net:[4026532345]"), i.e. only processes living in one of
# our nodes -- things entered with nsenter but outside the node's PID namespace.
# One stat call over /proc: a readlink per process costs ~1 s per node.
kill_netns_members() {
  local want=" $* " inode path pid
  [[ $# -gt 0 ]] || return 0
  while read -r inode path; do
    [[ "$want" == *" net:[$inode] "* ]] || continue
    pid="${path#/proc/}"
    pid="${pid%%/*}"
    [[ "$pid" != "$$" ]] && kill -KILL "$pid" 2>/dev/null || true
  done < <(stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null || true)
}

# --- prerequisites -----------------------------------------------------------

need_packages() {
  local missing=() c
  for c in slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge ip:iproute2 \
    unshare:util-linux nsenter:util-linux; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
  done
  if br_netfilter_active; then
    command -v iptables >/dev/null || missing+=(iptables)
  fi
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || skip "missing ${missing[*]} and apt-get unavailable"
  log "installing ${missing[*]} via apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # Stale or absent package lists (fresh containers): update once on failure.
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed (no network?)"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
      skip "apt-get install ${missing[*]} failed"
  fi
}

# Bridged frames go through iptables FORWARD when br_netfilter is loaded; with
# Docker's FORWARD policy DROP, MPI between nodes would hang silently.
br_netfilter_active() {
  [[ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo 0)" == 1 ]]
}

# Try everything we need in a throwaway namespace, touching nothing on the host.
check_caps() {
  [[ $EUID -eq 0 ]] || skip "must run as root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
  unshare --net true 2>/dev/null ||
    skip "'unshare --net' failed: no CAP_SYS_ADMIN (unprivileged container?)"
  unshare --net --uts --ipc --mount --propagation private --pid --fork --mount-proc true 2>/dev/null ||
    skip "cannot create uts/ipc/mount/pid namespaces (no CAP_SYS_ADMIN?)"
  unshare --net sh -c 'ip link add mnprobe0 type veth peer name mnprobe1 &&
                       ip link add mnprobebr type bridge' 2>/dev/null ||
    skip "cannot create veth/bridge links: no CAP_NET_ADMIN or no veth/bridge support in the kernel"
}

# --- configuration -------------------------------------------------------------

write_config() {
  local n="$1" k
  mkdir -p "$STATE_DIR"/{ctld,spool,log,nodes}
  chmod 700 "$STATE_DIR"
  if [[ ! -s "$STATE_DIR/munge.key" ]]; then
    dd if=/dev/urandom of="$STATE_DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE_DIR/munge.key"
  fi
  # /etc/hosts seen inside every node (bind-mounted): Hydra/MPI resolve nodeK.
  {
    echo "127.0.0.1 localhost"
    # The host's own name too: `salloc -N 3 mpiexec ...` runs mpiexec in the
    # root namespace and Hydra's proxies dial back to it by that name.
    echo "$CTL_IP $CTL_HOST $(hostname)"
    for ((k = 1; k <= n; k++)); do echo "$NET.$k node$k"; done
  } >"$STATE_DIR/hosts"
  {
    cat <<EOF
# Generated by jobs/emulated-cluster.sh -- $n emulated nodes. Rewritten on start.
ClusterName=provhpc-mn
SlurmctldHost=${CTL_HOST}(${CTL_IP})
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${STATE_DIR}/munge.sock
StateSaveLocation=${STATE_DIR}/ctld
# %n: the file system is shared by all nodes, so per-node paths.
SlurmdSpoolDir=${STATE_DIR}/spool/%n
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/spool/slurmd-%n.pid
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
TaskProlog=${TASK_PROLOG}
SlurmdParameters=config_overrides
ReturnToService=2
# Lost-node detection: slurmctld pings nodes every SlurmdTimeout/3 s and
# marks a node DOWN (killing its jobs) after SlurmdTimeout s of silence.
SlurmdTimeout=10
MessageTimeout=5
KillWait=5
InactiveLimit=0
# A batch job hit by a node failure must end (NODE_FAIL), not be requeued and
# sit pending forever on a node that never comes back.
JobRequeue=0
MinJobAge=300
UnkillableStepTimeout=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
    for ((k = 1; k <= n; k++)); do
      echo "NodeName=node$k NodeAddr=$NET.$k NodeHostname=node$k CPUs=$NODE_CPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$n] Default=YES State=UP MaxTime=INFINITE OverSubscribe=FORCE:4"
  } >"$CONF"
}

# --- network -------------------------------------------------------------------

setup_bridge() {
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    [[ -e "$STATE_DIR/bridge.created" ]] ||
      die "bridge $BRIDGE exists but was not created by this script (set PROVHPC_MN_BRIDGE)"
  else
    ip link add "$BRIDGE" type bridge
    touch "$STATE_DIR/bridge.created"
    ip addr add "$CTL_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  if br_netfilter_active && [[ ! -e "$STATE_DIR/iptables.rule" ]]; then
    iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
    echo "-i $BRIDGE -o $BRIDGE -j ACCEPT" >"$STATE_DIR/iptables.rule"
  fi
}

teardown_network() {
  local k
  # veths die with their namespace; delete leftovers of our nodes (e.g. a
  # half-started node), one `ip link` listing rather than one call per node.
  local links
  links=" $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | tr '\n' ' ') "
  for ((k = 1; k <= $(node_count); k++)); do
    if [[ "$links" == *" $(veth_out "$k") "* ]]; then ip link del "$(veth_out "$k")" 2>/dev/null || true; fi
  done
  if [[ -e "$STATE_DIR/bridge.created" ]]; then
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$STATE_DIR/bridge.created"
  fi
  if [[ -e "$STATE_DIR/iptables.rule" ]]; then
    # shellcheck disable=SC2046
    iptables -D FORWARD $(cat "$STATE_DIR/iptables.rule") 2>/dev/null || true
    rm -f "$STATE_DIR/iptables.rule"
  fi
}

# --- nodes ---------------------------------------------------------------------

start_node() {
  local k="$1" d upid init i
  d="$(node_dir "$k")"
  mkdir -p "$d" "$STATE_DIR/spool/node$k"
  # Per-node boot_id: with a shared boot_id (and IPC namespace) UCX thinks all
  # ranks share a host and silently uses shared memory instead of the network.
  cat /proc/sys/kernel/random/uuid >"$d/boot_id"
  # The holder: unshare forks pid 1 of the node, a bash loop that reaps orphans
  # (daemonised slurmd/slurmstepd end up under it). It exits on TERM, which
  # kills the whole node (the kernel kills a PID namespace with its init).
  # --kill-child: if unshare itself is killed, the node goes too.
  setsid unshare --net --uts --ipc --mount --propagation private --pid --fork --mount-proc \
    --kill-child bash -c 'trap "exit 0" TERM; while :; do sleep infinity & wait $!; done' \
    </dev/null >/dev/null 2>&1 9>&- &
  upid=$!
  echo "$upid" >"$d/unshare.pid"
  init=""
  for ((i = 0; i < 100; i++)); do
    init="$(cat "/proc/$upid/task/$upid/children" 2>/dev/null | awk '{print $1}')" || true
    [[ -n "$init" && "$(readlink "/proc/$init/ns/pid" 2>/dev/null)" != "$(readlink /proc/self/ns/pid)" ]] && break
    init=""
    sleep 0.02
  done
  [[ -n "$init" ]] || die "node$k: holder did not start"
  echo "$init" >"$d/holder.pid"
  readlink "/proc/$init/ns/net" >"$d/netns"

  ip link add "$(veth_out "$k")" type veth peer name "$(veth_in "$k")"
  ip link set "$(veth_in "$k")" netns "$init"
  ip link set "$(veth_out "$k")" master "$BRIDGE" up
  nsenter -t "$init" --net --uts --mount -- bash -euc "
    hostname node$k
    ip link set lo up
    ip link set $(veth_in "$k") name eth0
    ip addr add $NET.$k/24 dev eth0
    ip link set eth0 up
    mount --bind '$STATE_DIR/hosts' /etc/hosts
    mount -t tmpfs -o mode=1777 shm-node$k /dev/shm
    mount --bind '$d/boot_id' /proc/sys/kernel/random/boot_id
  " || die "node$k: namespace setup failed"
  # slurmd daemonises inside the node's PID namespace; its pid file holds the
  # in-namespace pid, so we never use it -- the holder is what we stop.
  nsenter -t "$init" --net --uts --ipc --mount --pid -- \
    slurmd -f "$CONF" -N "node$k" </dev/null >/dev/null 2>&1 9>&- ||
    die "node$k: slurmd failed, see $STATE_DIR/log/slurmd-node$k.log"
}

# stop_nodes: end every node this script started, all at once.
stop_nodes() {
  local d k pid holders=() netns=()
  for d in "$STATE_DIR"/nodes/node*; do
    [[ -d "$d" ]] || continue
    k="${d##*/node}"
    [[ -s "$d/netns" ]] && netns+=("$(cat "$d/netns")")
    # SIGKILL to a PID namespace's init kills every process in the node at once
    # (slurmd, slurmstepd, tasks); a graceful slurmd exit takes ~4 s per node.
    if pid="$(holder_pid "$k")"; then
      kill -KILL "$pid" 2>/dev/null || true
      holders+=("$pid")
    fi
  done
  for pid in "${holders[@]}"; do wait_gone "$pid" 5 || log "holder $pid still alive"; done
  # Anything that joined a node's network namespace without its PID namespace.
  kill_netns_members "${netns[@]}"
  for d in "$STATE_DIR"/nodes/node*; do
    [[ -d "$d" ]] || continue
    if pid="$(pid_from "$d/unshare.pid" unshare)"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$d/holder.pid" "$d/unshare.pid" "$d/netns"
  done
}

# --- controller ------------------------------------------------------------------

start_munged() {
  pid_from "$STATE_DIR/munged.pid" munged >/dev/null && return 0
  rm -f "$STATE_DIR/munge.sock"
  # The socket is a file under the state dir: nodes reach it through the shared
  # file system (path-based unix sockets work across network namespaces).
  munged --force --socket="$STATE_DIR/munge.sock" --key-file="$STATE_DIR/munge.key" \
    --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munged.seed" 9>&- || die "munged failed, see $STATE_DIR/log/munged.log"
}

start_slurmctld() {
  pid_from "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null && return 0
  # slurmctld only runs where gethostname() matches SlurmctldHost: give it a
  # UTS namespace named mnctl. It daemonises; its pid file is valid here (same
  # PID namespace). -c: start with an empty job table.
  unshare --uts bash -c "hostname $CTL_HOST && exec slurmctld -c -f '$CONF'" </dev/null 9>&- ||
    die "slurmctld failed, see $STATE_DIR/log/slurmctld.log"
}

sinfo_idle_count() {
  SLURM_CONF="$CONF" timeout 10 sinfo -h -N -t idle,mix,alloc,comp -o '%N' 2>/dev/null | sort -u | wc -l
}

all_running() {
  local n k
  n="$(node_count)"
  ((n > 0)) || return 1
  pid_from "$STATE_DIR/munged.pid" munged >/dev/null || return 1
  pid_from "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null || return 1
  for ((k = 1; k <= n; k++)); do holder_pid "$k" >/dev/null || return 1; done
}

print_env() { echo "export SLURM_CONF=$CONF"; }

# --- subcommands -----------------------------------------------------------------

cmd_start() {
  local n="${1:-}" k deadline t0=$SECONDS
  [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 253)) || { echo "usage: $0 start N (1..253)" >&2; exit 2; }
  check_caps
  need_packages
  if all_running; then
    if [[ "$(node_count)" == "$n" ]] && (($(sinfo_idle_count) == n)); then
      log "already running with $n nodes ($STATE_DIR)"
      print_env
      return 0
    fi
  fi
  # Anything left (other N, a lost node, a dead controller) is torn down first.
  if [[ -e "$STATE_DIR/nodes.count" ]] && (($(node_count) > 0)); then
    log "restarting: was $(node_count) nodes, not all healthy or a different N"
    cmd_stop 2>/dev/null
  fi
  write_config "$n"
  echo "$n" >"$STATE_DIR/nodes.count"
  setup_bridge
  start_munged
  start_slurmctld
  for ((k = 1; k <= n; k++)); do start_node "$k"; done
  deadline=$((SECONDS + START_TIMEOUT))
  until (($(sinfo_idle_count) == n)); do
    ((SECONDS < deadline)) || die "not all $n nodes idle after ${START_TIMEOUT}s; logs in $STATE_DIR/log"
    sleep 0.2
  done
  log "up: $n nodes in $((SECONDS - t0)) s: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %t %N' | head -n 1)"
  print_env
}

cmd_stop() {
  local jobs
  [[ -d "$STATE_DIR" ]] || { log "not running"; return 0; }
  # Cancel jobs so that clients in the root namespace (srun, sbatch --wait)
  # are told and exit, rather than waiting on a vanished controller.
  if pid_from "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    jobs="$(SLURM_CONF="$CONF" timeout 5 squeue -h -o %i 2>/dev/null || true)"
    # shellcheck disable=SC2086
    [[ -z "$jobs" ]] || SLURM_CONF="$CONF" timeout 5 scancel $jobs 2>/dev/null || true
  fi
  stop_nodes
  stop_daemons
  rm -f "$STATE_DIR/munge.sock"
  teardown_network
  rm -f "$STATE_DIR/nodes.count"
  log "stopped"
}

cmd_status() {
  local n k pid rc=0
  n="$(node_count)"
  echo "state dir: $STATE_DIR (nodes: $n)"
  for name in munged slurmctld; do
    if pid="$(pid_from "$STATE_DIR/$name.pid" "$name")"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"; rc=1
    fi
  done
  for ((k = 1; k <= n; k++)); do
    if pid="$(holder_pid "$k")"; then
      echo "node$k: holder pid $pid ($NET.$k)"
    else
      echo "node$k: not running"; rc=1
    fi
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && echo "bridge $BRIDGE: present" || echo "bridge $BRIDGE: absent"
  [[ -e "$STATE_DIR/iptables.rule" ]] && echo "iptables FORWARD rule: $(cat "$STATE_DIR/iptables.rule")"
  if pid_from "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    SLURM_CONF="$CONF" timeout 10 sinfo -N -o '%N %P %t %C' || rc=1
    SLURM_CONF="$CONF" timeout 10 squeue || true
  fi
  print_env
  return "$rc"
}

cmd_holder_pid() {
  local k="${1:-}"
  [[ "$k" =~ ^[0-9]+$ ]] || { echo "usage: $0 holder-pid K" >&2; exit 2; }
  holder_pid "$k" || die "node$k is not running"
}

cmd_exec() {
  local k="${1:-}" pid
  [[ "$k" =~ ^[0-9]+$ && $# -ge 2 ]] || { echo "usage: $0 exec K CMD [ARGS...]" >&2; exit 2; }
  shift
  pid="$(holder_pid "$k")" || die "node$k is not running"
  # Same environment and working directory as the caller (the file system is shared).
  exec nsenter -t "$pid" --net --uts --ipc --mount --pid --wd="$PWD" -- "$@"
}

# Serialise start/stop: parallel test workers may call them at once.
# The lock file sits beside the state dir (which stop may leave or remove).
# Daemons and holders are started with `9>&-` so they do not inherit (and
# hold) the lock.
take_lock() {
  exec 9>>"${STATE_DIR%/}.lock"
  flock -w 120 9 || die "another start/stop holds ${STATE_DIR%/}.lock"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    start) take_lock; cmd_start "$@" ;;
    stop) take_lock; cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    holder-pid) cmd_holder_pid "$@" ;;
    exec) cmd_exec "$@" ;;
    *)
      echo "usage: $0 start N|stop|status|env|holder-pid K|exec K CMD...   (state dir: $STATE_DIR)" >&2
      exit 2
      ;;
  esac
}

main "$@"
