"""Pin this rank to one core, then run a benchmark script in this process.

    [mpiexec -n N] [provhpc run --] python benchmarks/_pinned.py SCRIPT [ARGS...]

The core is the rank's local rank (MPI_LOCALRANKID, OMPI_COMM_WORLD_LOCAL_RANK,
SLURM_LOCALID; 0 without a launcher) modulo the cores this process may use,
so N ranks on N cores get one core each.  Every thread the process has is
pinned (an agent's I/O thread included; threads made later inherit it).  The
node's aggregator, started by ``provhpc run`` before this runs, keeps the
whole set of cores.  Without ``os.sched_setaffinity`` (not Linux) the script
runs unpinned.
"""

from __future__ import annotations

import os
import runpy
import sys

LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def pin() -> int:
    """Pin every thread of this process to its core; the core, or -1 when not pinned."""
    if not hasattr(os, "sched_setaffinity"):
        return -1
    local = next((int(os.environ[v]) for v in LOCAL_RANK_VARS if v in os.environ), 0)
    cores = sorted(os.sched_getaffinity(0))
    core = cores[local % len(cores)]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass  # a thread that just ended
    return core


def main() -> None:
    pin()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
