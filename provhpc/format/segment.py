"""A rank's shared-memory segment: a header, a slot table and the slots.

Layout (all little-endian, offsets in bytes)::

    0    header   magic "PRVHSEG1", version, rank, pid, slots, slot_records,
                  heap bytes, record size
    64   drops    16 x u64 drop counters, indexed as in drops.REASONS
    192  table    per slot 32 bytes (SLOT_ENTRY): state u32, count u32,
                  heap_used u32, pad u32, seq u64, opened_ns i64; the word
                  indexes are SLOT_U32/SLOT_U64 and the T_* constants below
    ...  slots    per slot: slot_records x 64-byte records, then the heap

A slot is all zeros when the rank opens it (the aggregator clears it before
acknowledging it), and every record has a non-zero kind; so a reader of a dead
rank's filling slot takes records up to the first zero kind: exactly the
records whose API call returned.  The file lives in /dev/shm,
is created owner-only (0600) and is named per user, run, node, rank and pid
(:func:`segment_name`; :func:`parse_segment_name` reads a name back).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import tempfile

import numpy as np

from .drops import NREASONS, REASONS
from .records import RECORD_DTYPE, RECORD_SIZE

__all__ = [
    "DROPS_OFFSET", "HEADER", "Layout", "MAGIC", "NREASONS", "SLOT_ENTRY",
    "Segment", "TABLE_OFFSET", "VERSION", "never_made", "segment_name", "shm_dir"
]

MAGIC = b"PRVHSEG1"
VERSION = 1
HEADER = struct.Struct("<8sIiIIIII")
DROPS_OFFSET = 64
TABLE_OFFSET = 192
SLOT_ENTRY = 32

# The slot table, seen as u32 words (SLOT_U32 per slot) and as u64 words (SLOT_U64
# per slot): entry ``slot`` holds its state at u32[slot * SLOT_U32 + T_STATE], ...
SLOT_U32, SLOT_U64 = SLOT_ENTRY // 4, SLOT_ENTRY // 8
T_STATE, T_COUNT, T_HEAP_USED = 0, 1, 2  # u32 words
T_SEQ, T_OPENED = 2, 3  # u64 words

FREE, FILLING, SEALED = 0, 1, 2
_KIND_OFFSET = int(dict(RECORD_DTYPE.fields or {})["kind"][1])  # byte of a record's kind


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def segment_prefix(run_id: str, node: str = "") -> str:
    """The start of the segment names of this user's run ``run_id`` (on ``node``)."""
    return f"provhpc-{os.getuid()}-{run_id}-" + (f"{node}-r" if node else "")


def segment_name(run_id: str, node: str, rank: int, pid: int) -> str:
    """The file name (in :func:`shm_dir`) of the segment of process ``pid`` of ``rank``."""
    return f"{segment_prefix(run_id, node)}{rank}-p{pid}"


def parse_segment_name(name: str, run_id: str) -> tuple[str, int, int] | None:
    """``(node, rank, pid)`` of a segment name of this user's run ``run_id``, else None.

    A node name may hold dashes, so a run whose id starts with ``run_id-`` parses
    too; the caller tells them apart (see ``recover``)."""
    m = re.match(rf"^{re.escape(segment_prefix(run_id))}(?P<node>.+)-r(?P<rank>\d+)"
                 r"-p(?P<pid>\d+)$", name)
    if m is None:
        return None
    return m.group("node"), int(m.group("rank")), int(m.group("pid"))


