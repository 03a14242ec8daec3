"""Training overhead of capture: the data-parallel trainer in four variants.

    .venv/bin/python benchmarks/overhead.py [--quick] [--ranks CORES] [--nodes 1] [--reps 7]

examples/train_mlp.py (numpy MLP, mpi4py Allreduce) runs under the venv's
mpiexec, through benchmarks/_trainer.py, in each variant:

  off       no capture: the provhpc API is a no-op (plain ``python``, no wrapper)
  provhpc   ``provhpc run`` (agents + one aggregator process per (simulated) node)
  jsonl     a per-rank JSONL file, one ``json.dumps`` line per record
  flowcept  Flowcept offline (FlowceptTask per activity / metric point), if installed
  provhpc+watch  (with --variants) provhpc while ``provhpc watch OUT --once --json`` runs
            every second beside the training, as a user following the job would

at up to three capture rates: ``epoch`` (metrics per epoch only), ``step``
(the loss every step) and ``stress`` (every step K metric points, K chosen
from a calibration run so that a rank records >= --stress-rate records/s,
10,000 by default).  All (variant, rate) runs of a repetition are
interleaved in shuffled order, >= 7 repetitions by default.

One rank per core by default, each pinned to its own core with
``os.sched_setaffinity`` (benchmarks/_pinned.py: the whole rank process; the
aggregator keeps every core), BLAS/OpenMP threads at 1; ``--no-pin`` runs
unpinned.  Training time = the sum of the epochs (timed inside the trainer,
capture included), the slowest rank; overhead = the median over repetitions
of the *paired* ratio against ``off`` of the same repetition, with its range
and a 95 % percentile-bootstrap confidence interval of that median.
Targets: per step, median < 1 % with the interval inside +-1 %; at the
stress rate, median < 3 %.  Also: end-to-end wall time, the aggregator's CPU
time and peak RSS, and bytes written per record.  ``--step-sleep`` emulates
accelerator time per step (the CPU waits, as it does on a GPU node); 0 makes
the step pure CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TARGET_STEP_PCT = 1.0  # per step: median below, confidence interval inside +-1 %
TARGET_STRESS_PCT = 3.0  # at --stress-rate records/s/rank: median below
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def trainer_args(a, work: str) -> list:
    return ["--epochs", str(a.epochs), "--traces", str(a.traces), "--batch", str(a.batch),
            "--step-sleep", str(a.step_sleep), "--data", os.path.join(work, "data"),
            "--checkpoint", os.path.join(work, "ckpt", "mlp.npz")]


def one_run(a, variant: str, rate: str, fanout: int, scratch: str) -> dict:
    work = tempfile.mkdtemp(dir=scratch)
    log_every = "0" if rate == "epoch" else "1"
    script_args = ["--variant", variant.split("+")[0], "--fanout", str(fanout), "--out",
                   os.path.join(work, "side"), "--", "--log-every", log_every]
    script_args += trainer_args(a, work)
    script = "_trainer.py"
    if a.pin:  # the wrapper pins the rank, then runs the trainer in the same process
        script, script_args = "_pinned.py", [script] + script_args
    env = {"FLOWCEPT_SETTINGS_PATH": os.path.join(work, "none.yaml"), **ONE_THREAD}
    watcher = _watcher(os.path.join(work, "prov")) if variant == "provhpc+watch" else None
    try:
        res = C.launch(script, script_args, a.ranks, work,
                       capture=variant.startswith("provhpc"), nodes=a.nodes, env=env)
    finally:
        watches = watcher() if watcher else 0
    ranks = res["ranks"]
    out = {"train_s": max(r["train_s"] for r in ranks), "wall_s": res["wall_s"],
           "metric_points": max(r["metric_points"] for r in ranks)}
    if variant.startswith("provhpc"):
        p = res["partitions"]
        out.update(records=p["records"], bytes=p["bytes"], dropped=p["dropped"],
                   complete=p["complete"] == p["partitions"] == max(1, a.nodes),
                   per_rank=max(p["per_rank_records"].values()),
                   agg_cpu_s=sum(x["cpu_s"] for x in res["aggregators"]),
                   agg_peak_rss=max([x["peak_rss"] for x in res["aggregators"]] or [0]),
                   watches=watches)
    else:
        side = os.path.join(work, "side")
        files = [os.path.join(side, f) for f in os.listdir(side)] if os.path.isdir(side) else []
        out["bytes"] = sum(os.path.getsize(f) for f in files)
        out["records"] = sum(r["records"] for r in ranks)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _watcher(out: str, every: float = 1.0):
    """``provhpc watch OUT --once --json`` every ``every`` s beside the training (a user
    following the job from a login node); returns a stop function giving the count of
    snapshots that answered."""
    import threading

    stop = threading.Event()
    done = [0]

    def loop():
        while not stop.wait(every):
            if not os.path.isdir(out):
                continue
            p = subprocess.run([C.venv_bin("provhpc"), "watch", out, "--once", "--json"],
                               capture_output=True, env=C.clean_env(), timeout=60)
            done[0] += p.returncode == 0

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def finish() -> int:
        stop.set()
        t.join(60)
        return done[0]

    return finish


def calibrate(a, scratch: str) -> int:
    """K metric points per step so that one rank records >= stress_rate records/s."""
    r = one_run(a, "off", "step", 1, scratch)
    steps = max(1, r["metric_points"] - 3 * a.epochs)
    step_s = r["train_s"] / steps
    return max(2, math.ceil(a.stress_rate * step_s * 1.1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 repetitions, 2 epochs (a smoke run: too few for the targets)")
    ap.add_argument("--ranks", type=int, default=C.cores(), help="default: one per core")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin each rank to a core")
    ap.add_argument("--nodes", type=int, default=1, help="simulated nodes (PROVHPC_SIMULATE_NODES)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--traces", type=int, default=2000, help="traces per raw file (data size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--step-sleep", type=float, default=0.005,
                    help="emulated accelerator seconds per step (default 0.005)")
    ap.add_argument("--rates", default="step,stress")
    ap.add_argument("--stress-rate", type=float, default=10_000, help="records/s/rank")
    ap.add_argument("--variants", default="off,provhpc,jsonl,flowcept")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.reps = a.reps or (3 if a.quick else 7)
    a.epochs = a.epochs or (2 if a.quick else 3)
    a.pin = a.pin and hasattr(os, "sched_setaffinity")
    variants = [v for v in a.variants.split(",") if v != "flowcept" or C.have("flowcept")]
    notes = [] if "flowcept" in variants or "flowcept" not in a.variants else \
        ["Flowcept not installed (pip install '.[bench]'): variant omitted"]
    rates = a.rates.split(",")
    scratch = tempfile.mkdtemp(prefix="provhpc-overhead-")
    try:
        fanout = {"epoch": 1, "step": 1}
        if "stress" in rates:
            fanout["stress"] = calibrate(a, scratch)
        cases = {(v, r): (lambda v=v, r=r: one_run(a, v, r, fanout[r], scratch))
                 for v in variants for r in rates}
        t0 = time.monotonic()
        samples = C.interleave(cases, a.reps)
        elapsed = time.monotonic() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(a, variants, rates, fanout, samples, elapsed, notes)
    return 0


def overhead(samples, variant: str, rate: str) -> dict:
    """Paired overhead (%) of ``variant`` against ``off``, repetition by repetition."""
    base = [s["train_s"] for s in samples[("off", rate)]]
    t = [s["train_s"] for s in samples[(variant, rate)]]
    paired = [100 * (x / b - 1) for x, b in zip(t, base)]
    lo, hi = C.bootstrap_ci(paired)
    return {"paired": paired, "median": C.med(paired), "ci": (lo, hi)}


def report(a, variants, rates, fanout, samples, elapsed, notes):
    pin = "each rank pinned to a core" if a.pin else "unpinned"
    print(f"# training overhead: {a.ranks} ranks on {C.cores()} cores ({pin}), "
          f"{max(1, a.nodes)} (simulated) node(s), {a.epochs} epochs, step sleep "
          f"{a.step_sleep * 1e3:g} ms;\n# median (range) [95% bootstrap CI of the median] of "
          f"{a.reps} interleaved repetitions; {elapsed:.0f} s\n# {C.machine()}\n")
    rows, doc = [], {"args": vars(a), "fanout": fanout, "machine": C.machine(), "runs": {}}
    verdicts = []
    for r in rates:
        for v in variants:
            ss = samples[(v, r)]
            t = [s["train_s"] for s in ss]
            o = overhead(samples, v, r)
            rec = C.med([s.get("records", 0) for s in ss])
            per_rank_rate = (C.med([s.get("per_rank", 0) for s in ss]) / C.med(t)
                             if v.startswith("provhpc") else
                             C.med([s["metric_points"] for s in ss])
                             / C.med(t))
            pct = "-" if v == "off" else (f"{o['median']:+.2f} "
                                          f"({C.fmt_range(o['paired'], '{:+.1f}')}) "
                                          f"[{o['ci'][0]:+.2f}..{o['ci'][1]:+.2f}]")
            agg = (f"{C.med([s['agg_cpu_s'] for s in ss]):.2f} / "
                   f"{max(s['agg_peak_rss'] for s in ss) / 2**20:.0f}") \
                if v.startswith("provhpc") else "-"
            bpr = f"{C.med([s['bytes'] / s['records'] for s in ss if s.get('records')]):.0f}" \
                if v != "off" and rec else "-"
            label = v if v != "provhpc+watch" else \
                f"{v} ({C.med([s['watches'] for s in ss]):.0f} snapshots)"
            rows.append([r + (f" (K={fanout[r]})" if r == "stress" else ""), label,
                         f"{C.med(t):.3f} ({C.fmt_range(t, '{:.3f}')})", pct,
                         f"{per_rank_rate:,.0f}", f"{C.med([s['wall_s'] for s in ss]):.2f}",
                         agg, bpr])
            doc["runs"][f"{v}/{r}"] = {"samples": ss, "overhead_pct_paired": o["paired"],
                                       "overhead_pct_median": o["median"],
                                       "overhead_pct_ci95": o["ci"]}
            if v == "provhpc":
                verdicts += targets(r, o, per_rank_rate, a)
    print(C.table(["rate", "variant", "train s", "overhead % median (range) [95% CI]",
                   "rec/s/rank*", "wall s", "agg CPU s / peak MiB", "B/record"], rows))
    if verdicts:
        print()
        print(C.table(["target (provhpc vs off)", "measured", "verdict"], verdicts))
    if "provhpc" in variants and "provhpc+watch" in variants:
        print()
        for r in rates:  # the watcher's cost: paired against provhpc of the same repetition
            base = [s["train_s"] for s in samples[("provhpc", r)]]
            w = [s["train_s"] for s in samples[("provhpc+watch", r)]]
            paired = [100 * (x / b - 1) for x, b in zip(w, base)]
            lo, hi = C.bootstrap_ci(paired)
            print(f"watch --once every 1 s beside the job ({r}): training time "
                  f"{C.med(paired):+.2f} % ({C.fmt_range(paired, '{:+.1f}')}) "
                  f"[{lo:+.2f}..{hi:+.2f}] against provhpc alone")
    print("\n* provhpc: records stored per rank / training time; others: metric points per "
          "rank / training time.\nwall s: the whole launch (interpreter, MPI and, for provhpc, "
          "aggregator start and close).\nB/record: provhpc = partition bytes / records "
          "(uncompressed, 64-byte rows + strings + tables); jsonl/flowcept = file bytes / "
          "records.")
    for n in notes:
        print("note:", n)
    C.dump_json(a.json, doc)


def targets(rate: str, o: dict, per_rank_rate: float, a) -> list:
    """The issue's targets for one rate, as (target, measured, verdict) rows."""
    lo, hi = o["ci"]
    got = f"{o['median']:+.2f} % [{lo:+.2f}..{hi:+.2f}]"
    if rate == "step":
        inside = -TARGET_STEP_PCT <= lo and hi <= TARGET_STEP_PCT
        return [[f"per step: median < {TARGET_STEP_PCT:g} %", got,
                 C.verdict(o["median"] < TARGET_STEP_PCT)],
                [f"per step: 95% CI inside +-{TARGET_STEP_PCT:g} %", got, C.verdict(inside)]]
    if rate == "stress":
        ok = o["median"] < TARGET_STRESS_PCT
        note = "" if per_rank_rate >= a.stress_rate else \
            f" (only {per_rank_rate:,.0f} rec/s/rank reached)"
        return [[f"{a.stress_rate:,.0f} rec/s/rank: median < {TARGET_STRESS_PCT:g} %",
                 got + note, C.verdict(ok and not note)]]
    return []


if __name__ == "__main__":
    sys.exit(main())
