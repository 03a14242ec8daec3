"""The HDF5 partition: one file per node per run, written by its aggregator.

The layout is documented in docs/format.md.  The writer uses SWMR so that the
file is consistent at every flush: a partition left by a killed aggregator
opens (``swmr=True``, or after ``provhpc recover``) with everything flushed,
and records are acknowledged to ranks only after they were flushed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import h5py
import numpy as np

from .records import RECORD_DTYPE, SCHEMA_VERSION

__all__ = [
    "BATCH_DTYPE", "COUNTERS", "COUNTER_DTYPE", "DISK_RESERVE", "DROP_DTYPE", "LIBVER",
    "TIME_COUNTERS", "PartitionWriter", "RANK_DTYPE", "RECORD_CHUNK", "SMAP_DTYPE",
    "STRING_DTYPE", "SWMR_READ_ATTEMPTS", "check_partition", "open_partition"
]

LIBVER = ("v110", "v110")  # readable by HDF5 1.10 tools; SWMR needs >= v110

STRING_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("flags", "<u2")])
RANK_DTYPE = np.dtype([
    ("rank", "<i4"), ("local_rank", "<i4"), ("pid", "<i8"), ("role", "S8"),
    ("host", "S64"), ("node", "S64"), ("gpu", "S64"),
    ("start", "<i8"), ("end", "<i8"), ("status", "S16"), ("exit_code", "<i4"),
    ("records", "<u8"), ("reported", "<i8"), ("dropped", "<u8"), ("salvaged", "<u8"),
])
DROP_DTYPE = np.dtype([("rank", "<i4"), ("pid", "<i8"), ("reason", "S32"), ("count", "<u8")])
COUNTER_DTYPE = np.dtype([("name", "S32"), ("value", "<i8")])
# Which slot (stream pid, sequence number) became which rows, and how a stream's
# rank-local string ids map to this file's: what `provhpc recover` needs to add
# a dead writer's leftover segments exactly once.
BATCH_DTYPE = np.dtype([("rank", "<i4"), ("pid", "<i8"), ("seq", "<u8"), ("start", "<u8"),
                        ("count", "<u4"), ("flags", "<u2")])
SMAP_DTYPE = np.dtype([("rank", "<i4"), ("pid", "<i8"), ("local", "<u4"), ("global", "<u4")])
COUNTERS = ("records", "batches", "bytes", "strings", "malformed_frames", "sequence_gaps",
            "replayed_batches", "salvaged_records", "write_errors", "dropped_records",
            "refused_hellos", "heartbeat_ns")
#: counters that are a time, not a count: merged and combined by max, never summed
TIME_COUNTERS = ("heartbeat_ns",)

RECORD_CHUNK = 16384
DISK_RESERVE = 256 << 10  # bytes kept free for the rank table, counters and the close


def _compression(name: str) -> dict[str, Any]:
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    return {}


class PartitionWriter:
    """Appends record batches, strings and rank rows to one partition file."""

    def __init__(self, path: str, attrs: dict[str, Any], compression: str = "none",
                 mode: int = 0o600):
        self.path = path
        self.mode = mode
        self.tmp_path = path
        self.f = f = h5py.File(path, "w", libver=LIBVER)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["format"] = "provhpc-partition"
        f.attrs["complete"] = False
        for key, value in attrs.items():
            f.attrs[key] = (value if isinstance(value, (str, int, float, bool))
                            else json.dumps(value))
        comp = _compression(compression)
        self.records = f.create_dataset("records", (0,), maxshape=(None,), dtype=RECORD_DTYPE,
                                        chunks=(RECORD_CHUNK,), **comp)
        self.strings = f.create_dataset("strings", (1,), maxshape=(None,), dtype=STRING_DTYPE,
                                        chunks=(4096,))
        self.heap = f.create_dataset("string_heap", (0,), maxshape=(None,), dtype="u1",
                                     chunks=(65536,))
        self.ranks = f.create_dataset("ranks", (0,), maxshape=(None,), dtype=RANK_DTYPE,
                                      chunks=(64,))
        self.drops = f.create_dataset("drops", (0,), maxshape=(None,), dtype=DROP_DTYPE,
                                      chunks=(64,))
        counters = np.zeros(len(COUNTERS), COUNTER_DTYPE)
        counters["name"] = [c.encode() for c in COUNTERS]
        self.counters_ds = f.create_dataset("counters", data=counters)
        self.batches = f.create_dataset("batches", (0,), maxshape=(None,), dtype=BATCH_DTYPE,
                                        chunks=(1024,))
        self.string_map = f.create_dataset("string_map", (0,), maxshape=(None,),
                                           dtype=SMAP_DTYPE, chunks=(4096,))
        self._pending_batches: list[Any] = []
        self.failed: str | None = None
        self._pending_smap: list[Any] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.swmr = compression == "none"
        if self.swmr:
            f.swmr_mode = True
        self._n = 0
        self._heap_n = 0
        self._nstrings = 1  # id 0 is the empty string
        self._string_ids: dict[bytes, int] = {b"": 0}
        self._rank_rows: dict[tuple[Any, ...], int] = {}
        self._drop_rows: dict[tuple[Any, ...], int] = {}

    # -- strings
    def intern(self, data: bytes, flags: int = 0) -> int:
        sid = self._string_ids.get(data)
        if sid is not None:
            return sid
        sid = self._nstrings
        self._nstrings += 1
        self._string_ids[data] = sid
        if len(data):
            self.heap.resize((self._heap_n + len(data),))
            self.heap[self._heap_n:] = np.frombuffer(data, "u1")
        self.strings.resize((self._nstrings,))
        self.strings[sid] = (self._heap_n, len(data), flags)
        self._heap_n += len(data)
        self.counters["strings"] += 1
        return sid

    def adopt_strings(self, strings: np.ndarray, heap: np.ndarray) -> None:
        """Start from another partition's ``/strings`` and ``/string_heap`` (``provhpc
        recover``), ids unchanged; a row whose bytes lie outside the heap becomes the
        empty string.  Only on a writer that has interned nothing yet."""
        if self._nstrings != 1 or self._heap_n:
            raise RuntimeError(f"{self.path}: adopt_strings after strings were interned")
        strings = np.array(strings, STRING_DTYPE)
        if not len(strings):
            strings = np.zeros(1, STRING_DTYPE)
        heap = np.asarray(heap, "u1")
        ok = strings["offset"] + strings["length"] <= len(heap)
        strings[~ok] = (0, 0, 0)
        self.strings.resize((len(strings),))
        self.strings[:] = strings
        self.heap.resize((len(heap),))
        if len(heap):
            self.heap[:] = heap
        self._nstrings, self._heap_n = len(strings), len(heap)
        hb = heap.tobytes()
        self._string_ids = {}
        for i, (off, length, _fl) in enumerate(strings.tolist()):
            self._string_ids.setdefault(hb[off:off + length], i)
        self._string_ids[b""] = 0

    @property
    def nstrings(self) -> int:
        """Rows of ``/strings`` (the known string ids are 0 .. nstrings-1)."""
        return self._nstrings

    # -- records
    @property
    def nrecords(self) -> int:
        """Rows of ``/records`` appended so far (the start row of the next batch)."""
        return self._n

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit while keeping a reserve to close the file cleanly.

        Checked before each batch so that a full file system never fails a write
        half-way (HDF5 does not roll back): the partition stays consistent and
        the records that do not fit are counted as dropped.
        """
        if self.failed:
            return False
        try:
            st = os.statvfs(self.path)
        except OSError:
            return True
        need = nbytes + RECORD_CHUNK * RECORD_DTYPE.itemsize + DISK_RESERVE
        return st.f_bavail * st.f_frsize >= need

    def append(self, recs: np.ndarray) -> None:
        n = len(recs)
        if not n:
            return
        if self.failed:
            raise OSError(f"{self.path}: writing stopped after an error ({self.failed})")
        self.records.resize((self._n + n,))
        try:
            self.records[self._n:] = recs
        except Exception as exc:
            self.failed = str(exc) or type(exc).__name__
            try:
                self.records.resize((self._n,))  # never leave rows that were not written
            except Exception:  # noqa: BLE001 - the file is already damaged; keep what is
                pass
            raise OSError(f"{self.path}: {self.failed}") from exc
        self._n += n
        self.counters["records"] += n
        self.counters["batches"] += 1
        self.counters["bytes"] += recs.nbytes

    def mark(self) -> tuple[Any, ...]:
        """The extents of the appended tables, taken after a successful flush."""
        return (self._n, self._heap_n, self._nstrings, self.batches.shape[0],
                self.string_map.shape[0],
                {k: self.counters[k] for k in ("records", "batches", "bytes", "strings")})

    def rollback(self, mark: tuple[Any, ...]) -> None:
        """Forget the records, strings and batch notes appended after ``mark`` (a flush
        that failed): the extents shrink back, so no row that never reached the disk is
        left in the file.  Rank, drop and counter rows are kept (updated in place)."""
        n, heap_n, nstrings, nbatches, nsmap, counts = mark
        self._pending_batches.clear()
        self._pending_smap.clear()
        for ds, size in ((self.records, n), (self.heap, heap_n), (self.strings, nstrings),
                         (self.batches, nbatches), (self.string_map, nsmap)):
            if ds.shape[0] != size:
                ds.resize((size,))
        self._string_ids = {k: v for k, v in self._string_ids.items() if v < nstrings}
        self._n, self._heap_n, self._nstrings = n, heap_n, nstrings
        self.counters.update(counts)

    # -- rank table and drops (updated in place: SWMR allows no new objects)
    def upsert_rank(self, key: tuple[Any, ...], row: dict[str, Any]) -> None:
        idx = self._rank_rows.get(key)
        if idx is None:
            idx = self._rank_rows[key] = self.ranks.shape[0]
            self.ranks.resize((idx + 1,))
            current = np.zeros(1, RANK_DTYPE)[0]
        else:
            current = self.ranks[idx]
        for k, v in row.items():
            current[k] = v.encode()[: RANK_DTYPE[k].itemsize] if isinstance(v, str) else v
        self.ranks[idx] = current

    def rank_keys(self) -> list[tuple[int, int]]:
        """The (rank, pid) of every rank row, in row order."""
        return list(self._rank_rows)

    def rank_row(self, key: tuple[int, int]) -> np.void | None:
        """The rank row of (rank, pid), or None."""
        idx = self._rank_rows.get(key)
        return None if idx is None else self.ranks[idx]

    def add_rank_row(self, row: np.void) -> None:
        """Append a whole rank row as it is (copied from another partition)."""
        idx = self._rank_rows[(int(row["rank"]), int(row["pid"]))] = self.ranks.shape[0]
        self.ranks.resize((idx + 1,))
        self.ranks[idx] = row

    def add_drop_row(self, row: np.void) -> None:
        """Append a whole ``/drops`` row as it is (copied from another partition)."""
        key = (int(row["rank"]), int(row["pid"]), bytes(row["reason"]).decode())
        idx = self._drop_rows[key] = self.drops.shape[0]
        self.drops.resize((idx + 1,))
        self.drops[idx] = row

    def drop_counts(self, rank: int, pid: int) -> dict[str, int]:
        """The ``/drops`` counts of (rank, pid), by reason."""
        return {reason: int(self.drops[i]["count"])
                for (r, p, reason), i in self._drop_rows.items() if (r, p) == (rank, pid)}

    def set_drops(self, rank: int, pid: int, drops: dict[str, int]) -> None:
        for reason, count in drops.items():
            key = (rank, pid, reason)
            idx = self._drop_rows.get(key)
            if idx is None:
                idx = self._drop_rows[key] = self.drops.shape[0]
                self.drops.resize((idx + 1,))
            self.drops[idx] = (rank, pid, reason.encode()[:32], count)

    def note_batch(self, rank: int, pid: int, seq: int, start: int, count: int,
                   flags: int = 0) -> None:
        self._pending_batches.append((rank, pid, seq, start, count, flags))

    def map_string(self, rank: int, pid: int, local: int, global_id: int) -> None:
        self._pending_smap.append((rank, pid, local, global_id))

    def _write_pending(self) -> None:
        for ds, rows, dtype in ((self.string_map, self._pending_smap, SMAP_DTYPE),
                                (self.batches, self._pending_batches, BATCH_DTYPE)):
            if rows:
                n = ds.shape[0]
                ds.resize((n + len(rows),))
                ds[n:] = np.array(rows, dtype)
                rows.clear()

    def flush(self) -> None:
        self._write_pending()
        values = np.array([self.counters[c] for c in COUNTERS], "<i8")
        rows = self.counters_ds[:]
        if not np.array_equal(rows["value"], values):
            rows["value"] = values
            self.counters_ds[:] = rows
        self.f.flush()

    def close(self, attrs: dict[str, Any] | None = None, complete: bool = True) -> None:
        """Flush, close, then mark complete (attributes cannot change under SWMR)."""
        self.flush()
        self.f.close()
        with h5py.File(self.path, "r+", libver=LIBVER) as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = (value if isinstance(value, (str, int, float, bool))
                                else json.dumps(value))
            f.attrs["closed_at"] = time.time_ns()
            f.attrs["complete"] = complete
        os.chmod(self.path, self.mode)


