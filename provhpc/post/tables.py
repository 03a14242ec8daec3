"""Decoding one partition's records into per-kind tables, column-wise.

Each table is a numpy structured array (a ``Table``: ``.to_pandas()``,
``.to_dicts()``).  Decoding is vectorised: a kind mask over the ``kind``
column, fancy indexing into the partition's string table, and a sort-based
join of ACTIVITY_START with ACTIVITY_END rows; no Python loop runs per record.

Objects are identified within a run by ``(rank, id)``: ids are rank-local
counters (forked workers of a rank count from ``pid << 32``), so the pair is
unique in the run without coordination.
"""

from __future__ import annotations

import numpy as np

from ..format import records as R

__all__ = [
    "ATTRIBUTE_DTYPE", "DTYPES", "ENTITY_DTYPE", "METRIC_DTYPE", "OPTIONAL_TEXT",
    "RELATION_DTYPE", "ROLE_NAMES", "STEP_COLUMNS", "TABLES", "TASK_DTYPE", "TIME_COLUMNS",
    "Table", "VTYPE_NAMES", "as_table", "concat", "decode", "empty", "field_names", "lookup",
    "pair_keys"
]

TABLES = ("tasks", "entities", "metrics", "attributes", "relations")

ROLE_NAMES = np.array(["attribute", "parameter", "generated"], object)

TASK_DTYPE = np.dtype([
    ("run", "O"), ("node", "O"), ("rank", "<i4"), ("id", "<u8"), ("parent", "<u8"),
    ("type", "O"), ("name", "O"), ("index", "<i8"), ("start", "<i8"), ("end", "<i8"),
    ("duration_s", "<f8"), ("status", "O"), ("error", "O")])
ENTITY_DTYPE = np.dtype([
    ("run", "O"), ("node", "O"), ("rank", "<i4"), ("id", "<u8"), ("activity", "<u8"),
    ("key", "O"), ("kind", "O"), ("t", "<i8"), ("hash", "O")])
METRIC_DTYPE = np.dtype([
    ("run", "O"), ("node", "O"), ("rank", "<i4"), ("activity", "<u8"), ("name", "O"),
    ("step", "<i8"), ("t", "<i8"), ("value", "<f8")])
ATTRIBUTE_DTYPE = np.dtype([
    ("run", "O"), ("node", "O"), ("rank", "<i4"), ("owner", "<u8"), ("role", "O"),
    ("key", "O"), ("vtype", "O"), ("value", "O"), ("t", "<i8"), ("flags", "<u2")])
RELATION_DTYPE = np.dtype([
    ("run", "O"), ("node", "O"), ("rank", "<i4"), ("subject", "<u8"), ("relation", "O"),
    ("object", "<u8"), ("t", "<i8")])

DTYPES = {"tasks": TASK_DTYPE, "entities": ENTITY_DTYPE, "metrics": METRIC_DTYPE,
          "attributes": ATTRIBUTE_DTYPE, "relations": RELATION_DTYPE}
VTYPE_NAMES = np.array([R.VTYPE_NAMES.get(i, "?") for i in range(8)], object)


def field_names(a: np.ndarray | np.dtype) -> tuple[str, ...]:
    """The column names of a structured array or dtype (``TypeError`` for a plain one)."""
    dtype = a if isinstance(a, np.dtype) else a.dtype
    if dtype.names is None:
        raise TypeError(f"not a structured array: dtype {dtype}")
    return dtype.names


