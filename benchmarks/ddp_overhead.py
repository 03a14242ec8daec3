"""Overhead of provhpc.torch on a real DDP training: capture off vs on, interleaved.

Runs examples/train_ddp.py under ``mpiexec -n N provhpc run`` (or torchrun)
with ``PROVHPC_ENABLED=0`` and ``=1`` in alternating order, REPS times each,
and reports the medians of the training-loop time the example prints
(``train_seconds``, between two barriers: model, hooks, per-step ``log``,
epoch reads, validation) and of the whole job's wall time (start-up,
aggregator, partition close included), as ratio and percent, with the
per-step cost.

    .venv/bin/python benchmarks/ddp_overhead.py --reps 5 --np 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
if not os.path.isdir(BIN):
    BIN = os.path.dirname(sys.executable)
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")
STRIP = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "MPI_LOCAL", "PROVHPC_")


def command(launcher: str, np_: int, out: str, args: list[str]) -> list[str]:
    run = [os.path.join(BIN, "provhpc"), "run", "--out", out, "--",
           os.path.join(BIN, "python"), EXAMPLE, *args]
    if launcher == "torchrun":
        return [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(np_),
                "--no-python", *run]
    return [os.path.join(BIN, "mpiexec"), "-n", str(np_), *run]


def once(cmd, cwd, enabled: bool, timeout: float) -> tuple[float, float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIP)}
    env.update(PROVHPC_ENABLED="1" if enabled else "0", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    m = re.search(r"train_seconds=([0-9.]+) steps=(\d+) train_cpu_seconds=([0-9.]+)", p.stdout)
    if not m:
        raise RuntimeError(f"no train_seconds in the output:\n{p.stdout[-2000:]}")
    return float(m.group(1)), wall, int(m.group(2)), float(m.group(3))


def inproc(steps: int, blocks: int) -> dict:
    """Per-step cost of the hooks and ``log`` in one process: plain, watcher off, watcher on.

    The same model and batches as the example (MLP 32-64-64-4, batch 32, CPU, one
    thread); blocks of ``steps`` steps of the three variants interleaved, medians.
    Capture is the production one (``provhpc.init``: agent in this process, the
    aggregator in its own), so the per-step figure includes the agent's I/O thread.
    """
    import torch

    import provhpc
    import provhpc.torch as ptorch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 32), torch.randint(0, 4, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def block(w):  # CPU time of this process (all threads): stable on a loaded machine
        t0 = time.process_time()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss, batch_size=len(x))
        if w is not None:
            w.flush()
        return (time.process_time() - t0) / steps

    times = {"plain": [], "off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        w_off = ptorch.watch(model, opt)  # no agent: no hooks, log returns at once
        provhpc.init(out=tmp, argv=["ddp_overhead-inproc"])
        try:
            for b in range(blocks + 1):
                for name in (("plain", "off", "on") if b % 2 else ("on", "off", "plain")):
                    if name == "on":
                        w_on = ptorch.watch(model, opt)
                    dt = block({"plain": None, "off": w_off, "on": w_on}[name])
                    if name == "on":
                        w_on.close()
                    if b:  # block 0 warms up
                        times[name].append(dt)
        finally:
            provhpc.shutdown()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--launcher", choices=("mpiexec", "torchrun"), default="mpiexec")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--inproc-only", action="store_true",
                    help="only the in-process per-step cost (no launches)")
    args = ap.parse_args(argv)

    med = inproc(steps=500, blocks=20)
    print("in-process, CPU time per training step (median of 20 interleaved blocks of "
          "500 steps):")
    print(f"  plain {med['plain'] * 1e6:.1f} us, watcher without capture "
          f"{(med['off'] - med['plain']) * 1e6:+.2f} us, watcher with capture "
          f"{(med['on'] - med['plain']) * 1e6:+.2f} us "
          f"({100 * (med['on'] / med['plain'] - 1):+.2f} % of a CPU step of this model)",
          flush=True)
    if args.inproc_only:
        return 0

    work = tempfile.mkdtemp(prefix="provhpc-ddp-bench-")
    ex_args = ["--epochs", str(args.epochs), "--samples", str(args.samples),
               "--batch", str(args.batch), "--data", os.path.join(work, "blobs.pt"),
               "--checkpoint", os.path.join(work, "ckpt.pt")]
    cmd = command(args.launcher, args.np, os.path.join(work, "prov"), ex_args)
    once(cmd, work, False, args.timeout)  # warm-up: writes the data set, fills caches
    results = {"off": [], "on": []}
    steps = 0
    for rep in range(args.reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for enabled in order:
            train, wall, steps, cpu = once(cmd, work, enabled, args.timeout)
            results["on" if enabled else "off"].append((train, wall, cpu))
            print(f"rep {rep} capture {'on ' if enabled else 'off'}: train {train:.3f} s "
                  f"(rank 0 CPU {cpu:.3f} s), job {wall:.2f} s", flush=True)
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3))
           for k, v in results.items()}
    (t_off, w_off, c_off), (t_on, w_on, c_on) = med["off"], med["on"]
    per_step_us = (t_on - t_off) / steps * 1e6 if steps else float("nan")
    print(f"\nDDP example, {args.launcher} -n {args.np}, {steps} steps per rank, "
          f"{args.reps} interleaved repetitions, medians:")
    print(f"  training loop: off {t_off:.3f} s, on {t_on:.3f} s, ratio {t_on / t_off:.4f} "
          f"({100 * (t_on / t_off - 1):+.2f} %), {per_step_us:+.1f} us per step")
    print(f"  rank 0 CPU:    off {c_off:.3f} s, on {c_on:.3f} s, ratio {c_on / c_off:.4f} "
          f"({100 * (c_on / c_off - 1):+.2f} %), {(c_on - c_off) / steps * 1e6:+.1f} us per step")
    print(f"  whole job:     off {w_off:.2f} s, on {w_on:.2f} s, ratio {w_on / w_off:.4f} "
          f"({100 * (w_on / w_off - 1):+.2f} %)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"launcher": args.launcher, "np": args.np, "steps": steps,
                       "reps": args.reps, "runs": results, "median": med}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
