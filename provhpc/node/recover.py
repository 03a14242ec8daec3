"""``provhpc recover RUN``: repair what a killed aggregator or a lost node left behind.

An aggregator killed mid-run leaves a partition written in SWMR mode that is
consistent up to its last flush but not marked complete (plain HDF5 tools
then refuse to open it for writing), and ranks whose records were still in
their shared-memory segments.  ``recover`` copies each incomplete partition
into a fresh, complete file, adds every leftover segment of the run (exactly
once: slots whose (rank, pid, sequence) the partition already holds are
skipped), and marks the result complete.  The original file is kept beside it
as ``<node>.h5.orig``; a partition that does not open at all is renamed
``<node>.h5.corrupt`` and its node's segments go into a new partition.

Segments are read only when their process is gone, and only this user's
segments of this run (``provhpc-<uid>-<run_id>-<node>-r<rank>-p<pid>``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time

import numpy as np

from .._progress import track
from ..format import records as R
from ..format.partition import PartitionWriter, check_partition, open_partition
from ..format.procs import pid_alive
from ..format.segment import FREE, Segment, never_made, parse_segment_name, shm_dir
from ..format.strings import StringMap, unknown_ids, valid_definition

log = logging.getLogger("provhpc.recover")

_COPY_ROWS = 1 << 20
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def recover(run_dir: str, force: bool = False) -> dict:
    """Repair the partitions of ``run_dir`` and add the run's leftover segments.

    Returns a report: per partition the action taken (``ok``, ``rebuilt``,
    ``created``, ``corrupt`` (cannot be opened: moved aside), ``damaged`` (opens but its
    contents are unsound: left in place), ``in_use``) and record counts, per segment what
    was salvaged.  ``force`` also takes segments of live processes and
    partitions whose writer still runs (only for a writer known to be hung).
    """
    run_dir = os.path.realpath(run_dir)  # prov/latest is the run it points to
    run_id = os.path.basename(run_dir)
    if not _RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ValueError(f"{run_dir!r} is not a run directory")
    if not os.path.isdir(run_dir):
        os.makedirs(run_dir, mode=0o700)
    report: dict = {"run_dir": run_dir, "run_id": run_id, "partitions": [], "segments": [],
                    "errors": {}}
    parts = _partitions(run_dir, report)
    known_nodes = {node for node, _ in parts}
    segs = _leftover_segments(run_dir, run_id, known_nodes, force, report)
    by_node: dict[str, list] = {}
    for seg in segs:
        by_node.setdefault(seg["node"], []).append(seg)
    done = set()
    # the newest partition of a node (a restarted aggregator writes <node>.<n>.h5) takes
    # its segments
    newest = {}
    for node, path in parts:
        newest[node] = path
    for node, path in track(parts, f"recover {run_id}: partitions"):
        node_segs = by_node.get(node, []) if newest[node] == path else []
        if _repair(path, node, node_segs, force, report):
            done.add(node)
    for node, node_segs in by_node.items():
        if node not in done:
            path = _unused(os.path.join(run_dir, f"{node}.h5"))
            _rebuild(None, path, run_id, node, node_segs, report)
    for seg in segs:
        if seg.get("action") == "salvaged":
            try:
                os.unlink(seg["path"])
            except OSError:
                pass
    return report


# ---------------------------------------------------------------------- discovery
def _partitions(run_dir: str, report: dict) -> list:
    out = []
    for name in sorted(os.listdir(run_dir)):
        if not name.endswith(".h5"):
            continue
        path = os.path.join(run_dir, name)
        try:
            with open_partition(path) as f:
                node = str(f.attrs.get("node", name[:-3]))
                problem = check_partition(f)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside, never fatal
            corrupt = _unused(path + ".corrupt")
            os.replace(path, corrupt)
            report["errors"][path] = f"cannot open ({exc}); moved to {corrupt}"
            report["partitions"].append({"path": path, "action": "corrupt", "moved_to": corrupt})
            continue
        if problem:  # opens, but its contents are unsound: named, left as it is, not ok
            report["errors"][path] = f"damaged partition: {problem}; left in place"
            report["partitions"].append({"path": path, "action": "damaged",
                                         "reason": problem})
            continue
        out.append((node, path))
    return out


def _leftover_segments(run_dir: str, run_id: str, nodes: set, force: bool, report: dict) -> list:
    out_dir = os.path.dirname(run_dir)
    found = []
    d = shm_dir()
    for name in sorted(os.listdir(d)):
        parsed = parse_segment_name(name, run_id)
        if parsed is None:
            continue
        node, rank, pid = parsed
        if node not in nodes and _other_run(out_dir, run_id, node):
            continue  # a run whose id starts with ours (run "a" vs run "a-b")
        entry = {"path": os.path.join(d, name), "node": node, "rank": rank, "pid": pid}
        report["segments"].append(entry)
        try:  # the segment's time: its creator ran then (a later owner of the pid did not)
            seen = os.stat(os.path.join(d, name)).st_mtime_ns
        except OSError:
            seen = 0
        if pid_alive(pid, seen) and not force:
            entry["action"] = "skipped: process alive"
            continue
        found.append(entry)
    return found


def _other_run(out_dir: str, run_id: str, node: str) -> bool:
    parts = node.split("-")
    return any(os.path.isdir(os.path.join(out_dir, run_id + "-" + "-".join(parts[:i])))
               for i in range(1, len(parts)))


# ---------------------------------------------------------------------- repair
def _repair(path: str, node: str, segs: list, force: bool, report: dict) -> bool:
    with open_partition(path) as f:
        complete = bool(f.attrs.get("complete", False))
        wpid = int(f.attrs.get("writer_pid", 0))
        whost = str(f.attrs.get("writer_host", ""))
    if complete and not segs:
        report["partitions"].append({"path": path, "action": "ok"})
        return True
    if not complete and wpid and whost == socket.gethostname() and pid_alive(wpid) and not force:
        report["partitions"].append({"path": path, "action": "in_use",
                                     "why": f"its aggregator (pid {wpid}) still runs"})
        for seg in segs:
            seg["action"] = "skipped: partition in use"
        return True
    _rebuild(path, path, os.path.basename(os.path.dirname(path)), node, segs, report)
    return True


def _rebuild(src: str | None, path: str, run_id: str, node: str, segs: list,
             report: dict) -> None:
    tmp = path + ".recover-tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    entry = {"path": path, "action": "rebuilt" if src else "created", "salvaged": 0,
             "duplicates_skipped": 0}
    if src is not None:
        with open_partition(src) as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
                     if k not in ("complete", "schema_version", "format", "closed_at")}
            w = PartitionWriter(tmp, attrs)
            state = _load(w, f)
        entry["records_before"] = w.nrecords
        entry["invalid_rows_removed"] = state.invalid_rows
        entry["was_complete"] = bool(attrs.get("complete_reason"))
    else:
        w = PartitionWriter(tmp, {"run_id": run_id, "node": node, "created": time.time_ns(),
                                  "writer": "provhpc recover"})
        state = _State()
    for seg in segs:
        _salvage_segment(w, state, seg, entry)
    for key in w.rank_keys():
        row = w.rank_row(key)
        if row is not None and row["status"] == b"running":
            w.upsert_rank(key, {"status": "lost", "exit_code": -1})
    _recount(w)
    reason = "recovered by provhpc recover"
    w.close({"complete_reason": reason, "recovered_at": time.time_ns(),
             "recovered": json.dumps({k: entry.get(k, 0) for k in ("salvaged", "duplicates_skipped",
                                                                      "invalid_rows_removed")})})
    if src is not None and os.path.exists(src):
        os.replace(src, _unused(src + ".orig"))
    os.replace(tmp, path)
    entry["records_after"] = w.nrecords
    report["partitions"].append(entry)


def _recount(w: PartitionWriter) -> None:
    """Set ``records`` of the rank rows recover closed (``lost``, ``salvaged``) to what the
    file holds of that rank: their stream never said goodbye, so no writer counted them.
    A rank with several rows (several pids) keeps its counts: the file cannot split them."""
    rows = w.ranks[:]
    mine = np.isin(rows["status"], [b"lost", b"salvaged"]) & (rows["role"] == b"rank")
    if not mine.any():
        return
    ranks, per_rank = np.unique(rows["rank"], return_counts=True)
    single = set(ranks[per_rank == 1].tolist())
    on_disk = [w.records.fields("rank")[lo:lo + _COPY_ROWS]
               for lo in range(0, w.nrecords, _COPY_ROWS)]
    held, counts = np.unique(np.concatenate(on_disk or [np.zeros(0, np.int32)]),
                             return_counts=True)
    count = dict(zip(held.tolist(), counts.tolist()))
    for i in np.flatnonzero(mine).tolist():
        rank = int(rows["rank"][i])
        if rank in single:
            w.upsert_rank((rank, int(rows["pid"][i])), {"records": count.get(rank, 0)})


class _State:
    """What the file already holds: batch keys, the rows no batch covers, string maps."""

    def __init__(self) -> None:
        self.batches: set[tuple[int, int, int]] = set()
        self.tail: set[bytes] = set()
        self.smaps: dict[tuple[int, int], StringMap] = {}
        self.invalid_rows = 0


def _load(w: PartitionWriter, f) -> _State:
    st = _State()
    w.adopt_strings(f["strings"][:], f["string_heap"][:])
    nstrings = w.nstrings
    n = f["records"].shape[0]
    ranks = f["ranks"][:]
    out, removed = 0, []
    for lo in range(0, n, _COPY_ROWS):
        chunk = f["records"][lo:lo + _COPY_ROWS]
        ok = valid_rows(chunk, ranks["rank"])
        removed.append(lo + np.flatnonzero(~ok))
        chunk = chunk[ok]
        bad = unknown_ids(chunk["name"], nstrings) | unknown_ids(chunk["sval"], nstrings)
        chunk["name"][bad] = 0  # a string the killed writer never flushed
        chunk["sval"][bad] = 0
        w.append(chunk)  # its counters are set from the file's below
        out += len(chunk)
    gone = np.concatenate(removed) if removed else np.zeros(0, np.int64)
    st.invalid_rows = len(gone)
    for row in ranks:
        w.add_rank_row(row)
    for row in f["drops"][:]:
        w.add_drop_row(row)
    for row in f["counters"][:]:
        name = row["name"].decode()
        if name in w.counters:
            w.counters[name] = int(row["value"])
    w.counters["records"] = out
    covered = 0
    if "batches" in f:
        for b in f["batches"][:]:
            start = int(b["start"])
            end = start + int(b["count"])
            if end <= n:  # in the new file's rows: less the invalid rows before and inside
                lo, hi = np.searchsorted(gone, [start, end])
                st.batches.add((int(b["rank"]), int(b["pid"]), int(b["seq"])))
                w.note_batch(int(b["rank"]), int(b["pid"]), int(b["seq"]), start - int(lo),
                             int(b["count"]) - int(hi - lo), int(b["flags"]))
                covered = max(covered, end)
    if "string_map" in f:
        for m in f["string_map"][:]:
            key = (int(m["rank"]), int(m["pid"]))
            local, gid = int(m["local"]), int(m["global"])
            if gid < nstrings and valid_definition(local, 0, 0, 0):
                if key not in st.smaps:
                    st.smaps[key] = StringMap()
                st.smaps[key].define(local, gid)
                w.map_string(key[0], key[1], local, gid)
    # rows after the last batch the file knows of (a flush cut short): compare by content
    tail = f["records"][covered:n] if covered < n else np.zeros(0, R.RECORD_DTYPE)
    st.tail = {_content_key(r) for r in tail[valid_rows(tail, ranks["rank"])]}
    return st


def valid_rows(recs: np.ndarray, ranks) -> np.ndarray:
    """Which rows are records at all: a known kind (a row of zeros, left where a write
    never reached the disk, has kind 0) of a rank in the rank table."""
    ok = np.isin(recs["kind"], list(R.KIND_NAMES))
    if len(ranks):
        ok &= np.isin(recs["rank"], np.asarray(ranks))
    return ok


def _content_key(rec) -> bytes:
    r = rec.copy()
    r["name"] = r["sval"] = r["flags"] = 0
    return r.tobytes()


def _salvage_segment(w: PartitionWriter, st: _State, seg: dict, entry: dict) -> None:
    try:
        s = Segment.attach(seg["path"])
    except (OSError, ValueError) as exc:
        if never_made(seg["path"]) and not pid_alive(seg["pid"]):
            os.unlink(seg["path"])  # no record in it: nothing to keep in /dev/shm
            seg["action"] = "removed: its process died making it, before any record"
        else:
            seg["action"] = f"skipped: {exc}"
        return
    try:
        if s.rank != seg["rank"] or s.pid != seg["pid"]:
            seg["action"] = "skipped: header does not match its name"
            return
        rank, pid = seg["rank"], seg["pid"]
        if (rank, pid) not in st.smaps:
            st.smaps[(rank, pid)] = StringMap()
        smap = st.smaps[(rank, pid)]
        got = dup = 0
        for slot in s.pending(0):
            seq = s.seq(slot)
            if s.state(slot) == FREE or (rank, pid, seq) in st.batches:
                dup += 1 if (rank, pid, seq) in st.batches else 0
                continue
            recs = s.committed(slot)
            heap = s.heap(slot, s.heap_used(slot))
            n, d = _ingest(w, st, smap, rank, pid, seq, recs, heap)
            got += n
            dup += d
        _account(w, rank, pid, seg["node"], got, s.drop_counts())
        seg.update(action="salvaged", records=got)
        entry["salvaged"] += got
        entry["duplicates_skipped"] += dup
    finally:
        s.close()


def _ingest(w: PartitionWriter, st: _State, smap: StringMap, rank: int, pid: int, seq: int,
            recs: np.ndarray, heap: bytes) -> tuple[int, int]:
    is_str = recs["kind"] == R.STRING
    for r in recs[is_str]:
        off, length, sid = int(r["ival"]), int(r["step"]), int(r["id"])
        if valid_definition(sid, off, length, len(heap)):
            gid = w.intern(heap[off:off + length], int(r["flags"]))
            smap.define(sid, gid)
            w.map_string(rank, pid, sid, gid)
    recs = recs[~is_str & (recs["kind"] != 0)]
    if st.tail and len(recs):
        keep = np.array([_content_key(r) not in st.tail for r in recs], bool)
        dup = int((~keep).sum())
        recs = recs[keep]
    else:
        dup = 0
    recs["name"] = smap.remap(recs["name"])[0]  # a string never defined becomes ""
    recs["sval"] = smap.remap(recs["sval"])[0]
    recs["rank"] = rank
    recs["flags"] |= R.F_SALVAGED
    start = w.nrecords
    w.append(recs)
    w.note_batch(rank, pid, seq, start, len(recs), R.F_SALVAGED)
    st.batches.add((rank, pid, seq))
    w.counters["salvaged_records"] += len(recs)
    return len(recs), dup


def _account(w: PartitionWriter, rank: int, pid: int, node: str, got: int,
             drops: dict[str, int]) -> None:
    key = (rank, pid)
    old = w.rank_row(key)
    row: dict[str, object] = {"records": (int(old["records"]) if old is not None else 0) + got,
           "salvaged": (int(old["salvaged"]) if old is not None else 0) + got}
    if old is None:
        row.update(rank=rank, pid=pid, role="rank", node=node, local_rank=-1, reported=-1)
    if old is None or old["status"] == b"running":
        row.update(status="salvaged", exit_code=-1)
    if drops:
        before = sum(w.drop_counts(rank, pid).values())
        w.set_drops(rank, pid, drops)
        total = sum(drops.values())
        w.counters["dropped_records"] += max(0, total - before)
        row["dropped"] = total
    w.upsert_rank(key, row)


# ---------------------------------------------------------------------- helpers
def _unused(path: str) -> str:
    if not os.path.exists(path):
        return path
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    return f"{path}.{n}"


def format_report(rep: dict) -> str:
    lines = [f"recover {rep['run_dir']}"]
    for p in rep["partitions"]:
        extra = ""
        if "records_after" in p:
            extra = (f"  records {p.get('records_before', 0)} -> {p['records_after']}"
                     f" (salvaged {p['salvaged']}, duplicates skipped {p['duplicates_skipped']}"
                     + (f", invalid rows removed {p['invalid_rows_removed']}"
                        if p.get("invalid_rows_removed") else "") + ")")
        lines.append(f"  {p['action']:<8} {p['path']}{extra}")
    for s in rep["segments"]:
        lines.append(f"  segment rank {s['rank']} pid {s['pid']}: {s.get('action', '?')}"
                     + (f" ({s['records']} records)" if "records" in s else ""))
    for path, err in rep["errors"].items():
        lines.append(f"  error: {path}: {err}")
    return "\n".join(lines)


__all__ = ["recover", "format_report"]
