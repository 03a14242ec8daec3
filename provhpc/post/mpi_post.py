"""Post-processing under ``mpiexec``: partitions divided among ranks, results gathered on 0.

No home-made scheduler: rank r reads partitions ``r, r+N, r+2N, ...`` and
rank 0 combines.  Every collective is reached by every rank even when its
share failed (the failure travels as a value), so one bad partition cannot
deadlock the job.
"""

from __future__ import annotations

import os

__all__ = ["RankFailed", "comm_from_env", "gather_or_raise", "share"]

_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


def comm_from_env():
    """``MPI.COMM_WORLD`` when started by an MPI launcher with more than one rank, else None.

    mpi4py is imported only then: a plain ``provhpc query`` never initialises MPI.
    """
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def share(comm):
    """A ``select`` for ``Run``: this rank's share of the partition paths."""
    if comm is None:
        return None
    rank, size = comm.Get_rank(), comm.Get_size()
    return lambda paths: paths[rank::size]


class RankFailed(RuntimeError):
    """Another rank's share of the work raised."""


def gather_or_raise(comm, fn, root: int = 0):
    """Run ``fn()`` on every rank, gather the results on ``root``.

    Returns the list of results on ``root`` and None elsewhere; raises
    ``RankFailed`` on ``root`` when any rank's ``fn`` raised (naming rank and error).
    """
    try:
        item = (True, fn())
    except Exception as exc:  # carried to root instead of leaving the collective
        item = (False, f"{type(exc).__name__}: {exc}")
    items = comm.gather(item, root=root)
    if comm.Get_rank() != root:
        return None
    bad = [f"rank {i}: {v}" for i, (ok, v) in enumerate(items) if not ok]
    if bad:
        raise RankFailed("; ".join(bad))
    return [v for _, v in items]
