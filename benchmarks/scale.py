"""Scale sweep: 1, 2, 4, 8 simulated nodes on one machine; per-node cost vs node count.

    .venv/bin/python benchmarks/scale.py [--quick] [--nodes 1,2,4,8] [--ranks-per-node 1]
                                         [--rate 50000] [--seconds 5]

Each configuration runs ``nodes x ranks-per-node`` ranks of
benchmarks/_emitter.py under ``provhpc run`` with PROVHPC_SIMULATE_NODES=nodes:
every simulated node has its own aggregator process and partition, as a real
node would.  Each rank offers a paced load (``--rate`` records/s for
``--seconds``), so the load per node is the same in every configuration and
only the node count grows.  Reported per node: records/s stored, the
aggregator's CPU per record (its CPU time minus that of an idle aggregator,
measured in the same session) and its peak RSS; in total: records/s of the
run.  Flat per-node figures from 1 to 8 nodes mean nothing in the pipeline is
shared between nodes (what is, at 1,000 nodes, is argued in docs/scaling.md).

A configuration is launched by ``launch_config`` -- replace it to run the same
sweep on other launchers (srun, an emulated multi-node cluster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def launch_config(nodes: int, ranks_per_node: int, rate: float, seconds: float,
                  scratch: str) -> dict:
    """One configuration on this machine (simulated nodes); returns per-node figures."""
    work = tempfile.mkdtemp(dir=scratch)
    args = ["--rate", str(rate), "--seconds", str(seconds)] if rate else ["--count", "1"]
    res = C.launch("_emitter.py", args, nodes * ranks_per_node, work, nodes=nodes)
    shutil.rmtree(work, ignore_errors=True)
    p = res["partitions"]
    emitted = sum(r["records"] for r in res["ranks"])
    span = max(r["on_disk_s"] for r in res["ranks"])
    aggs = res["aggregators"]
    return {"nodes": nodes, "partitions": p["partitions"], "complete": p["complete"],
            "emitted": emitted, "stored": sum(p["per_rank_records"].values()),
            "dropped": p["dropped"], "span_s": span, "wall_s": res["wall_s"],
            "agg_cpu_s": [a["cpu_s"] for a in aggs], "agg_peak_rss": [a["peak_rss"] for a in aggs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, 3 s per run")
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--ranks-per-node", type=int, default=1)
    ap.add_argument("--rate", type=float, default=50_000, help="records/s offered per rank")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.seconds = a.seconds or (3.0 if a.quick else 6.0)
    node_counts = [int(n) for n in a.nodes.split(",")]
    scratch = tempfile.mkdtemp(prefix="provhpc-scale-")
    try:
        cases = {n: (lambda n=n: launch_config(n, a.ranks_per_node, a.rate, a.seconds, scratch))
                 for n in node_counts}
        cases["idle"] = lambda: launch_config(1, a.ranks_per_node, 0, 0, scratch)
        t0 = time.monotonic()
        samples = C.interleave(cases, a.reps)
        elapsed = time.monotonic() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    idle_cpu = C.med([c for s in samples["idle"] for c in s["agg_cpu_s"]])
    print(f"# scale sweep: {a.ranks_per_node} rank(s)/node x {a.rate:,.0f} records/s/rank "
          f"offered for {a.seconds:g} s; simulated nodes on one machine; median (range) of "
          f"{a.reps} interleaved repetitions; {elapsed:.0f} s\n# {C.machine()}\n"
          f"# idle aggregator CPU (start-up, imports, file): {idle_cpu:.2f} s, subtracted\n")
    rows, doc = [], {"args": vars(a), "machine": C.machine(), "idle_cpu_s": idle_cpu,
                     "configs": {}}
    for n in node_counts:
        ss = samples[n]
        per_node_rate = [s["stored"] / n / s["span_s"] for s in ss]
        total_rate = [s["stored"] / s["span_s"] for s in ss]
        us_per_rec = [1e6 * (c - idle_cpu) / (s["stored"] / n)
                      for s in ss for c in s["agg_cpu_s"]]
        rss = [r / 2**20 for s in ss for r in s["agg_peak_rss"]]
        ok = all(s["stored"] >= s["emitted"] and s["dropped"] == 0 and
                 s["complete"] == s["partitions"] == n for s in ss)
        rows.append([n, n * a.ranks_per_node,
                     f"{C.med(per_node_rate):,.0f} ({C.fmt_range(per_node_rate, '{:,.0f}')})",
                     f"{C.med(total_rate):,.0f}",
                     f"{C.med(us_per_rec):.2f} ({C.fmt_range(us_per_rec, '{:.2f}')})",
                     f"{C.med(rss):.0f}", "yes" if ok else "NO"])
        doc["configs"][n] = {"samples": ss, "per_node_rate": per_node_rate,
                             "agg_us_per_record": us_per_rec}
    print(C.table(["nodes", "ranks", "records/s per node", "records/s total",
                   "aggregator CPU us/record", "agg peak MiB", "all stored, complete"], rows))
    base = C.med(doc["configs"][node_counts[0]]["agg_us_per_record"])
    last = C.med(doc["configs"][node_counts[-1]]["agg_us_per_record"])
    print(f"\nper-node aggregator CPU per record, {node_counts[-1]} nodes vs {node_counts[0]}: "
          f"{last / base:.2f}x (flat = no shared cost between nodes; on 2 cores, 8 nodes "
          "oversubscribe the machine, which shows as noise, not as a trend)")
    C.dump_json(a.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