class Table(np.ndarray):
    """A numpy structured array of one kind of object, with conversions."""

    def __array_finalize__(self, obj):
        pass

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("Table.to_pandas() needs pandas: pip install 'provhpc[pandas]'") \
                from exc
        arr = np.asarray(self)
        cols = {}
        for name in field_names(arr):
            col = arr[name]
            if name in TIME_COLUMNS and col.dtype.kind in "iu":
                # ns since the epoch, UTC; -1 (an activity that has not ended) is NaT
                col = pd.to_datetime(np.where(col >= 0, col, np.iinfo(np.int64).min)
                                     .astype("datetime64[ns]"), utc=True)
            elif name in STEP_COLUMNS and col.dtype.kind == "i":
                col = pd.array(np.where(col == R.NO_STEP, 0, col), dtype="Int64")
                col[np.asarray(arr[name] == R.NO_STEP)] = pd.NA  # no step, not INT64_MIN
            elif name in OPTIONAL_TEXT and col.dtype == object:
                col = pd.array([v if v != "" else pd.NA for v in col.tolist()], dtype="string")
            cols[name] = col
        return pd.DataFrame(cols)

    def to_dicts(self) -> list[dict]:
        """Rows as plain dicts of Python values (for JSON)."""
        arr = np.asarray(self)
        cols = {name: arr[name].tolist() for name in field_names(arr)}
        return [dict(zip(cols, row)) for row in zip(*cols.values())] if len(arr) else []


TIME_COLUMNS = ("start", "end", "t")  # ns since the epoch: datetimes in pandas
STEP_COLUMNS = ("index", "step")  # R.NO_STEP: no value (pd.NA in pandas)
OPTIONAL_TEXT = ("hash", "error")  # "": no value


def as_table(arr: np.ndarray) -> Table:
    return arr.view(Table)


def empty(name: str) -> Table:
    return as_table(np.zeros(0, DTYPES[name]))


def concat(name: str, parts) -> Table:
    parts = [np.asarray(p) for p in parts if len(p)]
    if not parts:
        return empty(name)
    return as_table(np.concatenate(parts))


# ---------------------------------------------------------------------- keys
def pair_keys(*pairs):
    """Exact, comparable keys for ``(rank, id)`` pairs: uint64 when they fit, else 16 bytes.

    All arrays passed in one call share one encoding, so their keys can be
    joined with ``np.searchsorted`` / ``np.isin``.
    """
    ranks = [np.asarray(r).astype(np.uint32).astype(np.uint64) for r, _ in pairs]
    ids = [np.asarray(i, dtype=np.uint64) for _, i in pairs]
    max_id = max((int(i.max()) for i in ids if len(i)), default=0)
    max_rank = max((int(r.max()) for r in ranks if len(r)), default=0)
    shift = max(max_id.bit_length(), 1)
    if shift + max_rank.bit_length() <= 64:
        s = np.uint64(shift)
        return [(r << s) | i for r, i in zip(ranks, ids)]
    out = []
    for r, i in zip(ranks, ids):
        k = np.empty(len(i), [("r", ">u8"), ("i", ">u8")])
        k["r"], k["i"] = r, i
        out.append(k.view("S16").ravel())
    return out


