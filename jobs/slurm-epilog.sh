#!/bin/bash
# SLURM epilog: write how each provhpc run of the ending job ended into its manifest
# (`ended`, and SLURM's verdict where it is known by now), so that `provhpc summary`,
# `ls` and `watch` read it from the file system alone, long after SLURM forgot the job.
#
# Install (a site's choice; see docs/cluster.md "How a job ended"):
#   slurm.conf:  Epilog=/path/to/provhpc/jobs/slurm-epilog.sh       (root, per node, after
#                                                                    the job's tasks)
#            or  TaskEpilog=/path/to/provhpc/jobs/slurm-epilog.sh   (as the user, per task;
#                                                                    acts for task 0 only)
#   and, in the script's environment or below, where provhpc lives:
#     PROVHPC_BIN=/path/to/venv/bin/provhpc
#
# Which runs: those whose manifest names this SLURM job (meta.job_id), found in
#   $PROVHPC_OUT                      the job's own output dir (a TaskEpilog sees the job's
#                                     environment; an Epilog does not)
#   $SLURM_JOB_WORK_DIR/provenance    provhpc's default --out, relative to the job's dir
#   each dir of $PROVHPC_EPILOG_DIRS  (colon-separated) the site's scratch areas
#
# What it does per run: `provhpc recover RUN` (repairs what a killed aggregator left,
# salvages dead ranks' segments, records the end), as the job's user when run as root.
# It waits up to PROVHPC_EPILOG_WAIT seconds (default 20) for the run's aggregators to
# close their partitions.  It never fails the job: SLURM drains a node whose epilog
# fails, so every error is logged to stderr (slurmd's log) and the exit status is 0.
#
# What SLURM can tell here: a time limit (Reason=TimeLimit), a preemption and a requeue
# are known while the job completes; `scancel` is not (the job reads COMPLETING, reason
# None, until it is gone): such a run's verdict stays "not final" and `provhpc summary`
# asks SLURM again later (scontrol for MinJobAge seconds, sacct where accounting is kept).
set -u

BIN="${PROVHPC_BIN:-$(command -v provhpc 2>/dev/null || true)}"
JOB="${SLURM_JOB_ID:-}"
WAIT="${PROVHPC_EPILOG_WAIT:-20}"
log() { echo "provhpc-epilog: job ${JOB:-?}: $*" >&2; }

[ -n "$JOB" ] || { log "no SLURM_JOB_ID: not run by SLURM"; exit 0; }
[ -n "$BIN" ] && [ -x "$BIN" ] || { log "provhpc not found (set PROVHPC_BIN)"; exit 0; }
if [ "${SLURM_SCRIPT_CONTEXT:-}" = "epilog_task" ] &&
  [ "${SLURM_PROCID:-0}" != "0" ]; then
  exit 0 # a TaskEpilog: one task is enough (others end the same run)
fi

dirs=()
[ -n "${PROVHPC_OUT:-}" ] && dirs+=("$PROVHPC_OUT")
[ -n "${SLURM_JOB_WORK_DIR:-}" ] && dirs+=("$SLURM_JOB_WORK_DIR/provenance")
IFS=: read -r -a extra <<<"${PROVHPC_EPILOG_DIRS:-}"
dirs+=("${extra[@]}")

as_user=()
if [ "$(id -u)" = "0" ] && [ -n "${SLURM_JOB_USER:-}" ] && [ "$SLURM_JOB_USER" != "root" ]; then
  as_user=(runuser -u "$SLURM_JOB_USER" --) # the manifest stays the user's file
fi

PY="$(dirname "$BIN")/python"
[ -x "$PY" ] || PY=python3
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  # the runs of this job in d: one path per line (attempts of a requeued job included;
  # a run already given its end is skipped)
  runs="$("$PY" - "$d" "$JOB" <<'EOF'
import json, os, sys
out, job = sys.argv[1], sys.argv[2]
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if name == "latest" or os.path.islink(path):
        continue
    try:
        with open(os.path.join(path, "manifest.json")) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        continue
    if str((doc.get("meta") or {}).get("job_id")) == job and not (
            doc.get("ended") and (doc.get("scheduler") or {}).get("final")):
        print(path)
EOF
)"
  while IFS= read -r run; do
    [ -n "$run" ] || continue
    for ((i = 0; i < WAIT * 2; i++)); do # the aggregators close their partitions
      "${as_user[@]}" "$BIN" ls --json "$run" 2>/dev/null | grep -q '"end": "running"' || break
      sleep 0.5
    done
    if "${as_user[@]}" "$BIN" recover "$run" >&2; then
      log "recorded the end of $run"
    else
      log "provhpc recover $run failed (exit $?): see above"
    fi
  done <<<"$runs"
done
exit 0