def never_made(path: str) -> bool:
    """Whether the segment file ``path`` was left unfinished by its creator: shorter than
    the magic, or the magic not written yet.  :meth:`Segment.create` writes the header
    before any record, so such a file holds none (its process died making it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError:
        return False
    return len(head) < len(MAGIC) or head == bytes(len(MAGIC))


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


class Layout:
    """Offsets of a segment with the given geometry."""

    def __init__(self, slots: int, slot_records: int, heap: int):
        self.slots, self.slot_records, self.heap = slots, slot_records, heap
        self.data = _align(TABLE_OFFSET + slots * SLOT_ENTRY)
        self.slot_bytes = _align(slot_records * RECORD_SIZE + heap)
        self.size = self.data + slots * self.slot_bytes

    def records_offset(self, slot: int) -> int:
        return self.data + slot * self.slot_bytes

    def heap_offset(self, slot: int) -> int:
        return self.records_offset(slot) + self.slot_records * RECORD_SIZE


class Segment:
    """A mapped segment; ``create`` on the rank, ``attach`` in the aggregator."""

    def __init__(self, path: str, mm: mmap.mmap, layout: Layout, owner: bool):
        self.path, self.mm, self.layout, self.owner = path, mm, layout, owner
        self.u32 = memoryview(mm)[TABLE_OFFSET:TABLE_OFFSET + layout.slots * SLOT_ENTRY].cast("I")
        self.u64 = memoryview(mm)[TABLE_OFFSET:TABLE_OFFSET + layout.slots * SLOT_ENTRY].cast("Q")
        self.drops = memoryview(mm)[DROPS_OFFSET:DROPS_OFFSET + NREASONS * 8].cast("Q")

    @classmethod
    def create(cls, path: str, rank: int, slots: int, slot_records: int, heap: int) -> Segment:
        layout = Layout(slots, slot_records, heap)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, layout.size)
            mm = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        HEADER.pack_into(mm, 0, MAGIC, VERSION, rank, os.getpid(), slots, slot_records, heap,
                         RECORD_SIZE)
        return cls(path, mm, layout, owner=True)

    @classmethod
    def attach(cls, path: str) -> Segment:
        """Map an existing segment after checking owner, mode and header."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(f"{path}: not owner-only or not ours")
            if st.st_size < TABLE_OFFSET:
                raise ValueError(f"{path}: too small for a segment")
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        magic, version, _rank, _pid, slots, slot_records, heap, rsize = HEADER.unpack_from(mm, 0)
        layout = Layout(slots, slot_records, heap)
        if magic != MAGIC or version != VERSION or rsize != RECORD_SIZE or layout.size > st.st_size:
            mm.close()
            raise ValueError(f"{path}: not a provhpc segment of this version")
        return cls(path, mm, layout, owner=False)

    @property
    def rank(self) -> int:
        return int(HEADER.unpack_from(self.mm, 0)[2])

    @property
    def pid(self) -> int:
        return int(HEADER.unpack_from(self.mm, 0)[3])

    # slot table accessors
    def state(self, slot: int) -> int:
        return int(self.u32[slot * SLOT_U32 + T_STATE])

    def count(self, slot: int) -> int:
        return int(self.u32[slot * SLOT_U32 + T_COUNT])

    def heap_used(self, slot: int) -> int:
        return int(self.u32[slot * SLOT_U32 + T_HEAP_USED])

    def seq(self, slot: int) -> int:
        return int(self.u64[slot * SLOT_U64 + T_SEQ])

    def view(self, slot: int, count: int) -> np.ndarray:
        """The first ``count`` records of ``slot``, read only, in place (no copy): valid
        while the segment is mapped and the slot not reused."""
        count = min(count, self.layout.slot_records)
        off = self.layout.records_offset(slot)
        recs = np.frombuffer(self.mm, RECORD_DTYPE, count=count, offset=off)
        recs.flags.writeable = False
        return recs

    def records(self, slot: int, count: int) -> np.ndarray:
        """A copy of the first ``count`` records of ``slot``."""
        return self.view(slot, count).copy()

    def committed(self, slot: int) -> np.ndarray:
        """The records of ``slot`` whose API call returned.

        A sealed slot has its count in the table; a filling one (its rank died
        or was stopped while writing) is read up to the first record of kind 0,
        since slots are zeroed before reuse.
        """
        if self.state(slot) == SEALED:
            return self.records(slot, self.count(slot))
        recs = self.records(slot, self.layout.slot_records)
        empty = np.flatnonzero(recs["kind"] == 0)
        return recs[: empty[0]] if len(empty) else recs

    def zero(self, slot: int, count: int | None = None) -> None:
        """Clear a slot's records before it is reused (the aggregator does it before acking).

        With ``count`` (the records the slot was sealed with) only those are cleared: the
        rest are still zero from the slot's last clearing, as the rank writes records in
        order from the first.  If the record after them is not empty (a rank that sealed
        fewer than it wrote) the whole slot is cleared, so the rule above always holds.
        """
        off = self.layout.records_offset(slot)
        total = self.layout.slot_records
        if count is None or not 0 <= count < total or self._kind(off, count) != 0:
            count = total
        np.frombuffer(self.mm, np.uint8, count * RECORD_SIZE, off)[:] = 0

    def _kind(self, off: int, i: int) -> int:
        return int(self.mm[off + i * RECORD_SIZE + _KIND_OFFSET])

    def heap(self, slot: int, used: int) -> bytes:
        off = self.layout.heap_offset(slot)
        return bytes(self.mm[off:off + min(used, self.layout.heap)])

    def drop_counts(self) -> dict[str, int]:
        """The non-zero drop counters of the segment, by reason name."""
        return {r: int(self.drops[i]) for i, r in REASONS.items() if self.drops[i]}

    def pending(self, after_seq: int) -> list[int]:
        """Slots holding records not yet taken (seq > after_seq), oldest first."""
        out: list[tuple[int, int]] = []
        for s in range(self.layout.slots):
            if self.state(s) != FREE and self.seq(s) > after_seq:
                out.append((self.seq(s), s))
        return [s for _, s in sorted(out)]

    def close(self, unlink: bool = False) -> None:
        for mv in (self.u32, self.u64, self.drops):
            mv.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a numpy view still holds it; the mapping goes with the process
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


__all__ = ["MAGIC", "VERSION", "HEADER", "DROPS_OFFSET", "TABLE_OFFSET", "SLOT_ENTRY",
           "SLOT_U32", "SLOT_U64", "T_STATE", "T_COUNT", "T_HEAP_USED", "T_SEQ", "T_OPENED",
           "FREE", "FILLING", "SEALED", "shm_dir", "segment_prefix", "segment_name",
           "parse_segment_name", "Layout", "Segment"]
