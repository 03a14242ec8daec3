"""Post-processing under mpiexec: partitions divided among ranks, results gathered on 0."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.mpi(min_size=2)
def test_summary_and_query_divide_partitions(tmp_path):
    from mpi4py import MPI

    from provhpc.post.mpi_post import gather_or_raise, share
    from provhpc.post.query import select
    from provhpc.post.reader import Run, summary

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = None
    if rank == 0:
        try:
            from _post_runs import build_run

            run_dir = build_run(tmp_path, "run-mpi", nodes=[f"n{i}" for i in range(size + 1)])
        except Exception as exc:  # every rank must reach the bcast below
            run_dir = exc
    run_dir = comm.bcast(run_dir, root=0)
    if isinstance(run_dir, Exception):
        pytest.fail(f"rank 0 could not build the run: {run_dir}")
    mine = Run(run_dir, select=share(comm))
    assert len(mine.partition_paths) == len(range(rank, size + 1, size))
    s = summary(mine, comm)
    parts = gather_or_raise(comm, lambda: np.asarray(select(mine, "tasks", kind="epoch")))
    if rank == 0:
        whole = Run(run_dir)
        ref = summary(whole)
        for key in ("records_total", "records_by_kind", "nodes", "world_size", "ranks"):
            assert s[key] == ref[key], key
        rows = np.concatenate(parts)
        assert len(rows) == len(select(whole, "tasks", kind="epoch")) == 3 * (size + 1)
    else:
        assert s is None and parts is None


@pytest.mark.mpi(min_size=2)
def test_a_failing_rank_does_not_deadlock():
    from mpi4py import MPI

    from provhpc.post.mpi_post import RankFailed, gather_or_raise

    comm = MPI.COMM_WORLD

    def work():
        if comm.Get_rank() == 1:
            raise OSError("partition x.h5 is corrupt")
        return comm.Get_rank()

    if comm.Get_rank() == 0:
        with pytest.raises(RankFailed, match="rank 1: OSError: partition x.h5 is corrupt"):
            gather_or_raise(comm, work)
    else:
        assert gather_or_raise(comm, work) is None
