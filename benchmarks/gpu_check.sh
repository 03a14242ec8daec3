#!/usr/bin/env bash
# GPU check: DDP training with nccl on every GPU, NVML telemetry, capture overhead on GPU.
#
#   bash benchmarks/gpu_check.sh              # detect: the GPU check, or the CPU fallback
#   bash benchmarks/gpu_check.sh --fallback   # the CPU fallback only (what `make test` runs)
#
# With an NVIDIA GPU (nvidia-smi lists one and torch sees CUDA):
#   1. examples/train_ddp.py under torchrun, one rank per GPU (nccl), under `provhpc run`
#      with telemetry every 0.5 s; the partition must hold every rank's records and
#      NVML samples (telemetry.gpu_*) naming each rank's GPU;
#   2. benchmarks/ddp_overhead.py on the GPUs (capture off vs on, interleaved);
#   3. benchmarks/overhead.py with one rank per core but one (the aggregator's).
# Without one: says so, and runs the same path on the CPU in seconds -- the DDP example
# (gloo, one rank) with capture on and off, the partition and its CPU telemetry checked,
# and NVML's absence shown as it is -- so that the script cannot rot.
#
# Writes one summary, $OUT/gpu_check.md (OUT defaults to a temporary directory, removed
# at the end).  PY: the Python to use (default .venv/bin/python, else python3).
# GPU_CHECK_REPS (default 5): repetitions of the overhead benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FALLBACK_ONLY=0
[ "${1:-}" = "--fallback" ] && FALLBACK_ONLY=1
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
BIN=$(dirname "$PY")
REPS=${GPU_CHECK_REPS:-5}
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d -t provhpc-gpu-check-XXXXXX)
  trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"
SUMMARY=$OUT/gpu_check.md
: >"$SUMMARY"
failed=0
nstep=0
LIMIT=60

say() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT CMD...: run (LIMIT seconds at most), log kept in the summary
  local name=$1; LIMIT=$2; shift 2
  nstep=$((nstep + 1))
  LOG=$OUT/step-$nstep.log
  say ""
  say "## $name"
  say '```'
  say "\$ $*"
  local t0=$SECONDS rc
  if [ "$(type -t "$1")" = function ]; then  # its commands run under `timeout $LIMIT`
    "$@" >"$LOG" 2>&1
  else
    timeout "$LIMIT" "$@" >"$LOG" 2>&1
  fi
  rc=$?
  tail -n 40 "$LOG" | tee -a "$SUMMARY"
  say '```'
  say "exit $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}

# ---------------------------------------------------------------------- detection
NGPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1; then
  NGPU=$(grep -c '^GPU ' "$OUT/nvidia-smi.txt")
  WHY="nvidia-smi lists $NGPU GPU(s)"
  if [ "$NGPU" -gt 0 ]; then
    CUDA=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    [ "$CUDA" -gt 0 ] || WHY="$WHY, but torch sees no CUDA device (a CPU-only torch?)"
    NGPU=$CUDA
  fi
elif command -v nvidia-smi >/dev/null 2>&1; then
  WHY="nvidia-smi found but failed: $(head -c 200 "$OUT/nvidia-smi.txt")"
else
  WHY="nvidia-smi not found"
fi
say "# provhpc GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "machine: $(uname -n) $(uname -m), $(nproc) cores; $("$PY" -V 2>&1); $PY"
if [ "$NGPU" -gt 0 ] && [ $FALLBACK_ONLY -eq 0 ]; then
  say "GPU: $NGPU found ($WHY)"
  sed 's/^/    /' "$OUT/nvidia-smi.txt" | tee -a "$SUMMARY"
else
  if [ "$NGPU" -gt 0 ]; then
    say "GPU: $NGPU found, but --fallback was given: CPU fallback only"
  else
    say "GPU: no usable NVIDIA GPU found ($WHY): running the CPU fallback"
  fi
  NGPU=0
