"""Capture inside an MPI job (pytest-mpi): every rank initialises provhpc in-process."""

import os

import numpy as np
import pytest

import provhpc
from provhpc.format import records as R
from provhpc.post.reader import Run


def _capture_run(comm, out, n, **settings):
    session = provhpc.init(out=out, comm=comm, **settings)
    rank = comm.Get_rank()
    hp = provhpc.hyperparameters(lr=0.1, rank=rank)
    with provhpc.stage("train", used=[hp]) as st:
        for e in range(3):
            with provhpc.epoch(e):
                for i in range(n):
                    provhpc.metric("loss", rank * 1e6 + e * n + i, step=e * n + i)
        st.generated(provhpc.data(f"model-{rank}.npz", kind="model", derived_from=[hp]))
    assert provhpc.shutdown()  # every record of this rank is on disk
    comm.Barrier()
    return session


@pytest.mark.mpi(min_size=2)
def test_every_rank_arrives_once_in_one_run(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n = 2000
    session = _capture_run(comm, shared_tmp, n)
    run_ids = comm.allgather(session.run_id)
    assert len(set(run_ids)) == 1  # one run id shared by every rank
    if comm.Get_rank() == 0:
        with Run(os.path.join(shared_tmp, session.run_id)) as run:
            ranks = run.ranks()
            assert [r["rank"] for r in ranks] == list(range(comm.Get_size()))
            for p in run.partitions:
                recs, strings = p.records(), p.strings
                for rank in np.unique(recs["rank"]):
                    sel = (recs["kind"] == R.METRIC) & (recs["rank"] == rank)
                    sel &= strings[recs["name"]] == "loss"
                    np.testing.assert_array_equal(np.sort(recs["fval"][sel]),
                                                  rank * 1e6 + np.arange(3 * n))
                epochs = recs[(recs["kind"] == R.ACTIVITY_START)
                              & (strings[recs["sval"]] == "epoch")]
                assert sorted(epochs["step"]) == sorted(list(range(3)) * len(np.unique(
                    recs["rank"])))
    comm.Barrier()


@pytest.mark.mpi(min_size=4)
def test_simulated_nodes_split_the_job(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    os.environ["PROVHPC_SIMULATE_NODES"] = "2"
    try:
        session = _capture_run(comm, shared_tmp, 100)
    finally:
        del os.environ["PROVHPC_SIMULATE_NODES"]
    nodes = comm.allgather(session.ident.node)
    if comm.Get_rank() == 0:
        assert len(set(nodes)) == 2
        with Run(os.path.join(shared_tmp, session.run_id)) as run:
            assert sorted(p.node for p in run.partitions) == sorted(set(nodes))
            assert len(run.ranks()) == comm.Get_size()
    comm.Barrier()
