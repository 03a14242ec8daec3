"""Rank 0 blocks in MPI_Barrier (C code) forever; rank 1 never joins it.

Each rank records n metric points, then writes its pid to READY.<rank>.
"""

import os
import sys
import time

from mpi4py import MPI

import provhpc

ready, n = sys.argv[1], int(sys.argv[2])
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
with provhpc.stage("train"):
    for i in range(n):
        provhpc.metric("x", rank * 1e6 + i, step=i)
    with open(f"{ready}.{rank}", "w") as fh:
        fh.write(str(os.getpid()))
    if rank == 0:
        comm.Barrier()  # blocked outside Python: the SIGTERM handler cannot run here
    else:
        while True:
            time.sleep(0.05)