fi
NVML=$("$PY" -c 'import pynvml
try:
    pynvml.nvmlInit(); print("NVML ok:", pynvml.nvmlDeviceGetCount(), "device(s), driver",
                              pynvml.nvmlSystemGetDriverVersion())
except pynvml.NVMLError as e:
    print("NVML unavailable:", type(e).__name__)' 2>&1 | tail -n 1)
say "NVML (nvidia-ml-py): $NVML"

# ---------------------------------------------------------------------- the checks
# check_run DIR RANKS GPUS: every rank stored records, the partition is complete, telemetry
# was sampled; with GPUS > 0, NVML samples name a GPU for every rank.
check_run() {
  timeout "$LIMIT" "$PY" - "$1" "$2" "$3" <<'EOF'
import glob, os, sys
import provhpc
from provhpc.node.telemetry import samples
out, ranks, gpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
(run_dir,) = [d for d in glob.glob(os.path.join(out, "*")) if not os.path.islink(d)]
run = provhpc.open(run_dir)
rows = run.ranks()
recs = sum(int(r["records"]) for r in rows)
assert len(rows) >= ranks and all(int(r["records"]) > 0 for r in rows), rows
assert all(p.complete for p in run.partitions), "partition not complete"
s = samples(run)
names = sorted(set(s["name"]))
gpu = s[[n.startswith("telemetry.gpu_") for n in s["name"]]]
print(f"run {run.run_id}: {len(rows)} rank(s), {recs:,} records, "
      f"{len(run.partitions)} complete partition(s)")
print(f"telemetry: {len(s)} samples of {len(names)} quantities; GPU (NVML) samples: {len(gpu)}")
if gpus:
    devs = {int(r): d for r, d in zip(gpu["rank"], gpu["device"])}
    assert len(devs) >= ranks, f"NVML samples for ranks {sorted(devs)} only"
    for r in sorted(devs):
        util = gpu[(gpu["rank"] == r)
                   & (gpu["name"] == "telemetry.gpu_utilization_percent")]["value"]
        print(f"  rank {r}: {devs[r]}, utilisation max {util.max() if len(util) else 'n/a'}")
else:
    assert not len(gpu), "GPU samples on a machine without a GPU"
    assert len(s), "no telemetry samples"
    print("  (no GPU: CPU, memory and I/O samples only, as expected)")
EOF
}

ddp_once() {  # ddp_once ENABLED PROV_DIR LAUNCH...: one DDP training, its train_seconds line
  local enabled=$1 prov=$2; shift 2
  PROVHPC_ENABLED=$enabled PROVHPC_TELEMETRY_INTERVAL=0.5 OMP_NUM_THREADS=1 \
    timeout "$LIMIT" "$@" "$BIN/provhpc" run --out "$prov" -- "$PY" examples/train_ddp.py "${DDP_ARGS[@]}"
}

if [ "$NGPU" -gt 0 ]; then
  DDP_ARGS=(--epochs 3 --samples 65536 --batch 256 --data "$OUT/blobs.pt"
            --checkpoint "$OUT/ckpt.pt")
  TORCHRUN=("$BIN/torchrun" --standalone --nproc-per-node "$NGPU" --no-python)
  step "DDP example, nccl, $NGPU GPU(s), capture on" 300 \
    ddp_once 1 "$OUT/prov-gpu" "${TORCHRUN[@]}" && \
    step "partition and NVML telemetry" 120 check_run "$OUT/prov-gpu" "$NGPU" "$NGPU"
  step "overhead of provhpc.torch on GPU (ddp_overhead.py)" 420 \
    "$PY" benchmarks/ddp_overhead.py --launcher torchrun --np "$NGPU" --reps "$REPS" \
    --epochs 2 --samples 65536 --batch 256
  RANKS=$(( $(nproc) > 2 ? $(nproc) - 1 : $(nproc) ))
  step "training overhead, $RANKS pinned ranks (overhead.py)" 540 \
    "$PY" benchmarks/overhead.py --ranks "$RANKS" --reps $((REPS > 7 ? REPS : 7)) \
    --epochs 2 --variants off,provhpc
else
  DDP_ARGS=(--epochs 1 --samples 512 --data "$OUT/blobs.pt" --checkpoint "$OUT/ckpt.pt")
  step "CPU fallback: DDP example, gloo, 1 rank, capture on" 120 \
    ddp_once 1 "$OUT/prov-cpu"
  on=$(grep -h -o 'train_seconds=[0-9.]*' "$LOG" | head -n 1)
  [ -n "$on" ] && step "CPU fallback: partition and telemetry" 60 check_run "$OUT/prov-cpu" 1 0
  step "CPU fallback: the same run with capture off" 120 ddp_once 0 "$OUT/prov-off"
  off=$(grep -h -o 'train_seconds=[0-9.]*' "$LOG" | head -n 1)
  say ""
  say "capture on (${on:-no figure}) and off (${off:-no figure}) ran once each on the CPU:"
  say "a check that both paths work, not a measurement (docs/benchmarks.md has those)."
fi

say ""
if [ $failed -eq 0 ]; then say "gpu_check: all steps passed"; else say "gpu_check: $failed step(s) FAILED"; fi
[ -n "${KEEP_SUMMARY:-}" ] && cp "$SUMMARY" "$KEEP_SUMMARY"
exit $((failed > 0))
