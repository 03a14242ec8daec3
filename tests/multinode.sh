#!/usr/bin/env bash
# The multi-node part of the suite: an emulated 3-node SLURM cluster
# (jobs/emulated-cluster.sh start 3: node1..node3, own network/UTS/IPC/mount/PID
# namespaces, private /dev/shm), then tests/multinode.  The cluster is always
# stopped (trap) and checked gone: no holder, daemon or process in a node's
# namespaces, no bridge, no veth.  Skips cleanly, with the reason, where the
# cluster cannot run here (not root, no namespaces/veth/bridge, no apt): exit 3.
# Returns pytest's status (or 1 when something was left behind).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CLUSTER=jobs/emulated-cluster.sh
NODES=3
STATE=${PROVHPC_MN_DIR:-/tmp/provhpc-mn-$(id -u)}
BRIDGE=${PROVHPC_MN_BRIDGE:-mnbr0}

errlog=$(mktemp)
out=$(bash $CLUSTER start $NODES 2>"$errlog")
rc=$?
if [ $rc -eq 3 ]; then
  reason=$(grep -m1 'cannot run here' "$errlog" | sed 's/.*cannot run here: //')
  echo "multi-node tests skipped: ${reason:-jobs/emulated-cluster.sh start exited 3 (needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN)}"
  rm -f "$errlog"
  exit 0
fi

# What must be gone after stop: pids and namespaces of everything the cluster runs.
pids=()
declare -A namespaces=()
record() {
  local k pid f ns
  for ((k = 1; k <= NODES; k++)); do
    pid=$(bash $CLUSTER holder-pid $k 2>/dev/null) || continue
    pids+=("$pid")
    for ns in net uts ipc mnt pid; do namespaces["$(readlink /proc/$pid/ns/$ns)"]=1; done
    f=$STATE/nodes/node$k/unshare.pid
    [ -s "$f" ] && pids+=("$(cat "$f")")
  done
  for f in "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [ -s "$f" ] && pids+=("$(cat "$f")")
  done
}

leftovers() {
  local pid p ns link found=0
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "left behind: pid $pid ($(cat /proc/$pid/comm 2>/dev/null))"; found=1
    fi
  done
  for p in /proc/[0-9]*; do
    for ns in net uts ipc mnt pid; do
      link=$(readlink $p/ns/$ns 2>/dev/null) || continue
      if [ -n "${namespaces[$link]:-}" ]; then
        echo "left behind: pid ${p#/proc/} ($(cat $p/comm 2>/dev/null)) in a node's $ns namespace"
        found=1
        break
      fi
    done
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then echo "left behind: bridge $BRIDGE"; found=1; fi
  if ip -o link show | grep -E '^[0-9]+: mnv[0-9]+' >/dev/null; then
    echo "left behind: veths $(ip -o link show | grep -oE '^[0-9]+: mnv[0-9]+' | tr '\n' ' ')"
    found=1
  fi
  return $found
}

status=1
finish() {
  record  # the lost-node test restarts the cluster: its current pids count too
  bash $CLUSTER stop >/dev/null 2>>"$errlog" || echo "tests/multinode.sh: stop failed: $(tail -n 3 "$errlog")"
  if leftovers; then
    echo "emulated cluster stopped: no process, bridge, veth or namespace left"
  else
    status=1
  fi
  rm -f "$errlog"
  exit $status
}
trap finish EXIT
trap 'exit 130' INT TERM

if [ $rc -ne 0 ]; then
  echo "tests/multinode.sh: jobs/emulated-cluster.sh start $NODES failed (exit $rc)"
  cat "$errlog"
  exit 1
fi
record
eval "$(echo "$out" | grep '^export SLURM_CONF=' | tail -n 1)"
export SLURM_CONF
echo "emulated cluster up ($NODES nodes): SLURM_CONF=$SLURM_CONF"
$BIN/python -m pytest -p no:cacheprovider -q --timeout=600 tests/multinode
status=$?
