"""MPI tests run as `mpiexec -n N python -m pytest --with-mpi tests/mpi`.

A failure on some ranks followed by a collective on the others would hang the
job; a failed test therefore aborts the whole job, which the launcher reports
as a non-zero exit.
"""

import sys
import tempfile

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "mpi" in item.keywords:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            sys.stderr.write(f"\n{report.longreprtext}\n[rank {MPI.COMM_WORLD.Get_rank()}] "
                             f"{item.nodeid} failed: aborting the MPI job\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


@pytest.fixture
def shared_tmp():
    """One temporary directory for all ranks (made by rank 0, broadcast)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="provhpc-mpi-") if comm.Get_rank() == 0 else None
    path = comm.bcast(path, root=0)
    yield path
    comm.Barrier()
    if comm.Get_rank() == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
