"""The run index: a run's decoded tables and lineage graph, stored once, read column-wise.

``provhpc index RUN`` (or ``provhpc.post.indexing.build(RUN)``) decodes every
partition of a finished run, builds its lineage graph and writes both to
``RUN/index.hdf5``.  Later ``provhpc.open(RUN)`` reads tables and the graph
from there instead of decoding the partitions again, so a query in a fresh
process costs what its columns cost to read, not what the run costs to decode.

Layout (plain h5py reads it; the attribute ``format`` is ``provhpc-index``):

* ``tables/<table>/`` — one dataset per column of ``tasks``, ``entities``,
  ``metrics``, ``attributes``, ``relations``; a text (object) column ``c`` is
  dictionary-encoded as ``c.codes`` (int32, one per row) and ``c.values``
  (the distinct values as UTF-8 JSON, so ints, floats, bools and strings keep
  their type);
* ``graph/nodes/``, ``graph/edges/`` — the graph's tables, encoded the same way;
  ``graph/entity_of_record``; ``graph/csr/{backward,forward}_{indptr,nbr,edge}``.
* attributes: ``version``, ``run_id``, ``time_range``, and ``sources``: the
  name, size and mtime of every partition and of ``manifest.json`` when the
  index was built.

The index is used only while ``sources`` still matches the run directory: a
partition that grows, is recovered, merged, replaced, removed or added makes
it stale, and the reader then decodes the partitions as if it were absent
(saying so once in the log).  It is only written for a run whose partitions
are all complete and readable.
"""

from __future__ import annotations

import json
import logging
import os

import h5py
import numpy as np

from . import tables as _tables

__all__ = [
    "FILENAME", "Index", "NotIndexable", "StoredTable", "VERSION", "load", "put_table", "sources"
]

FILENAME = "index.hdf5"
VERSION = 1
log = logging.getLogger("provhpc.index")


class NotIndexable(ValueError):
    """The run cannot be indexed (incomplete or unreadable partitions)."""


# ---------------------------------------------------------------------- encoding
# A text (object) column ``c`` is stored as ``c.codes`` (int32 per row), ``c.values``
# (the distinct values, each as JSON followed by a comma: ``v0,v1,...,``) and
# ``c.offsets`` (int64, where each value starts, plus the end).  JSON keeps
# ints, floats, bools and strings apart; the offsets let a reader decode only
# the values it needs, or all of them in one ``json.loads``.
def _factorize(col: np.ndarray):
    """(distinct values in first-seen order, int32 code per row) of an object column.

    Values are told apart by type as well as value, so ``1``, ``1.0`` and
    ``True`` stay three values."""
    seen: dict = {}
    codes = np.fromiter((seen.setdefault((v.__class__, v), len(seen)) for v in col.tolist()),
                        np.int32, count=len(col))
    return [v for _, v in seen], codes


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in the run index")


def _encode(value) -> bytes:
    return json.dumps(value, default=_json_default, ensure_ascii=False).encode()


def put_table(group: h5py.Group, arr: np.ndarray) -> None:
    group.attrs["rows"] = len(arr)
    for name in _tables.field_names(arr):
        col = arr[name]
        if col.dtype.kind != "O":
            group.create_dataset(name, data=col)
            continue
        uniq, codes = _factorize(col)
        parts = [_encode(v) + b"," for v in uniq]
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        group.create_dataset(name + ".codes", data=codes)
        group.create_dataset(name + ".values", data=np.frombuffer(b"".join(parts), np.uint8))
        group.create_dataset(name + ".offsets", data=offsets)


