"""``provhpc merge``: compact each run into one partition, gathered in one directory.

Each source run becomes ``OUT/<run_id>/merged.h5`` written by the real
``PartitionWriter``: every node partition's records appended in turn, string
ids remapped into one table (per distinct string, not per record), rank
tables, drops and counters kept.  Readers take a record's node from its rank
(``Partition.record_nodes``), so a merged partition answers every query as
the originals did.  Sources are never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from .._progress import track
from ..format.partition import COUNTERS, TIME_COUNTERS, PartitionWriter
from .reader import Collection, Run, is_run_dir

__all__ = ["CHUNK", "merge", "merge_run"]

CHUNK = 1 << 20


def _runs(sources):
    for src in sources:
        if is_run_dir(src):
            yield Run(src)
        else:
            yield from Collection(src)


def merge_run(run: Run, out_dir: str, overwrite: bool = False) -> dict:
    dest = os.path.join(out_dir, os.path.basename(os.path.realpath(run.path)))  # not "latest"
    if os.path.exists(dest):
        if not overwrite:
            raise FileExistsError(f"{dest} exists (use --force to replace it)")
        shutil.rmtree(dest)
    os.makedirs(dest, mode=0o700)
    parts = run.partitions
    if run.errors:
        raise ValueError("cannot merge a run with unreadable partitions: "
                         + "; ".join(run.errors.values()))
    first = parts[0].attrs if parts else {}
    attrs = {"run_id": run.run_id, "node": "merged", "meta": first.get("meta", {}),
             "config": first.get("config", {}), "writer": "provhpc merge",
             "merged_from": [p.path for p in parts]}
    path = os.path.join(dest, "merged.h5")
    w = PartitionWriter(path, attrs)
    total = 0
    counters = dict.fromkeys(COUNTERS, 0)
    for p in track(parts, f"merge {run.run_id}: partitions"):
        strings = p.strings
        flags = p.f["strings"].fields("flags")[:]
        remap = np.array([w.intern(s.encode(), int(f)) for s, f in zip(strings.tolist(),
                                                                    flags.tolist())],
                         np.uint32)
        n = len(p)
        base = w.nrecords  # the batch table says which process sent each row: kept, shifted
        if "batches" in p.f:
            for b in p.f["batches"][:].tolist():
                rank, pid, seq, start, count, bflags = b
                w.note_batch(rank, pid, seq, base + start, count, bflags)
        for lo in range(0, n, CHUNK):
            recs = p.f["records"][lo:lo + CHUNK]
            recs["name"] = remap[recs["name"]]
            recs["sval"] = remap[recs["sval"]]
            w.append(recs)
        total += n
        for r in p.ranks():
            row = {k: (r[k].decode() if isinstance(r[k], bytes) else r[k].item())
                   for k in r.dtype.names}
            if not row["node"]:
                row["node"] = p.node
            w.upsert_rank((row["rank"], row["pid"], row["role"]), row)
        for d in p.drops():
            w.set_drops(int(d["rank"]), int(d["pid"]), {d["reason"].decode(): int(d["count"])})
        for k, v in p.counters().items():
            if k in TIME_COUNTERS:
                counters[k] = max(counters[k], v)
            elif k in counters:
                counters[k] += v
    w.counters.update({k: v for k, v in counters.items() if k not in ("records", "batches",
                                                                        "bytes", "strings")})
    w.close(complete=all(p.complete for p in parts))
    _write_manifest(run, dest, [p.path for p in parts])
    return {"run_id": run.run_id, "partitions": len(parts), "records": total, "path": path}


def _write_manifest(run: Run, dest: str, sources: list[str]) -> None:
    """The source's manifest, naming ``merged.h5`` as the run's one partition."""
    doc = dict(run.manifest) or {"run_id": run.run_id}
    doc["partitions"] = ["merged.h5"]
    doc["merged"] = {"from": run.path, "partitions": [os.path.basename(p) for p in sources],
                     "at": time.time_ns()}
    tmp = os.path.join(dest, "manifest.json.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, os.path.join(dest, "manifest.json"))


def merge(sources, out_dir: str, overwrite: bool = False) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    done = []
    for run in _runs(sources):
        with run:
            done.append(merge_run(run, out_dir, overwrite))
    return {"out": os.path.abspath(out_dir), "runs": done}