# A SWMR reader retries a metadata block whose checksum fails, sleeping 1 ns, 2 ns, 4 ns ...
# between tries; HDF5's default of 100 tries never ends on a damaged file (2**100 ns).  30
# tries wait at most 2**30 ns (about 1 s) for a block a live writer is rewriting: a loaded
# node can deschedule the writer mid-write for tens of milliseconds, and a reader giving up
# after 17 ms (24 tries) could call a healthy live partition unreadable.
SWMR_READ_ATTEMPTS = 30


def _hdf5_library() -> Any:
    """The libhdf5 that h5py loaded (to reach H5Pset_metadata_read_attempts), or None."""
    import ctypes

    h5py.h5f  # noqa: B018 - the library is loaded once h5py is
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libhdf5" in line}
    except OSError:
        return None
    for lib_path in sorted(paths):
        name = os.path.basename(lib_path)
        if name.startswith("libhdf5") and not name.startswith("libhdf5_"):
            try:
                lib = ctypes.CDLL(lib_path)
                lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
                return lib
            except (OSError, AttributeError):
                continue
    return None


_HDF5: Any = False


def _swmr_open(path: str) -> h5py.File:
    global _HDF5
    if _HDF5 is False:
        _HDF5 = _hdf5_library()
    if _HDF5 is None:  # not found: HDF5's own retries (may wait long on a damaged file)
        return h5py.File(path, "r", swmr=True, locking=False)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, False)
    if _HDF5.H5Pset_metadata_read_attempts(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        return h5py.File(path, "r", swmr=True, locking=False)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                        fapl=fapl)
    return h5py.File(fid)


