"""Filtering tables: by kind, name, rank, node, time window and attribute comparisons.

    rows = query.select(run, "tasks", kind="epoch", rank=[0, 1], where=["duration_s>0.1"])
    rows = query.select(run, "entities", where=["hash~blake2b:*", "size>=1000"])

A ``where`` term ``KEY OP VALUE`` (OP one of ``== = != > >= < <= ~``; ``~`` is
a glob) compares the table's column ``KEY`` when it has one, otherwise the
attribute ``KEY`` of each row's owner (the task, entity or, for metrics, the
activity).  Names match as globs.  Everything is a vectorised mask; globs and
comparisons run once per distinct value, not once per row.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import re

import numpy as np

from .tables import DTYPES, as_table, pair_keys

__all__ = ["attribute_keys", "attributes_of", "compare", "iso", "parse_term", "parse_value",
           "select", "to_ns"]

_OWNER = {"tasks": "id", "entities": "id", "metrics": "activity", "attributes": "owner",
          "relations": "subject"}
_NAME = {"tasks": "name", "entities": "key", "metrics": "name", "attributes": "key",
         "relations": "relation"}
_KIND = {"tasks": "type", "entities": "kind", "attributes": "role", "relations": "relation",
         "metrics": "name"}
_TIME = {"tasks": "start", "entities": "t", "metrics": "t", "attributes": "t", "relations": "t"}
_TERM = re.compile(r"^\s*([^\s=!<>~]+)\s*(==|!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_term(term: str):
    m = _TERM.match(term)
    if not m:
        raise ValueError(f"bad comparison {term!r}: expected KEY OP VALUE, OP one of "
                         "== != > >= < <= ~")
    key, op, value = m.groups()
    if value[:1] in ("=", "<", ">", "!", "~"):  # 'value>>0.8', 'lr=>0.1': a typo, not a value
        raise ValueError(f"bad comparison {term!r}: the value {value!r} starts with an "
                         "operator; expected KEY OP VALUE, OP one of == != > >= < <= ~")
    if not value:
        raise ValueError(f"bad comparison {term!r}: no value after {op!r}")
    return key, "==" if op == "=" else op, parse_value(value)


def compare(values: np.ndarray, op: str, value, vtype: np.ndarray | None = None) -> np.ndarray:
    """A mask of ``values OP value``; strings compare as strings, numbers as numbers.

    ``vtype`` (the attribute table's column) says which object values are
    numbers; without it an object column is taken to hold strings.
    """
    values = np.asarray(values)
    if op == "~":
        uniq, inv = np.unique(values.astype(str), return_inverse=True)
        hits = np.array([fnmatch.fnmatchcase(u, str(value)) for u in uniq], bool)
        return hits[inv] if len(uniq) else np.zeros(len(values), bool)
    out = np.full(len(values), op == "!=")
    if values.dtype.kind != "O":
        return out if isinstance(value, str) else _OPS[op](values, value)
    if vtype is None:
        strm = np.ones(len(values), bool)
        num = np.zeros(len(values), bool)
    else:
        strm = vtype == "str"
        num = np.isin(vtype, ("int", "float", "bool"))
    if isinstance(value, str):
        if strm.any():
            out[strm] = _OPS[op](values[strm].astype(str), value)
    elif num.any():
        out[num] = _OPS[op](values[num].astype(float), float(value))
    elif vtype is None and op in ("==", "!="):  # a number against a string column: its text
        out[:] = _OPS[op](values.astype(str), str(value))
    return out


_OPS = {"==": np.equal, "!=": np.not_equal, ">": np.greater, ">=": np.greater_equal,
        "<": np.less, "<=": np.less_equal}


def to_ns(when, origin_ns: int) -> int:
    """A time bound: seconds from the run's start (number) or an ISO-8601 date-time."""
    if isinstance(when, (int, float)):
        return origin_ns + int(when * 1e9)
    text = str(when)
    try:
        return origin_ns + int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        dt = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad time {text!r}: expected seconds from the run's start or an "
                         "ISO-8601 date-time (2026-12-06T10:00:00)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1e9)


def iso(ns: int) -> str:
    if ns is None or ns < 0:
        return ""
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def _glob_mask(col: np.ndarray, patterns) -> np.ndarray:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    col = np.asarray(col)
    if col.dtype.kind == "O":  # names, kinds, nodes: few distinct values; hash, don't sort
        distinct = set(col.tolist())
        if len(distinct) <= 64:
            mask = np.zeros(len(col), bool)
            for value in distinct:
                if any(fnmatch.fnmatchcase(str(value), p) for p in patterns):
                    mask |= col == value
            return mask
    uniq, inv = np.unique(col.astype(str), return_inverse=True)
    hits = np.array([any(fnmatch.fnmatchcase(u, p) for p in patterns) for u in uniq], bool)
    return hits[inv] if len(uniq) else np.zeros(len(col), bool)


def _runs(source):
    return getattr(source, "runs", None) or [source]


def select(source, table: str = "tasks", *, kind=None, name=None, rank=None, node=None,
           since=None, until=None, where=(), status=None):
    """Rows of ``table`` over a run or a collection, filtered; a ``Table``."""
    if table not in DTYPES:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(DTYPES)}")
    where = [parse_term(t) if isinstance(t, str) else t for t in where]
    _check_where_keys(source, table, where)
    parts = [_select_run(run, table, kind, name, rank, node, since, until, where, status)
             for run in _runs(source)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return as_table(np.zeros(0, DTYPES[table]))
    return as_table(parts[0] if len(parts) == 1 else np.concatenate(parts))


def attribute_keys(source) -> list[str]:
    """Every attribute key of a run or a collection, sorted."""
    keys: set = set()
    for run in _runs(source):
        keys.update(np.unique(np.asarray(_columns(run, "attributes").column("key"),
                                         object).astype(str)).tolist())
    return sorted(keys)


def _check_where_keys(source, table: str, where) -> None:
    """A ``where`` key that is neither a column nor any attribute key is a typo: an error
    that lists what exists, never an answer of no rows."""
    names = DTYPES[table].names or ()
    unknown = [k for k, _, _ in where if k not in names]
    if not unknown:
        return
    keys = attribute_keys(source)
    for key in unknown:
        if key not in keys:
            shown = ", ".join(keys[:30]) + (f" … ({len(keys)} in all)" if len(keys) > 30
                                            else "")
            raise ValueError(f"--where {key!r}: no column of {table} and no attribute of "
                             f"that name; columns: {', '.join(names)}; attribute keys: "
                             f"{shown or 'none'}")


def _columns(run, table: str):
    """One run's table as columns (``column``, ``column_at``, ``equals``, ``rows``).

    From the run's index column by column (only the columns a filter names are
    read, only the selected rows are assembled) unless the table is decoded
    already; otherwise from the decoded table."""
    index = getattr(run, "index", None)
    if index is not None and table not in getattr(run, "_cache", {}):
        return index.stored(table)
    return _Decoded(np.asarray(run.table(table)))


class _Decoded:
    """A decoded table with the accessors of ``provhpc.post.index.StoredTable``."""

    def __init__(self, t):
        self.t = t

    def __len__(self) -> int:
        return len(self.t)

    def column(self, name):
        return self.t[name]

    def column_at(self, name, idx):
        return self.t[name][idx]

    def equals(self, name, value):
        return self.t[name] == value

    def rows(self, idx):
        return self.t[idx]


def _select_run(run, table, kind, name, rank, node, since, until, where, status):
    tab = _columns(run, table)
    col = tab.column
    names = DTYPES[table].names
    mask = np.ones(len(tab), bool)
    if kind is not None:
        mask &= _glob_mask(col(_KIND[table]), kind)
    if name is not None:
        mask &= _glob_mask(col(_NAME[table]), name)
    if rank is not None:
        mask &= np.isin(col("rank"), np.atleast_1d(np.asarray(rank, np.int64)))
    if node is not None:
        mask &= _glob_mask(col("node"), node)
    if status is not None:
        mask &= _glob_mask(col("status"), status)
    if since is not None or until is not None:
        origin = run.time_range()[0]
        tcol = col(_TIME[table])
        if since is not None:
            lo = to_ns(since, origin)
            end = col("end") if table == "tasks" else tcol
            mask &= (end >= lo) | (end < 0)
        if until is not None:
            mask &= tcol <= to_ns(until, origin)
    for term in where:
        key, op, value = parse_term(term) if isinstance(term, str) else term
        if key in names:
            mask &= compare(col(key), op, value)
        else:
            mask &= _attribute_mask(run, col, table, key, op, value)
    return tab.rows(np.flatnonzero(mask))


def _attribute_mask(run, col, table, key, op, value):
    a = _columns(run, "attributes")
    sel = np.flatnonzero(a.equals("key", key))
    hit = sel[compare(a.column_at("value", sel), op, value, a.column_at("vtype", sel))]
    rows = col("rank")
    if not len(hit) or not len(rows):
        return np.zeros(len(rows), bool)
    kt, ka = pair_keys((rows, col(_OWNER[table])),
                       (a.column_at("rank", hit), a.column_at("owner", hit)))
    return np.isin(kt, ka)


def attributes_of(run, rank: int, owner: int, role=None) -> dict:
    """The attributes of one object as a dict (the last value of a key wins)."""
    a = np.asarray(run.attributes())
    sel = (a["rank"] == rank) & (a["owner"] == owner)
    if role is not None:
        sel &= a["role"] == role
    rows = a[sel]
    return dict(zip(rows["key"].tolist(), rows["value"].tolist()))
