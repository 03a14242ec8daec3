"""Ingest of one node aggregator, fed pre-encoded slots, beside raw h5py appends.

    .venv/bin/python benchmarks/aggregator.py [--quick] [--ranks 4] [--batches 256] [--profile]

provhpc: the real aggregator process (``provhpc aggregate``) serving N
replayed ranks (benchmarks/_replay.py): records encoded once, copied into
the ranks' shared-memory slots and handed over with real batch frames, so
only the node side is timed -- frame handling, string remap, append,
flush, slot zeroing, ack.  Rate = stored records / (first batch .. last ack).

raw h5py: the same rows, in the same slot-sized batches, appended in this
process to a dataset made as the partition's (chunks, filters, libver, SWMR
read back from a ``PartitionWriter``), either flushed after every batch or
once at the end (plain append speed, the ceiling).  The targets are judged
against the ceiling: >= 60 % uncompressed, >= 90 % with lzf.

All variants of all compressions are interleaved over the repetitions.
``--profile`` adds one cProfile'd aggregator run per compression (outside
the timed figures) and prints where its time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _replay as RP  # noqa: E402

TARGETS = {"none": 0.6, "lzf": 0.9}


def cases(args, cfg, work: str) -> dict:
    out = {}
    for c in args.compression.split(","):
        rp = RP.Replay(args.ranks, args.batches, c, "", cfg)
        rows = rp.stored_rows()

        def replay(c=c):
            d = RP.scratch()
            try:
                return RP.Replay(args.ranks, args.batches, c, os.path.join(d, "w"), cfg).run()
            finally:
                shutil.rmtree(d, ignore_errors=True)

        out[(c, "provhpc")] = replay
        out[(c, "raw, flush per batch")] = lambda c=c, rows=rows: RP.raw_h5py(
            rows, c, os.path.join(work, "r"), flush_each=True)
        out[(c, "raw, flush at end")] = lambda c=c, rows=rows: RP.raw_h5py(
            rows, c, os.path.join(work, "r"), flush_each=False)
    return out


def profile(args, cfg, c: str) -> str:
    d = RP.scratch()
    try:
        prof = os.path.join(d, "agg.prof")
        r = RP.Replay(args.ranks, args.batches, c, os.path.join(d, "w"), cfg, profile=prof).run()
        return (f"### compression {c}: {r['records']:,} records, {r['rate'] / 1e6:.2f} M rec/s "
                f"under the profiler\n\n" + RP.profile_summary(prof, args.top))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions, 64 batches per rank")
    ap.add_argument("--ranks", type=int, default=4, help="replayed ranks on the node")
    ap.add_argument("--batches", type=int, default=None, help="slots per rank (default 256)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compression", default="none,lzf")
    ap.add_argument("--profile", action="store_true", help="also profile the aggregator")
    ap.add_argument("--top", type=int, default=15, help="functions in the profile table")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    args.batches = args.batches or (64 if args.quick else 256)
    from provhpc.launch import config

    cfg = config.load()
    work = RP.scratch()
    try:
        t0 = time.monotonic()
        samples = C.interleave(cases(args, cfg, work), args.reps)
        elapsed = time.monotonic() - t0
        profiles = [profile(args, cfg, c) for c in args.compression.split(",")] \
            if args.profile else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, cfg, samples, elapsed, profiles)
    return 0


def report(args, cfg, samples, elapsed, profiles) -> None:
    total = args.ranks * args.batches * cfg.slot_records
    print(f"# aggregator ingest (pre-encoded replay): {args.ranks} ranks x {args.batches} slots "
          f"x {cfg.slot_records:,} records = {total:,} records -> one node partition;\n"
          f"# median (range) of {args.reps} interleaved repetitions; {elapsed:.0f} s\n"
          f"# {C.machine()}\n")
    rows, doc = [], {"args": vars(args), "machine": C.machine(), "compression": {}}
    for c in args.compression.split(","):
        p = [s["rate"] for s in samples[(c, "provhpc")]]
        raw_b = [s["rate"] for s in samples[(c, "raw, flush per batch")]]
        raw_e = [s["rate"] for s in samples[(c, "raw, flush at end")]]
        ratio, ratio_b = C.med(p) / C.med(raw_e), C.med(p) / C.med(raw_b)
        target = TARGETS.get(c)
        ps = samples[(c, "provhpc")]
        cpu_rate = C.med([s["records"] / s["agg_cpu_s"] for s in ps if s["agg_cpu_s"] > 0])
        ok = all(s["stored"] >= s["records"] and s["complete"] and s["exit"] == 0 for s in ps)
        k = lambda v: f"{C.med(v) / 1e3:,.0f} ({C.fmt_range([x / 1e3 for x in v])})"  # noqa: E731
        rows.append([c, k(p), k(raw_e), k(raw_b), f"{ratio:.0%}",
                     f"{target:.0%}: {C.verdict(ratio >= target)}" if target else "-",
                     f"{ratio_b:.0%}", f"{cpu_rate / 1e3:,.0f}",
                     f"{C.med([s['rss_quarter'] for s in ps]) / 2**20:.0f} / "
                     f"{C.med([s['rss_end'] for s in ps]) / 2**20:.0f} / "
                     f"{max(s['peak_rss'] for s in ps) / 2**20:.0f}",
                     f"{ps[-1]['bytes'] / ps[-1]['records']:.1f}", "yes" if ok else "NO"])
        variants = ("provhpc", "raw, flush per batch", "raw, flush at end")
        doc["compression"][c] = {"samples": {v: samples[(c, v)] for v in variants},
                                 "ratio_vs_end": ratio, "ratio_vs_batch": ratio_b}
    print(C.table(["compression", "provhpc k rec/s", "raw (flush at end)", "raw (flush/batch)",
                   "vs end", "target", "vs flush/batch", "agg CPU-bound k rec/s",
                   "agg RSS MiB 1/4 / end / peak", "B/record", "all stored"], rows))
    print("\nprovhpc = the real aggregator process fed by replayed ranks (frames, remap, append, "
          "flush, zero, ack);\nraw = the same rows and batches with plain h5py in one process; "
          "the target is judged against raw (flush at end).\nagg CPU-bound = records / the "
          "aggregator's CPU seconds while timed: its rate with a core of its own.\n"
          "agg RSS at 1/4 of the records and at the end: equal when memory stays bounded.")
    for text in profiles:
        print("\n" + text)
    C.dump_json(args.json, doc)


if __name__ == "__main__":
    sys.exit(main())