def open_partition(path: str) -> h5py.File:
    """Open a partition for reading, also one still written or left by a killed writer."""
    try:
        return _swmr_open(path)
    except OSError:
        return h5py.File(path, "r", locking=False)


def check_partition(f: h5py.File, read_rows: int = 1 << 20) -> str | None:
    """What is wrong with an open partition's contents, or None.

    Checks what every reader relies on: the format tag, the schema version, the
    datasets and their dtypes, that every record chunk decompresses, that the records'
    string ids lie in the string table and that the table lies in its heap.  ``recover``
    calls it on each partition (a file that opens is not yet a sound partition)."""
    if f.attrs.get("format") != "provhpc-partition":
        return "not a provhpc partition (no format attribute)"
    try:
        version = int(f.attrs.get("schema_version", SCHEMA_VERSION))
    except (TypeError, ValueError):
        return f"schema version {f.attrs.get('schema_version')!r} is not a number"
    if version != SCHEMA_VERSION:
        return f"schema version {version} is not one this provhpc reads ({SCHEMA_VERSION})"
    for name in ("records", "strings", "string_heap", "ranks"):
        if name not in f:
            return f"no {name!r} dataset"
    for name, want in (("records", RECORD_DTYPE), ("strings", STRING_DTYPE)):
        if f[name].dtype != want:
            return f"dataset /{name} has dtype {f[name].dtype}, not the schema's {want}"
    try:
        n_strings = f["strings"].shape[0]
        idx = f["strings"][:]
        heap = f["string_heap"].shape[0]
        if len(idx) and int((idx["offset"] + idx["length"]).max()) > heap:
            return f"the string table points beyond the string heap ({heap} bytes)"
        records = f["records"]
        for lo in range(0, records.shape[0], read_rows):
            ids = records.fields(["name", "sval"])[lo:lo + read_rows]
            if len(ids) and max(int(ids["name"].max()), int(ids["sval"].max())) >= n_strings:
                return f"records name string ids beyond the string table ({n_strings})"
        f["ranks"][:]  # noqa: B018 - reading is the check
        f["string_heap"][:]  # noqa: B018
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        return f"cannot read its data ({exc})"
    return None