def lookup(sorted_keys: np.ndarray, order: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row index (in the unsorted array) of each of ``keys``, or -1 where absent."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    pos = np.searchsorted(sorted_keys, keys)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys
    return np.where(found, order[pos], -1)


# ---------------------------------------------------------------------- decoding
def decode(recs: np.ndarray, strings: np.ndarray, run: str, nodes: np.ndarray,
           which=("tasks", "entities", "metrics", "attributes", "relations")) -> dict:
    """Per-kind tables of one partition's records.

    ``nodes`` maps each record to its node name (object array, same length).
    """
    kind = recs["kind"]
    rows = {k: np.flatnonzero(kind == k) for k in R.KIND_NAMES}
    out = {}
    if "tasks" in which:
        out["tasks"] = _tasks(recs, rows, strings, run, nodes)
    if "entities" in which or "tasks" in which:
        ent = _entities(recs[rows[R.ENTITY]], strings, run, nodes[rows[R.ENTITY]])
    if "attributes" in which or "entities" in which:
        attrs = _attributes(recs[rows[R.ATTRIBUTE]], strings, run, nodes[rows[R.ATTRIBUTE]])
    if "entities" in which:
        _fill_hash(ent, attrs)
        out["entities"] = ent
    if "attributes" in which:
        out["attributes"] = attrs
    if "metrics" in which:
        out["metrics"] = _metrics(recs[rows[R.METRIC]], strings, run, nodes[rows[R.METRIC]])
    if "relations" in which:
        out["relations"] = _relations(recs[rows[R.RELATION]], strings, run,
                                      nodes[rows[R.RELATION]])
    return out


def _base(dtype_name, sub, run, nodes):
    t = np.zeros(len(sub), DTYPES[dtype_name])
    t["run"] = run
    t["node"] = nodes
    t["rank"] = sub["rank"]
    return t


def _tasks(recs, rows, strings, run, nodes):
    starts = recs[rows[R.ACTIVITY_START]]
    ends = recs[rows[R.ACTIVITY_END]]
    t = _base("tasks", starts, run, nodes[rows[R.ACTIVITY_START]])
    t["id"], t["parent"] = starts["id"], starts["ref"]
    t["type"], t["name"] = strings[starts["sval"]], strings[starts["name"]]
    t["index"], t["start"] = starts["step"], starts["t"]
    ks, ke = pair_keys((starts["rank"], starts["id"]), (ends["rank"], ends["id"]))
    order = np.argsort(ke, kind="stable")
    j = lookup(ke[order], order, ks)
    has_end = j >= 0
    jj = j[has_end]
    t["end"] = -1
    t["end"][has_end] = ends["t"][jj]
    t["duration_s"] = np.nan
    t["duration_s"][has_end] = (ends["t"][jj] - starts["t"][has_end]) / 1e9
    status_names = np.array([R.STATUS_NAMES.get(i, "?") for i in range(4)], object)
    t["status"] = "open"
    t["status"][has_end] = status_names[np.clip(ends["ival"][jj], 0, 3)]
    t["error"] = ""
    t["error"][has_end] = strings[ends["sval"][jj]]
    return as_table(t)


def _entities(sub, strings, run, nodes):
    t = _base("entities", sub, run, nodes)
    t["id"], t["activity"] = sub["id"], sub["ref"]
    t["key"], t["kind"] = strings[sub["name"]], strings[sub["sval"]]
    t["t"] = sub["t"]
    t["hash"] = ""
    return as_table(t)


def _fill_hash(ent, attrs):
    """The content hash attribute (``hash``) of each entity, joined in."""
    h = np.asarray(attrs)[attrs["key"] == "hash"]
    if not len(h) or not len(ent):
        return
    ke, kh = pair_keys((ent["rank"], ent["id"]), (h["rank"], h["owner"]))
    order = np.argsort(kh, kind="stable")
    j = lookup(kh[order], order, ke)
    ok = j >= 0
    ent["hash"][ok] = h["value"][j[ok]]


def _attributes(sub, strings, run, nodes):
    t = _base("attributes", sub, run, nodes)
    t["owner"] = sub["id"]
    t["role"] = ROLE_NAMES[np.clip(sub["ref"], 0, 2).astype(np.intp)]
    t["key"] = strings[sub["name"]]
    vt = sub["vtype"]
    t["vtype"] = VTYPE_NAMES[vt]
    t["t"], t["flags"] = sub["t"], sub["flags"]
    value = np.empty(len(sub), object)
    for code, col in ((R.V_INT, "ival"), (R.V_FLOAT, "fval"), (R.V_BOOL, "ival")):
        m = vt == code
        if m.any():
            vals = sub[col][m]
            value[m] = (vals != 0 if code == R.V_BOOL else vals).tolist()
    m = vt == R.V_STR
    value[m] = strings[sub["sval"][m]]
    t["value"] = value
    return as_table(t)


def _metrics(sub, strings, run, nodes):
    t = _base("metrics", sub, run, nodes)
    t["activity"], t["name"] = sub["id"], strings[sub["name"]]
    t["step"], t["t"], t["value"] = sub["step"], sub["t"], sub["fval"]
    return as_table(t)


def _relations(sub, strings, run, nodes):
    t = _base("relations", sub, run, nodes)
    t["subject"], t["object"] = sub["id"], sub["ref"]
    t["relation"], t["t"] = strings[sub["name"]], sub["t"]
    return as_table(t)
