"""The fixed-width record: one layout on the rank, in shared memory and in HDF5.

Every API call becomes one or more 64-byte records.  Strings travel as
rank-local interned ids; the first use of a string emits a STRING record whose
bytes sit in the slot's heap, and the aggregator remaps the ids to its
partition's string table.  See docs/format.md for the meaning of each column
per kind.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

__all__ = [
    "ACTIVITY_END", "ACTIVITY_START", "ATTRIBUTE", "ENTITY", "F_COERCED", "F_REJECTED",
    "F_SALVAGED", "F_TRUNCATED", "HAD_MEMBER", "KIND_NAMES", "METRIC", "NO_STEP", "RECORD",
    "RECORD_DTYPE", "RECORD_FORMAT", "RECORD_HDR", "RECORD_SIZE", "RELATION", "SCHEMA_VERSION",
    "STATUS_NAMES", "STRING", "USED", "VTYPE_NAMES", "WAS_DERIVED_FROM", "WAS_GENERATED_BY",
    "WAS_INFORMED_BY", "WAS_REVISION_OF", "coerce", "flatten", "header", "is_finite_number"
]

SCHEMA_VERSION = 1

# Record kinds (column ``kind``).
STRING = 1  # id = rank-local string id, ival = heap offset, step = length (never stored)
ACTIVITY_START = 2  # id = activity, ref = parent, name, sval = activity type, step = index
ACTIVITY_END = 3  # id = activity, ival = status code, sval = exception type
ENTITY = 4  # id = entity, ref = activity in scope, name = key, sval = entity type
RELATION = 5  # id = subject, ref = object, name = relation
ATTRIBUTE = 6  # id = owner, name = key, vtype + ival/fval/sval = value
METRIC = 7  # id = activity, name, step, fval = value

KIND_NAMES = {
    ACTIVITY_START: "activity_start",
    ACTIVITY_END: "activity_end",
    ENTITY: "entity",
    RELATION: "relation",
    ATTRIBUTE: "attribute",
    METRIC: "metric",
}

# Value types (column ``vtype``) of ATTRIBUTE records.
V_NONE, V_INT, V_FLOAT, V_BOOL, V_STR = 0, 1, 2, 3, 4
VTYPE_NAMES = {V_NONE: "none", V_INT: "int", V_FLOAT: "float", V_BOOL: "bool", V_STR: "str"}

# Flag bits (column ``flags``).
F_TRUNCATED = 1  # a string of this record was cut to the configured maximum
F_COERCED = 2  # the value was converted by a documented rule (see coerce)
F_SALVAGED = 4  # set by the aggregator: taken from the segment of a dead rank
F_REJECTED = 8  # the value could not be represented; only its type name was kept

# Activity status codes (column ``ival`` of ACTIVITY_END).
STATUS_OK, STATUS_ERROR, STATUS_KILLED = 0, 1, 2
STATUS_NAMES = {STATUS_OK: "ok", STATUS_ERROR: "error", STATUS_KILLED: "killed"}

# Relation names are ordinary interned strings; these are the PROV ones we emit.
USED = "used"
WAS_GENERATED_BY = "wasGeneratedBy"
WAS_DERIVED_FROM = "wasDerivedFrom"
WAS_INFORMED_BY = "wasInformedBy"
HAD_MEMBER = "hadMember"
WAS_REVISION_OF = "wasRevisionOf"  # drawn by the reader between versions of one path

RECORD_FORMAT = "<BBHiQQqIIqqd"
RECORD = struct.Struct(RECORD_FORMAT)
RECORD_SIZE = RECORD.size
RECORD_DTYPE = np.dtype(
    [
        ("kind", "u1"),
        ("vtype", "u1"),
        ("flags", "<u2"),
        ("rank", "<i4"),
        ("id", "<u8"),
        ("ref", "<u8"),
        ("t", "<i8"),
        ("name", "<u4"),
        ("sval", "<u4"),
        ("step", "<i8"),
        ("ival", "<i8"),
        ("fval", "<f8"),
    ]
)
assert RECORD_DTYPE.itemsize == RECORD_SIZE == 64
# The same 64 bytes with kind, vtype, flags and rank packed into one header word,
# so the hot path passes one precomputed constant instead of four fields.
RECORD_HDR = struct.Struct("<QQQqIIqqd")
assert RECORD_HDR.size == RECORD_SIZE


def header(kind: int, vtype: int = 0, flags: int = 0, rank: int = 0) -> int:
    return kind | vtype << 8 | flags << 16 | (rank & 0xFFFFFFFF) << 32

NO_STEP = -(2**63)  # ``step`` of records that have none
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def coerce(value: Any, max_string: int) -> tuple[int, int, float, str | None, int]:
    """Map an arbitrary Python value to ``(vtype, ival, fval, text, flags)``.

    The rules (docs/format.md, "Values"):
    bool -> bool; int within int64 -> int, larger -> decimal string (coerced);
    float (NaN and inf kept) -> float; str -> str, cut to ``max_string`` UTF-8
    bytes (truncated); numpy scalars and 0-d arrays -> their Python value;
    bytes -> str with undecodable bytes escaped (coerced); None -> none;
    objects with ``shape``/``dtype`` (arrays, tensors) -> a summary string
    such as ``ndarray(shape=(3, 4), dtype=float32)`` without reading the data
    (coerced); anything else -> ``repr()`` (coerced), or its type name when
    ``repr`` raises (rejected).
    """
    t = type(value)
    if t is float:
        return V_FLOAT, 0, value, None, 0
    if t is int:
        if _I64_MIN <= value <= _I64_MAX:
            return V_INT, value, 0.0, None, 0
        return V_STR, 0, 0.0, str(value), F_COERCED
    if t is str:
        return V_STR, 0, 0.0, value, 0
    if t is bool:
        return V_BOOL, int(value), 0.0, None, 0
    if value is None:
        return V_NONE, 0, 0.0, None, 0
    return _coerce_other(value, max_string)


def _coerce_other(value: Any, max_string: int) -> tuple[int, int, float, str | None, int]:
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        vtype, ival, fval, text, flags = coerce(value.item(), max_string)
        return vtype, ival, fval, text, flags
    if isinstance(value, bool):
        return V_BOOL, int(value), 0.0, None, 0
    if isinstance(value, int):
        return coerce(int(value), max_string)
    if isinstance(value, float):
        return V_FLOAT, 0, float(value), None, 0
    if isinstance(value, str):
        return V_STR, 0, 0.0, str(value), 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return V_STR, 0, 0.0, bytes(value).decode("utf-8", "backslashreplace"), F_COERCED
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        summary = f"{type(value).__name__}(shape={tuple(shape)}, dtype={value.dtype})"
        return V_STR, 0, 0.0, summary, F_COERCED
    try:
        return V_STR, 0, 0.0, repr(value), F_COERCED
    except Exception:  # a broken __repr__ must not reach the training loop
        return V_STR, 0, 0.0, f"<{type(value).__name__}>", F_REJECTED


def flatten(mapping: Any, prefix: str = "", depth: int = 8) -> dict[str, Any]:
    """Flatten nested mappings into dotted keys; deeper levels become strings."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 0:
            out.update(flatten(value, name + ".", depth - 1))
        else:
            out[name] = value
    return out


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
