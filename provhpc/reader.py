"""Reading runs: a run directory holds one partition per node plus a manifest.

Everything is read lazily and column-wise; a partition that cannot be opened
raises ``PartitionError`` naming its file, while the others stay readable.
"""

from __future__ import annotations

import json
import os
from functools import cached_property

import numpy as np

from . import records as R
from .partition import open_partition


class PartitionError(OSError):
    """A partition file is missing, truncated or not a provhpc partition."""


class Partition:
    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open_partition(path)
            if self.f.attrs.get("format") != "provhpc-partition":
                raise PartitionError(f"{path}: not a provhpc partition")
        except PartitionError:
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError for bad files
            raise PartitionError(f"{path}: cannot open partition ({exc})") from exc

    def close(self) -> None:
        self.f.close()

    @property
    def node(self) -> str:
        return str(self.f.attrs.get("node", os.path.basename(self.path)[:-3]))

    @property
    def complete(self) -> bool:
        return bool(self.f.attrs.get("complete", False))

    @property
    def attrs(self) -> dict:
        out = {}
        for k, v in self.f.attrs.items():
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v.item() if hasattr(v, "item") else v
        return out

    def __len__(self) -> int:
        return self.f["records"].shape[0]

    def records(self, fields=None) -> np.ndarray:
        ds = self.f["records"]
        if fields is None:
            return ds[:]
        return ds.fields(list(fields))[:]

    def column(self, name: str) -> np.ndarray:
        return self.f["records"].fields(name)[:]

    @cached_property
    def strings(self) -> np.ndarray:
        """The string table as an object array indexed by string id."""
        idx = self.f["strings"][:]
        heap = self.f["string_heap"][:].tobytes()
        out = np.empty(len(idx), object)
        for i, (off, length, _flags) in enumerate(idx):
            out[i] = heap[off:off + length].decode("utf-8", "replace")
        return out

    @cached_property
    def truncated_strings(self) -> np.ndarray:
        return self.f["strings"].fields("flags")[:] & R.F_TRUNCATED != 0

    def ranks(self) -> np.ndarray:
        return self.f["ranks"][:]

    def drops(self) -> np.ndarray:
        return self.f["drops"][:]

    def counters(self) -> dict:
        return {r["name"].decode(): int(r["value"]) for r in self.f["counters"][:]}


class Run:
    """A run directory: its partitions (``<node>.h5``) and manifest."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{path}: no such run directory")
        self.partition_paths = sorted(
            os.path.join(self.path, f) for f in os.listdir(self.path) if f.endswith(".h5"))
        self.errors: dict[str, str] = {}
        self._partitions: list[Partition] | None = None

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id") or os.path.basename(self.path)

    @cached_property
    def manifest(self) -> dict:
        try:
            with open(os.path.join(self.path, "manifest.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    @property
    def partitions(self) -> list[Partition]:
        """The partitions that open; the others are listed in ``errors``."""
        if self._partitions is None:
            self._partitions = []
            for p in self.partition_paths:
                try:
                    self._partitions.append(Partition(p))
                except PartitionError as exc:
                    self.errors[p] = str(exc)
        return self._partitions

    def close(self) -> None:
        for p in self._partitions or []:
            p.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ranks(self) -> list[dict]:
        rows = []
        for p in self.partitions:
            for r in p.ranks():
                rows.append({"rank": int(r["rank"]), "local_rank": int(r["local_rank"]),
                             "pid": int(r["pid"]), "role": r["role"].decode(),
                             "host": r["host"].decode(), "node": r["node"].decode(),
                             "gpu": r["gpu"].decode(), "start": int(r["start"]),
                             "end": int(r["end"]), "status": r["status"].decode(),
                             "exit_code": int(r["exit_code"]), "records": int(r["records"]),
                             "reported": int(r["reported"]), "dropped": int(r["dropped"]),
                             "salvaged": int(r["salvaged"])})
        return sorted(rows, key=lambda r: (r["rank"], r["pid"]))

    def drops(self) -> list[dict]:
        out = []
        for p in self.partitions:
            for d in p.drops():
                out.append({"rank": int(d["rank"]), "pid": int(d["pid"]),
                            "reason": d["reason"].decode(), "count": int(d["count"])})
        return out


def open_path(path: str):
    """A ``Run`` for a run directory (or ``latest`` inside an output directory)."""
    if os.path.isdir(path) and not any(f.endswith(".h5") for f in os.listdir(path)) \
            and os.path.exists(os.path.join(path, "latest")):
        path = os.path.join(path, "latest")
    return Run(path)


def summary(run: Run) -> dict:
    """Ranks, nodes, records by kind per rank, drops, duration: the `provhpc summary` view."""
    kinds_total: dict[str, int] = {}
    per_rank_kinds: dict[int, dict] = {}
    t0, t1 = None, None
    for p in run.partitions:
        cols = p.records(["kind", "rank", "t"])
        if len(cols):
            lo, hi = int(cols["t"].min()), int(cols["t"].max())
            t0 = lo if t0 is None else min(t0, lo)
            t1 = hi if t1 is None else max(t1, hi)
        for rank in np.unique(cols["rank"]):
            sel = cols["kind"][cols["rank"] == rank]
            counts = np.bincount(sel, minlength=8)
            d = per_rank_kinds.setdefault(int(rank), {})
            for k, name in R.KIND_NAMES.items():
                if counts[k]:
                    d[name] = d.get(name, 0) + int(counts[k])
                    kinds_total[name] = kinds_total.get(name, 0) + int(counts[k])
    ranks = run.ranks()
    reasons: dict[str, int] = {}
    for d in run.drops():
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + d["count"]
    counters: dict[str, int] = {}
    for p in run.partitions:
        for k, v in p.counters().items():
            counters[k] = counters.get(k, 0) + v
    written_lost = counters.get("dropped_records", 0) - sum(reasons.values())
    if written_lost > 0:
        reasons["aggregator_write"] = reasons.get("aggregator_write", 0) + written_lost
    return {
        "run_id": run.run_id,
        "path": run.path,
        "nodes": sorted({p.node for p in run.partitions}),
        "partitions": [{"path": p.path, "node": p.node, "complete": p.complete,
                        "records": len(p)} for p in run.partitions],
        "partition_errors": run.errors,
        "ranks": [{**r, "records_by_kind": per_rank_kinds.get(r["rank"], {})
                   if r["role"] == "rank" else {}} for r in ranks],
        "world_size": len({r["rank"] for r in ranks}),
        "records_total": int(sum(len(p) for p in run.partitions)),
        "dropped_total": int(sum(reasons.values())),
        "dropped_by_reason": reasons,
        "records_by_kind": kinds_total,
        "counters": counters,
        "duration_s": (t1 - t0) / 1e9 if t0 is not None else 0.0,
        "status": run.manifest.get("status"),
    }
