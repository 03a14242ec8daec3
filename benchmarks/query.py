"""Query cost at scale: provhpc partitions vs scanning a JSONL dump of the same records.

    .venv/bin/python benchmarks/query.py [--records 10000000] [--dir /tmp/provhpc-qbench]

Builds a synthetic run with the real writer (``provhpc.format.partition.PartitionWriter``,
one partition per node): per rank, raw input files (with content hashes),
then training steps, each 8 records (task start, a parameter, used raw file,
output entity, wasGeneratedBy, wasDerivedFrom, a loss metric, task end), and
every 1000 steps a checkpoint derived from the outputs since the last one.
The same records are written as JSON lines, one object per record, the way
Flowcept's offline mode dumps its messages.

Then it writes the run index (``provhpc index``, timed once) and answers the
same questions both ways, printing times and ratios: lineage backward from a
checkpoint, lineage forward from a raw file, a task filter (rank, duration,
time window), a metric filter, an attribute comparison.  provhpc is timed

* cold, indexed: a fresh ``provhpc.open`` of the indexed run (what a new
  process pays: it reads the columns the query needs from ``index.hdf5``);
* cold, no index: a fresh open that decodes the partitions and builds the
  graph (``use_index=False``; skipped with ``--skip-unindexed``);
* warm: the same open run asked again (tables and graph in memory).

The JSONL side always scans the file, as it must.  The page cache is warm for
both sides (the files were just written).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

import provhpc  # noqa: E402
from provhpc import records as R  # noqa: E402
from provhpc.format.partition import PartitionWriter  # noqa: E402
from provhpc.post.indexing import build as build_index  # noqa: E402
from provhpc.post.lineage import lineage  # noqa: E402
from provhpc.post.query import select  # noqa: E402
from provhpc.post.reader import Run  # noqa: E402

PER_STEP = 8
CKPT_EVERY = 1000
RAW_PER_RANK = 64


# ---------------------------------------------------------------------- synthetic run
def _strings(writer, texts):
    """Intern many strings at once (the writer's layout, one resize instead of one per string)."""
    data = [t.encode() for t in texts]
    lengths = np.array([len(d) for d in data], np.uint32)
    base = writer._nstrings
    offs = writer._heap_n + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    blob = np.frombuffer(b"".join(data), "u1")
    writer.heap.resize((writer._heap_n + len(blob),))
    writer.heap[writer._heap_n:] = blob
    writer.strings.resize((base + len(data),))
    rows = np.zeros(len(data), writer.strings.dtype)
    rows["offset"], rows["length"] = offs, lengths
    writer.strings[base:] = rows
    writer._heap_n += len(blob)
    writer._nstrings += len(data)
    writer.counters["strings"] += len(data)
    return np.arange(base, base + len(data), dtype=np.uint32)


def rank_records(rank, steps, t0, ids, rng):
    """All records of one rank as a structured array (vectorised), ids = string ids."""
    n_raw = RAW_PER_RANK
    n_ck = steps // CKPT_EVERY
    out = np.zeros(steps * PER_STEP + n_raw * 2 + n_ck * (2 + CKPT_EVERY) + 2, R.RECORD_DTYPE)
    out["rank"] = rank
    out["step"] = R.NO_STEP
    i = 0
    # the rank's run activity (id 1)
    out[i] = (R.ACTIVITY_START, 0, 0, rank, 1, 0, t0, ids["python"], ids["run"], R.NO_STEP,
              0, 0.0)
    i += 1
    raw_ids = 2 + np.arange(n_raw, dtype=np.uint64)
    sl = slice(i, i + n_raw)
    out["kind"][sl], out["id"][sl], out["ref"][sl] = R.ENTITY, raw_ids, 1
    out["name"][sl], out["sval"][sl] = ids["raw"][rank * n_raw:(rank + 1) * n_raw], ids["k_raw"]
    out["t"][sl] = t0 + 1000 + np.arange(n_raw)
    i += n_raw
    sl = slice(i, i + n_raw)
    out["kind"][sl], out["vtype"][sl], out["id"][sl] = R.ATTRIBUTE, R.V_STR, raw_ids
    out["name"][sl], out["sval"][sl] = ids["hash"], ids["hashes"][rank * n_raw:(rank + 1) * n_raw]
    out["t"][sl] = t0 + 2000 + np.arange(n_raw)
    i += n_raw
    base = 2 + n_raw
    act = base + 2 * np.arange(steps, dtype=np.uint64)
    ent = act + 1
    raw_used = raw_ids[rng.integers(0, n_raw, steps)]
    ts = t0 + 10_000 + np.arange(steps, dtype=np.int64) * 100_000
    dur = rng.gamma(4.0, 15_000, steps).astype(np.int64) + (rank == 3) * 40_000
    blk = np.zeros((steps, PER_STEP), R.RECORD_DTYPE)
    blk["rank"], blk["step"] = rank, R.NO_STEP
    kinds = [R.ACTIVITY_START, R.ATTRIBUTE, R.RELATION, R.ENTITY, R.RELATION, R.RELATION,
             R.METRIC, R.ACTIVITY_END]
    for c, k in enumerate(kinds):
        blk["kind"][:, c] = k
        blk["t"][:, c] = ts + c
    blk["t"][:, 7] = ts + dur
    blk["id"][:, 0], blk["ref"][:, 0], blk["name"][:, 0] = act, 1, ids["step"]
    blk["sval"][:, 0], blk["step"][:, 0] = ids["task"], np.arange(steps)
    blk["id"][:, 1], blk["ref"][:, 1], blk["vtype"][:, 1] = act, 1, R.V_FLOAT
    blk["name"][:, 1], blk["fval"][:, 1] = ids["lr"], 0.01 * (1 + rank % 4)
    blk["id"][:, 2], blk["ref"][:, 2], blk["name"][:, 2] = act, raw_used, ids["used"]
    blk["id"][:, 3], blk["ref"][:, 3], blk["sval"][:, 3] = ent, act, ids["k_out"]
    blk["name"][:, 3] = ids["out"][rank * steps:(rank + 1) * steps]
    blk["id"][:, 4], blk["ref"][:, 4], blk["name"][:, 4] = ent, act, ids["gen"]
    blk["id"][:, 5], blk["ref"][:, 5], blk["name"][:, 5] = ent, raw_used, ids["der"]
    blk["id"][:, 6], blk["name"][:, 6], blk["vtype"][:, 6] = act, ids["loss"], R.V_FLOAT
    blk["step"][:, 6] = np.arange(steps)
    blk["fval"][:, 6] = 2.0 * np.exp(-np.arange(steps) / steps * 3) + rng.normal(0, .05, steps)
    blk["id"][:, 7] = act
    out[i:i + steps * PER_STEP] = blk.ravel()
    i += steps * PER_STEP
    ck_base = base + 2 * steps
    for c in range(n_ck):  # checkpoints: entity, generated by its last step, derived from outputs
        cid = ck_base + c
        last = (c + 1) * CKPT_EVERY - 1
        out[i] = (R.ENTITY, 0, 0, rank, cid, act[last], ts[last] + 50, ids["ckpt"][rank][c],
                  ids["k_ckpt"], R.NO_STEP, 0, 0.0)
        out[i + 1] = (R.RELATION, 0, 0, rank, cid, act[last], ts[last] + 51, ids["gen"], 0,
                      R.NO_STEP, 0, 0.0)
        sl = slice(i + 2, i + 2 + CKPT_EVERY)
        out["kind"][sl], out["id"][sl], out["name"][sl] = R.RELATION, cid, ids["der"]
        out["ref"][sl] = ent[c * CKPT_EVERY:(c + 1) * CKPT_EVERY]
        out["t"][sl] = ts[last] + 52
        i += 2 + CKPT_EVERY
    out[i] = (R.ACTIVITY_END, 0, 0, rank, 1, 0, ts[-1] + 10**6, 0, 0, R.NO_STEP, 0, 0.0)
    i += 1
    return out[:i]


def build(run_dir, n_records, nodes, ranks_per_node, seed=0):
    os.makedirs(run_dir)
    ranks = nodes * ranks_per_node
    per_rank_extra = 2 + 2 * RAW_PER_RANK
    steps = max(CKPT_EVERY, int((n_records / ranks - per_rank_extra)
                                / (PER_STEP + (2 + CKPT_EVERY) / CKPT_EVERY)))
    steps -= steps % CKPT_EVERY
    rng = np.random.default_rng(seed)
    t0 = time.time_ns()
    total = 0
    jsonl_batches = []
    for node in range(nodes):
        name = f"node{node:03d}"
        w = PartitionWriter(os.path.join(run_dir, f"{name}.h5"),
                            {"run_id": "bench", "node": name, "meta": {}, "config": {}})
        fixed = ["python", "run", "raw", "hash", "step", "task", "lr", "used", "out",
                 "wasGeneratedBy", "wasDerivedFrom", "loss", "checkpoint"]
        fid = dict(zip(fixed, _strings(w, fixed)))
        my_ranks = list(range(node * ranks_per_node, (node + 1) * ranks_per_node))
        raw_keys = [f"/data/raw/r{r}/file{j:03d}.npy" for r in my_ranks
                    for j in range(RAW_PER_RANK)]
        hashes = [f"blake2b:{r:08x}{j:024x}" for r in my_ranks for j in range(RAW_PER_RANK)]
        outs = [f"out/r{r}/s{s}" for r in my_ranks for s in range(steps)]
        ckpts = [[f"ckpt/r{r}/c{c}.pt" for c in range(steps // CKPT_EVERY)] for r in my_ranks]
        sid_raw, sid_hash = _strings(w, raw_keys), _strings(w, hashes)
        sid_out = _strings(w, outs)
        sid_ck = [_strings(w, c) for c in ckpts]
        strings = dict(zip(range(len(fixed) + 1), [""] + fixed))
        table = np.empty(w._nstrings, object)
        table[0] = ""
        table[fid["python"]:fid["python"] + len(fixed)] = fixed
        table[sid_raw] = raw_keys
        table[sid_hash] = hashes
        table[sid_out] = outs
        for s, c in zip(sid_ck, ckpts):
            table[s] = c
        del strings
        for k, r in enumerate(my_ranks):
            ids = {"python": fid["python"], "run": fid["run"], "k_raw": fid["raw"],
                   "hash": fid["hash"], "step": fid["step"], "task": fid["task"],
                   "lr": fid["lr"], "used": fid["used"], "k_out": fid["out"],
                   "gen": fid["wasGeneratedBy"], "der": fid["wasDerivedFrom"],
                   "loss": fid["loss"], "k_ckpt": fid["checkpoint"],
                   "raw": np.concatenate([sid_raw] * 1), "hashes": sid_hash,
                   "out": sid_out, "ckpt": {r: sid_ck[k]}}
            ids["raw"] = sid_raw[k * RAW_PER_RANK:(k + 1) * RAW_PER_RANK]
            ids["raw"] = np.concatenate([np.zeros(r * RAW_PER_RANK, np.uint32), ids["raw"]])
            ids["hashes"] = np.concatenate([np.zeros(r * RAW_PER_RANK, np.uint32),
                                            sid_hash[k * RAW_PER_RANK:(k + 1) * RAW_PER_RANK]])
            ids["out"] = np.concatenate([np.zeros(r * steps, np.uint32),
                                         sid_out[k * steps:(k + 1) * steps]])
            recs = rank_records(r, steps, t0, ids, rng)
            for lo in range(0, len(recs), 1 << 20):
                w.append(recs[lo:lo + (1 << 20)])
            w.upsert_rank((r, 1000 + r, "rank"), {
                "rank": r, "local_rank": k, "pid": 1000 + r, "role": "rank", "host": name,
                "node": name, "start": t0, "end": int(recs["t"].max()), "status": "ok",
                "records": len(recs), "reported": len(recs)})
            total += len(recs)
            jsonl_batches.append((recs, table))
        w.close()
    return total, jsonl_batches, steps


def write_jsonl(path, batches):
    """One JSON object per record (strings resolved), as an offline dump would hold them."""
    kinds = R.KIND_NAMES
    with open(path, "w") as fh:
        for recs, table in batches:
            cols = {c: recs[c].tolist() for c in ("kind", "vtype", "rank", "id", "ref", "t",
                                                  "step", "ival", "fval")}
            names = table[recs["name"]].tolist()
            svals = table[recs["sval"]].tolist()
            lines = []
            for k, vt, rk, i, ref, t, st, iv, fv, nm, sv in zip(
                    cols["kind"], cols["vtype"], cols["rank"], cols["id"], cols["ref"],
                    cols["t"], cols["step"], cols["ival"], cols["fval"], names, svals):
                lines.append(json.dumps({
                    "type": kinds[k], "rank": rk, "id": i, "ref": ref, "time": t,
                    "name": nm, "sval": sv, "vtype": vt,
                    "step": None if st == R.NO_STEP else st, "ival": iv, "fval": fv}))
            fh.write("\n".join(lines))
            fh.write("\n")


# ---------------------------------------------------------------------- JSONL answers
def _scan(path):
    with open(path) as fh:
        for line in fh:
            yield json.loads(line)


def jsonl_lineage(path, key, direction):
    """Load every relation and entity from the dump, then walk the graph."""
    ents, rels = {}, []
    for r in _scan(path):
        if r["type"] == "entity":
            ents[(r["rank"], r["id"])] = r["name"]
        elif r["type"] == "relation":
            rels.append(((r["rank"], r["id"]), (r["rank"], r["ref"])))
    adj = {}
    for s, o in rels:
        a, b = (s, o) if direction == "backward" else (o, s)
        adj.setdefault(a, []).append(b)
    start = [k for k, v in ents.items() if v == key]
    seen, todo = set(start), list(start)
    while todo:
        for nb in adj.get(todo.pop(), ()):
            if nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return len(seen)


def jsonl_tasks(path, rank, min_dur_ns, lo, hi):
    starts, n = {}, 0
    for r in _scan(path):
        if r["rank"] != rank:
            continue
        if r["type"] == "activity_start" and r["sval"] == "task":
            starts[r["id"]] = r["time"]
        elif r["type"] == "activity_end" and r["id"] in starts:
            s = starts[r["id"]]
            if r["time"] - s > min_dur_ns and s <= hi and r["time"] >= lo:
                n += 1
    return n


def jsonl_metrics(path, ranks, below):
    return sum(1 for r in _scan(path) if r["type"] == "metric" and r["rank"] in ranks
               and r["name"] == "loss" and r["fval"] < below)


def jsonl_attr(path, value):
    return sum(1 for r in _scan(path) if r["type"] == "attribute" and r["name"] == "lr"
               and r["fval"] >= value)


# ---------------------------------------------------------------------- main
def timed(fn):
    gc.collect()
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/provhpc-qbench")
    ap.add_argument("--keep", action="store_true", help="keep the run and the JSONL file")
    ap.add_argument("--build-only", action="store_true", help="build the run, time nothing")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    ap.add_argument("--skip-unindexed", action="store_true",
                    help="do not time cold queries without the index (slow at 10 M records)")
    args = ap.parse_args(argv)
    if os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    os.makedirs(args.dir)
    run_dir = os.path.join(args.dir, "bench")
    jsonl = os.path.join(args.dir, "records.jsonl")
    t, (n, batches, steps) = timed(lambda: build(run_dir, args.records, args.nodes,
                                          args.ranks_per_node))
    size = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir))
    print(f"built {n:,} records in {args.nodes} partitions ({args.nodes * args.ranks_per_node} "
          f"ranks) in {t:.1f} s; {size / 2**20:.0f} MiB")
    if args.build_only:
        return 0
    t, _ = timed(lambda b=batches: write_jsonl(jsonl, b))
    del batches
    print(f"wrote the JSONL dump in {t:.1f} s; {os.path.getsize(jsonl) / 2**20:.0f} MiB")

    probe = provhpc.open(run_dir)
    n_ranks = args.nodes * args.ranks_per_node
    ck = f"ckpt/r{17 % n_ranks}/c{min(4, steps // CKPT_EVERY - 1)}.pt"
    raw = f"/data/raw/r{5 % n_ranks}/file007.npy"
    origin = probe.time_range()[0]
    probe.close()
    span = steps * 100_000 / 1e9  # seconds the synthetic steps cover (100 us apart)
    lo_s, hi_s = 0.25 * span, 0.5 * span  # a quarter of the run, in its first half
    queries = {
        "lineage backward (checkpoint)": (
            lambda r: len(lineage(r, ck).nodes),
            lambda: jsonl_lineage(jsonl, ck, "backward")),
        "lineage forward (raw file)": (
            lambda r: len(lineage(r, raw, "forward").nodes),
            lambda: jsonl_lineage(jsonl, raw, "forward")),
        "tasks: rank 3, >80 us, window": (
            lambda r: len(select(r, "tasks", kind="task", rank=[3], where=["duration_s>8.00005e-5"],
                                 since=lo_s, until=hi_s)),
            lambda: jsonl_tasks(jsonl, 3, 80_000.5, origin + int(lo_s * 1e9),
                                origin + int(hi_s * 1e9))),
        "metrics: loss < 0.5, ranks 0-7": (
            lambda r: len(select(r, "metrics", name="loss", rank=list(range(8)),
                                 where=["value<0.5"])),
            lambda: jsonl_metrics(jsonl, set(range(8)), 0.5)),
        "attribute: lr >= 0.03": (
            lambda r: len(select(r, "tasks", where=["lr>=0.03"])),
            lambda: jsonl_attr(jsonl, 0.03)),
    }
    t_index, _ = timed(lambda: build_index(run_dir))
    print(f"indexed the run (provhpc index) in {t_index:.1f} s; "
          f"{os.path.getsize(os.path.join(run_dir, 'index.hdf5')) / 2**20:.0f} MiB")
    rows = []
    warm_run = provhpc.open(run_dir)
    for name, (ours, theirs) in queries.items():
        cold_run = Run(run_dir)
        t_cold, res_cold = timed(lambda q=ours, r=cold_run: q(r))
        assert cold_run.index is not None
        cold_run.close()
        t_raw = float("nan")
        if not args.skip_unindexed:
            raw_run = Run(run_dir, use_index=False)
            t_raw, res_raw = timed(lambda q=ours, r=raw_run: q(r))
            raw_run.close()
            assert res_raw == res_cold
        ours(warm_run)  # decode the tables this query needs
        t_warm, res_warm = timed(lambda q=ours: q(warm_run))
        t_jsonl, res_jsonl = timed(theirs)
        rows.append((name, t_cold, t_raw, t_warm, t_jsonl, res_warm, res_jsonl))
        print(f"  {name:<32} indexed {t_cold:6.2f} s  no index {t_raw:7.2f} s  "
              f"warm {t_warm:7.3f} s  JSONL {t_jsonl:7.1f} s  rows {res_warm} / {res_jsonl}",
              flush=True)
        assert res_cold == res_warm
    print()
    print(f"{'query (cold = fresh open)':<32} {'indexed':>8} {'no idx':>8} {'warm':>8} "
          f"{'JSONL':>8} {'x idx':>7} {'x warm':>8}  answers (provhpc / JSONL)")
    for name, c, raw, w, j, a, b in rows:
        print(f"{name:<32} {c:8.3f} {raw:8.2f} {w:8.3f} {j:8.1f} {j / c:7.1f} {j / w:8.1f}  "
              f"{a} / {b}")
    print(f"(seconds; x = JSONL scan / provhpc; index written once in {t_index:.1f} s)")
    C.dump_json(args.json, {
        "records": n, "partitions": args.nodes, "ranks": n_ranks, "index_s": t_index,
        "queries": [{"query": name, "cold_indexed_s": c, "cold_unindexed_s": raw, "warm_s": w,
                     "jsonl_s": j, "answers": a, "jsonl_answers": b}
                    for name, c, raw, w, j, a, b in rows]})
    if not args.keep:
        shutil.rmtree(args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
