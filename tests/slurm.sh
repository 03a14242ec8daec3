#!/usr/bin/env bash
# The SLURM part of the suite: a one-node SLURM on localhost (jobs/local-slurm.sh),
# then tests/slurm (real srun / sbatch / scancel).  Skips cleanly, with a clear
# message, where SLURM cannot be brought up (no apt, not root): exit code 3.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

out=$(bash jobs/local-slurm.sh start)
rc=$?
if [ $rc -eq 3 ]; then
  echo "SLURM unavailable: skipping SLURM tests (jobs/local-slurm.sh start exited 3: no apt/SLURM here)"
  exit 0
elif [ $rc -ne 0 ]; then
  echo "tests/slurm.sh: jobs/local-slurm.sh start failed (exit $rc)"
  echo "$out"
  bash jobs/local-slurm.sh stop || true
  exit 1
fi
trap 'bash jobs/local-slurm.sh stop >/dev/null 2>&1 || true' EXIT
eval "$(echo "$out" | grep '^export SLURM_CONF=' | tail -n 1)"
export SLURM_CONF
echo "local SLURM up: SLURM_CONF=$SLURM_CONF"
$BIN/python -m pytest -p no:cacheprovider -q --timeout=300 tests/slurm