class StoredTable:
    """A table of the index, read column by column and decoded only as far as asked."""

    SMALL = 4096  # at most this many distinct values: decode them all at once

    def __init__(self, group: h5py.Group, dtype: np.dtype):
        self.g, self.dtype = group, dtype
        self.n = int(group.attrs["rows"])
        self._cols: dict = {}
        self._raw: dict = {}

    def __len__(self) -> int:
        return self.n

    def is_text(self, name: str) -> bool:
        return self.dtype[name].kind == "O"

    def codes(self, name: str) -> np.ndarray:
        key = name + ".codes"
        if key not in self._raw:
            self._raw[key] = self.g[key][:]
        return self._raw[key]

    def _heap(self, name: str):
        key = name + ".heap"
        if key not in self._raw:
            self._raw[key] = (self.g[name + ".values"][:].tobytes(), self.g[name + ".offsets"][:])
        return self._raw[key]

    def values(self, name: str, which=None) -> np.ndarray:
        """The distinct values of a text column (object array), all or those of codes ``which``."""
        heap, offs = self._heap(name)
        if which is None:
            out = np.empty(len(offs) - 1, object)
            out[:] = json.loads(b"[" + heap[:-1] + b"]") if len(heap) else []
            return out
        which = np.asarray(which, np.int64)
        out = np.empty(len(which), object)
        out[:] = [json.loads(heap[offs[i]:offs[i + 1] - 1]) for i in which.tolist()]
        return out

    def find(self, name: str, value) -> np.ndarray:
        """Codes of the distinct values of a text column equal to ``value`` (no decoding)."""
        heap, offs = self._heap(name)
        enc, hits, pos = _encode(value) + b",", [], heap.find(_encode(value) + b",")
        while pos >= 0:
            i = int(np.searchsorted(offs, pos))
            if i < len(offs) - 1 and offs[i] == pos and offs[i + 1] - pos == len(enc):
                hits.append(i)
            pos = heap.find(enc, pos + 1)
        return np.array(hits, np.int64)

    def column(self, name: str) -> np.ndarray:
        """A whole column, decoded (cached)."""
        if name not in self._cols:
            if self.is_text(name):
                self._cols[name] = self._small(name)[self.codes(name)] \
                    if self._n_values(name) <= self.SMALL else self.values(name)[self.codes(name)]
            else:
                self._cols[name] = self.g[name][:]
        return self._cols[name]

    def _n_values(self, name: str) -> int:
        return len(self._heap(name)[1]) - 1

    def _small(self, name: str) -> np.ndarray:
        key = name + ".small"
        if key not in self._raw:
            self._raw[key] = self.values(name)
        return self._raw[key]

    def column_at(self, name: str, idx) -> np.ndarray:
        """Column ``name`` at rows ``idx``, decoding only the values those rows use."""
        idx = np.asarray(idx, np.int64)
        if name in self._cols:
            return self._cols[name][idx]
        if not self.is_text(name):
            return self._read_at(name, idx)
        codes = self.codes(name)[idx] if name + ".codes" in self._raw or not self._few(idx) \
            else self._read_at(name + ".codes", idx)
        if self._n_values(name) <= self.SMALL:
            return self._small(name)[codes]
        used, inverse = np.unique(codes, return_inverse=True)
        return self.values(name, used)[inverse] if len(used) else np.zeros(0, object)

    def _few(self, idx) -> bool:
        """Few enough rows to read them one by one rather than the whole column."""
        return len(idx) <= min(65536, self.n // 32)

    def _read_at(self, dataset: str, idx) -> np.ndarray:
        if not self._few(idx):
            return (self.column(dataset) if dataset in _tables.field_names(self.dtype)
                    else self.g[dataset][:])[idx]
        if not len(idx):
            return self.g[dataset][:0]
        rows, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
        return self.g[dataset][rows][inverse]

    def equals(self, name: str, value) -> np.ndarray:
        """Mask of the rows whose column ``name`` is ``value`` (codes compared, nothing decoded)."""
        if name in self._cols or not self.is_text(name):
            return self.column(name) == value
        hits = self.find(name, value)
        codes = self.codes(name)
        return codes == hits[0] if len(hits) == 1 else np.isin(codes, hits)

    def rows(self, idx) -> np.ndarray:
        """The rows ``idx`` as a structured array, decoding only the values they use."""
        idx = np.asarray(idx, np.int64)
        out = np.zeros(len(idx), self.dtype)
        for name in _tables.field_names(self.dtype):
            out[name] = self.column_at(name, idx)
        return out

    def full(self) -> np.ndarray:
        out = np.zeros(self.n, self.dtype)
        for name in _tables.field_names(self.dtype):
            out[name] = self.column(name)
        return out


# ---------------------------------------------------------------------- freshness
def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sources(run) -> list:
    """What the index depends on: every partition of the run and its manifest."""
    out = [_stat(p) for p in run.all_partition_paths]
    manifest = os.path.join(run.path, "manifest.json")
    if os.path.exists(manifest):
        out.append(_stat(manifest))
    return out


# ---------------------------------------------------------------------- read
class Index:
    """An open, fresh run index (see ``load``)."""

    def __init__(self, f: h5py.File):
        self.f = f
        first, last = (int(x) for x in f.attrs["time_range"])
        self.time_range: tuple[int, int] = (first, last)
        self._stored: dict = {}

    def stored(self, name: str) -> StoredTable:
        """One of the run's tables, column by column (decoded columns are kept)."""
        if name not in self._stored:
            self._stored[name] = StoredTable(self.f[f"tables/{name}"], _tables.DTYPES[name])
        return self._stored[name]

    def table(self, name: str) -> _tables.Table:
        return _tables.as_table(self.stored(name).full())

    def graph_arrays(self) -> dict:
        from .lineage import EDGE_DTYPE, NODE_DTYPE

        g = self.f["graph"]
        return {"nodes": StoredTable(g["nodes"], NODE_DTYPE),
                "edges": StoredTable(g["edges"], EDGE_DTYPE),
                "entity_of_record": g["entity_of_record"][:],
                "n_activities": int(g.attrs["n_activities"]),
                "csr": _LazyCSR(g["csr"])}

    def close(self) -> None:
        self.f.close()


class _LazyCSR(dict):
    """The graph's adjacency per direction, read on first use (a closure needs one)."""

    def __init__(self, group: h5py.Group):
        super().__init__()
        self.g = group

    def __contains__(self, direction) -> bool:
        return direction in ("backward", "forward")

    def __missing__(self, direction):
        if direction not in self:
            raise KeyError(direction)
        value = self[direction] = tuple(self.g[f"{direction}_{part}"][:]
                                        for part in ("indptr", "nbr", "edge"))
        return value


def load(run) -> Index | None:
    """The run's index when it exists and still matches the run, else None (logged)."""
    path = os.path.join(run.path, FILENAME)
    if not os.path.exists(path):
        return None
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        log.warning("%s: cannot open the run index (%s); reading the partitions", path, exc)
        return None
    try:
        ok = (f.attrs.get("format") == "provhpc-index" and int(f.attrs.get("version", 0)) ==
              VERSION and json.loads(f.attrs.get("sources", "[]")) == sources(run))
    except (ValueError, TypeError, OSError):
        ok = False
    if not ok:
        f.close()
        log.warning("%s is stale (the partitions changed since it was built, or another "
                    "version wrote it); reading the partitions. `provhpc index %s` renews it.",
                    path, run.path)
        return None
    return Index(f)
