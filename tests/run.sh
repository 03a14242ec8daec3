#!/usr/bin/env bash
# The whole suite, in parts: lint (ruff), unit (no MPI launcher), mpi (pytest-mpi under the venv's
# mpiexec -n 2 and -n 4), slurm (a local SLURM started here), multinode (an emulated
# multi-node SLURM started here).  `bash tests/run.sh [part ...]`; no argument = all.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PYTHONDONTWRITEBYTECODE=1
PYTEST=(-p no:cacheprovider -q --timeout=300 --timeout-method=thread)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(lint unit mpi slurm multinode)
failed=()

run_part() {
  local name=$1; shift
  echo "=== $name: $*"
  if "$@"; then echo "=== $name: ok"; else echo "=== $name: FAILED"; failed+=("$name"); fi
}

for part in "${parts[@]}"; do
  case $part in
    lint) run_part lint $BIN/ruff check provhpc tests benchmarks examples
          run_part lint-imports $BIN/lint-imports
          run_part mypy $BIN/mypy provhpc ;;
    unit) run_part unit $BIN/python -m pytest "${PYTEST[@]}" tests --ignore=tests/mpi \
            -m "not slurm and not multinode"
          run_part gpu-check-cpu env PY=$BIN/python bash benchmarks/gpu_check.sh --fallback ;;
    mpi)
      for n in 2 4; do
        run_part "mpi-n$n" $BIN/mpiexec -n $n $BIN/python -m pytest "${PYTEST[@]}" --with-mpi \
          tests/mpi
      done ;;
    slurm) [ -f tests/slurm.sh ] && run_part slurm bash tests/slurm.sh ;;
    multinode) [ -f tests/multinode.sh ] && run_part multinode bash tests/multinode.sh ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED parts: ${failed[*]}"
  exit 1
fi
echo "all parts passed: ${parts[*]}"
