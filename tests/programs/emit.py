"""A deterministic emitter for launch tests: each rank records known content.

    provhpc run -- python emit.py --n 1000 [--kill-rank R --kill-after K]
        [--fail-rank R] [--hang] [--progress FILE]

Rank r records metric "x" with value r * 1e6 + i for i < n (step i), inside
a task per 100 points, plus a data entity and hyperparameters.  With
--kill-rank the rank SIGKILLs itself after K metric calls returned, writing K
to FILE first so tests know what must survive; --hang blocks (for SIGTERM).
"""

import argparse
import os
import signal
import time

import provhpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--progress", default="")
    args = ap.parse_args()
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK",
                                                         os.environ.get("SLURM_PROCID", "0"))))
    hp = provhpc.hyperparameters(lr=0.01, batch=32, rank_seed=rank)
    raw = provhpc.data(f"input/rank{rank}.bin", kind="raw", shard=rank)
    with provhpc.stage("train", used=[raw, hp]) as st:
        t = None
        for i in range(args.n):
            if i % 100 == 0:
                if t is not None:
                    t.end()
                t = provhpc.task("block", start=i)
                t.start()
            provhpc.metric("x", rank * 1e6 + i, step=i)
            if rank == args.kill_rank and i + 1 == args.kill_after:
                with open(args.progress, "w") as fh:
                    fh.write(str(i + 1))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == args.fail_rank and i == args.n // 2:
                raise RuntimeError(f"rank {rank} fails on purpose")
        t.end()
        out = provhpc.data(f"output/rank{rank}.bin", kind="model", derived_from=[raw, hp])
        st.generated(out, points=args.n)
    if args.hang:
        if args.progress:
            with open(f"{args.progress}.{rank}", "w") as fh:
                fh.write("ready")
        while True:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
