"""String ids: their bounds, and the map from a stream's ids to a partition's.

Both sides intern strings.  A rank numbers the strings it defines 1, 2, 3, ...
(``STRING`` records, their bytes in the slot heap); a partition numbers its own
rows of ``/strings``.  Id 0 is the empty string in every stream and every
partition, never defined by a record.  The aggregator (live batches, a dead
rank's segment) and ``provhpc recover`` (leftover segments) translate with the
same :class:`StringMap`, so both accept exactly the same definitions.
"""

from __future__ import annotations

import numpy as np

EMPTY = 0  # the id of the empty string, everywhere
LOCAL_ID_LIMIT = 1 << 31  # a rank-local id defined by a STRING record is 1 <= id < this
_DENSE_LIMIT = 1 << 20  # ids below this are mapped by an array, the (rare) rest by a dict


def valid_definition(sid: int, offset: int, length: int, heap_size: int) -> bool:
    """Whether a STRING record (id ``sid``, bytes ``offset``..``offset+length`` of a
    heap of ``heap_size`` bytes) may be taken: id 0 is never defined (it is the
    empty string), ids stop below ``LOCAL_ID_LIMIT``, and the bytes lie in the heap."""
    return (EMPTY < sid < LOCAL_ID_LIMIT and offset >= 0 and length >= 0
            and offset + length <= heap_size)


def unknown_ids(ids: np.ndarray, count: int) -> np.ndarray:
    """Which of a partition's string ids name no row of a ``/strings`` of ``count`` rows
    (the known ids are 0 .. count-1)."""
    return np.asarray(ids) >= count


class StringMap:
    """One stream's rank-local string ids -> the partition's; unknown ids map to 0."""

    def __init__(self) -> None:
        self._dense = np.full(1024, -1, np.int64)
        self._dense[EMPTY] = EMPTY
        self._sparse: dict[int, int] = {}

    def define(self, local: int, global_id: int) -> None:
        """Map ``local`` (a valid definition, see :func:`valid_definition`) to ``global_id``."""
        if not EMPTY < local < LOCAL_ID_LIMIT:
            raise ValueError(f"string id {local} outside 1..{LOCAL_ID_LIMIT - 1}")
        if local < _DENSE_LIMIT:
            if local >= len(self._dense):
                grown = np.full(min(_DENSE_LIMIT, max(local + 1, 2 * len(self._dense))), -1,
                                np.int64)
                grown[:len(self._dense)] = self._dense
                self._dense = grown
            self._dense[local] = global_id
        else:
            self._sparse[local] = global_id

    def get(self, local: int) -> int:
        """The partition id of ``local``, or -1 when it was never defined."""
        if 0 <= local < len(self._dense):
            return int(self._dense[local])
        return self._sparse.get(local, -1)

    def remap(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """The partition ids of the rank-local ``ids``, and how many were never defined
        (those become 0, the empty string: the record is kept, its string is lost)."""
        ids = np.asarray(ids)
        dense = self._dense
        if len(ids) and 0 <= int(ids.min()) and int(ids.max()) < len(dense):  # the usual case
            out = dense.take(ids)
            unknown = out < 0
            n_unknown = int(unknown.sum())
            if n_unknown:
                out[unknown] = EMPTY
            return out.astype("<u4"), n_unknown
        ids = ids.astype(np.int64)
        out = np.full(len(ids), -1, np.int64)
        small = (ids >= 0) & (ids < len(self._dense))
        out[small] = self._dense[ids[small]]
        if not small.all():
            out[~small] = [self._sparse.get(int(i), -1) for i in ids[~small]]
        unknown = out < 0
        out[unknown] = EMPTY
        return out.astype("<u4"), int(unknown.sum())


__all__ = ["EMPTY", "LOCAL_ID_LIMIT", "valid_definition", "unknown_ids", "StringMap"]
