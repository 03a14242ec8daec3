"""A synthetic rank for the ingest benchmarks: emit metric records, then report.

    [mpiexec -n N] provhpc run -- python benchmarks/_emitter.py --count M
    [mpiexec -n N] provhpc run -- python benchmarks/_emitter.py --rate R --seconds S

``--count``: M records as fast as the node takes them (a burst; the agent
blocks on backpressure while the aggregator is behind, so the burst measures
what the node sustains).  ``--rate``: R records/s paced in 10 ms bursts for S
seconds (an offered load).  Ranks start together (MPI barrier); each ends with
``provhpc.flush()`` -- its records are on disk -- and prints one ``BENCH``
line; a node leader also reports its aggregator's CPU time and peak RSS.
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import sys
import time

from mpi4py import MPI

import provhpc


def report_aggregator(rank: int) -> None:
    from provhpc.launch import session

    s = session.current()
    if s is None or s.aggregator is None:
        return
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("BENCH_AGG " + json.dumps({"rank": rank, "node": s.ident.node,
                                     "cpu_s": ru.ru_utime + ru.ru_stime,
                                     "peak_rss": ru.ru_maxrss * 1024}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    atexit.register(report_aggregator, rank)
    metric = provhpc.metric
    comm.Barrier()
    t0 = time.perf_counter()
    n = 0
    if args.count:
        for i in range(args.count):
            metric("loss", 0.5, step=i)
        n = args.count
    else:
        burst = max(1, int(args.rate / 100))
        tick = 0.01
        end = t0 + args.seconds
        nxt = t0
        while nxt < end:
            for _ in range(burst):
                metric("loss", 0.5, step=n)
                n += 1
            nxt += tick
            pause = nxt - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    t_emit = time.perf_counter() - t0
    provhpc.flush(60)
    t_disk = time.perf_counter() - t0
    comm.Barrier()
    t_all = time.perf_counter() - t0
    print("BENCH " + json.dumps({"rank": rank, "records": n, "emit_s": t_emit,
                                 "on_disk_s": t_disk, "all_s": t_all}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
