"""The per-rank capture agent.

API calls encode records on the caller's thread straight into the current
slot of the rank's shared-memory segment (``emit``).  One I/O thread owns the
ZeroMQ socket: it announces sealed slots to the node aggregator, takes the
acknowledgements that free them, seals a slot older than half the flush
interval, and says goodbye at shutdown.  The lock guards the slot cursor only;
it is never held across I/O or while waiting for the aggregator.
"""

from __future__ import annotations

import array
import atexit
import itertools
import logging
import os
import signal
import socket as _socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Any

import zmq

from ..format import netkey
from ..format import protocol as P
from ..format.drops import BACKPRESSURE, BAD_VALUE, NO_AGGREGATOR
from ..format.records import (
    ACTIVITY_END,
    ACTIVITY_START,
    ATTRIBUTE,
    ENTITY,
    F_TRUNCATED,
    METRIC,
    NO_STEP,
    RECORD_HDR,
    RECORD_SIZE,
    RELATION,
    STATUS_ERROR,
    STRING,
    V_FLOAT,
    header,
)
from ..format.segment import (
    FILLING,
    FREE,
    SEALED,
    SLOT_U32,
    SLOT_U64,
    T_COUNT,
    T_HEAP_USED,
    T_OPENED,
    T_SEQ,
    T_STATE,
    Segment,
    segment_name,
    shm_dir,
)

_fast: Any  # the C hot path, when built (capture/_fast.c)
try:
    from . import _fast  # type: ignore[attr-defined,no-redef]
except ImportError:  # pragma: no cover - a build without the C extension
    _fast = None

log = logging.getLogger("provhpc.agent")
BAD_NAMES_WARNED = 1000  # metric names warned about at most (one line each)

HEARTBEAT_S = 1.0  # inline mode: seconds between heartbeats (the aggregator waits >= 10 s)


_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
_get_ident = threading.get_ident
_PACKERS: dict[int, Any] = {}  # n -> pack_into of n consecutive records
SIGTERM_GRACE = 2.0  # seconds the program has to unwind after SIGTERM before the agent drains
_SIGTERM_BYTE = bytes([signal.SIGTERM])


class Dropped(Exception):
    """Raised inside the agent when a record cannot be placed; counted, never escapes."""
_time_ns = time.time_ns


class Agent:
    """Capture for one process (a rank, or a forked worker of a rank).

    The hot-path contract: ``capture/_fast.c`` and the Python fast paths of
    ``capture/api.py`` reach the agent only through the public fields named in
    ``HOT_PATH`` (``tests/test_layout.py`` holds the C source, api.py and
    ``docs/architecture.md`` to this list):

    ``owner``           the owner thread's id (None without a GIL: no fast path)
    ``busy``            True while the owner writes without the lock
    ``fast_end``        the fast path may write records while ``off`` < fast_end;
                        0 while a locked section runs
    ``off``             the byte offset of the next record in the segment
    ``cursor``          ``off`` and ``fast_end`` themselves: an ``array('q')`` of the
                        two, which C reads and writes in place (no int objects)
    ``mm``              the segment's memory map
    ``pack``            ``RECORD_HDR.pack_into`` (one 64-byte record)
    ``strings``         the interned strings: text -> string id
    ``h_metric``, ``h_start``, ``h_end``, ``h_entity``, ``h_relation``, ``h_attr``
                        the record headers (kind, value type, rank); h_attr by value type
    ``next_id``         the next activity or entity id (a callable)
    ``open_activities`` the ids of the activities started and not ended

    A fast path writes only at ``off`` below ``fast_end``, sets ``busy`` around
    the write and advances ``off``; everything else goes through ``write``.
    """

    HOT_PATH = ("owner", "busy", "fast_end", "off", "cursor", "mm", "pack", "strings",
                "h_metric", "h_start", "h_end", "h_entity", "h_relation", "h_attr", "next_id",
                "open_activities")

    def __init__(self, cfg: Any, ident: Any, run_id: str, endpoint: str, segment_path: str,
                 id_base: int = 0, role: str = "rank", ready_path: str = "", job: str = ""):
        self.cfg, self.ident, self.run_id, self.role = cfg, ident, run_id, role
        self.job = job  # this job's digest (launch.session.job_digest), sent in the hello
        self.ready_path = ready_path  # "<ready>.failed" there = the aggregator will not come
        self.rank = ident.rank
        self.pid = os.getpid()
        self.endpoint = endpoint
        self.key_file = ""
        if endpoint.startswith("tcp://"):  # the network: only ever with the run's CURVE key
            self.key_file = getattr(cfg, "key_file", "")
            if not self.key_file:
                raise ValueError(f"provhpc: connecting to {endpoint} needs PROVHPC_KEY_FILE (the "
                                 "aggregator's CURVE secret); no unauthenticated tcp")
            netkey.load_secret(self.key_file)  # a missing or readable-by-others file: refuse now
        heap = max(cfg.slot_heap, 256)
        self.max_string = min(cfg.max_string, heap)
        self.seg = Segment.create(segment_path, ident.rank, cfg.slots, cfg.slot_records, heap)
        lay = self.seg.layout
        self.mm, self._layout = self.seg.mm, lay
        self._u32, self._u64 = self.seg.u32, self.seg.u64
        self.pack = RECORD_HDR.pack_into
        self.h_metric = header(METRIC, V_FLOAT, 0, ident.rank)
        self.h_start = header(ACTIVITY_START, 0, 0, ident.rank)
        self.h_end = header(ACTIVITY_END, 0, 0, ident.rank)
        self.h_entity = header(ENTITY, 0, 0, ident.rank)
        self.h_relation = header(RELATION, 0, 0, ident.rank)
        self.h_attr = [header(ATTRIBUTE, vt, 0, ident.rank) for vt in range(5)]
        self._lock = threading.Lock()
        # explicit acquire/release: ``with lock`` costs ~3x as much on CPython 3.11
        self._acquire, self._unlock = self._lock.acquire, self._lock.release
        self._slot_freed = threading.Condition(self._lock)
        self._free = deque(range(lay.slots))
        self.cursor = array.array("q", [0, 0])  # off, fast_end (see the properties)
        self._slot, self._base, self.off, self._end = -1, 0, 0, 0
        # The owner thread (the one that started the agent) writes without the lock
        # while ``off < fast_end``; every locked section first sets fast_end = 0 and
        # waits for ``busy`` (owner mid-write) to clear.  Safe under the GIL only.
        self.owner = threading.get_ident() if _GIL else None
        self.busy = False
        self.fast_end = 0
        self._heap = 0
        self._opened = 0.0
        self._seq = 0
        self._starved = False
        self.strings: dict[str, int] = {}
        self._next_sid = itertools.count(1).__next__
        self.next_id = itertools.count(id_base + 1).__next__
        self.records = 0  # in sealed slots, strings included
        self._bad_names: set[str] = set()  # metric names already warned about (bad_value)
        self._bad_lock = threading.Lock()
        self.strings_defined = 0
        self.open_activities: dict[int, None] = {}
        # per activity id, the path-like entities it generated: (entity, key), stat-ed
        # again when it ends (provhpc.capture.api.fingerprint_pending)
        self.pending_fingerprints: dict[int, list[tuple[Any, str]]] = {}
        self._outbox: deque[tuple[int, int, int, int]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closing = threading.Event()
        self._sigterm_at: float | None = None
        self.sigterm_exit = None  # set by `provhpc run`: may the agent end a stuck process?
        self._welcomed = threading.Event()
        self._done = threading.Event()
        self.mode = "pending"
        self.farewell = False
        self.status = "ok"
        self.exit_code = 0
        self._thread = threading.Thread(target=self._io_main, name="provhpc-io", daemon=True)
        self._thread.start()

    @property
    def wakeup_fd(self) -> int:
        """The write end of the I/O thread's wake-up pipe (for ``signal.set_wakeup_fd``)."""
        return self._wake_w

    # ------------------------------------------------------------------ hot path
    # _sid/_put run between _enter() and _leave() (the lock, fast path closed);
    # the owner thread's Python fast paths are write_flat and write (``busy`` set
    # around them); provhpc/capture/_fast.c writes from any thread, atomically under
    # the GIL, and declines while ``busy`` is set or fast_end is 0.  A record is
    # complete in shared memory when the call that wrote it returns.
    # There is no per-record count: a slot is zeroed before reuse, so a reader of
    # a dead rank's filling slot stops at the first record of kind 0.
    def _put(self, hdr: int, oid: int, ref: int, t: int, nid: int, sid: int, step: int,
             ival: int, fval: float) -> None:
        cursor = self.cursor
        off = cursor[0]
        if off >= self._end:
            if not self._rotate():
                raise Dropped
            off = cursor[0]
        self.pack(self.mm, off, hdr, oid, ref, t, nid, sid, step, ival, fval)
        cursor[0] = off + RECORD_SIZE

    def _sid(self, text: str) -> int:
        sid = self.strings.get(text)
        return sid if sid is not None else self._define(text)

    def emit(self, kind: int, vtype: int, flags: int, oid: int, ref: int, t: int,
             name: str | None, sval: str | None, step: int, ival: int, fval: float) -> bool:
        """Write one record; ``name`` and ``sval`` are strings (or None)."""
        return self.write([(header(kind, vtype, flags, self.rank), oid, ref, t, name, sval, step,
                            ival, fval)])

    def write(self, rows: list[Any]) -> bool:
        """Write rows ``(hdr, id, ref, t, name, sval, step, ival, fval)``; strings as str/None.

        The owner thread writes without the lock when every string is already
        interned and the rows fit in the current slot; otherwise, and in other
        threads, under the lock.  False when the rows were dropped (counted).
        """
        if _get_ident() == self.owner:
            strings = self.strings
            self.busy = True
            try:
                cursor = self.cursor
                off = cursor[0]
                if off + len(rows) * RECORD_SIZE <= cursor[1]:
                    pack, mm = self.pack, self.mm
                    for i, (hdr, oid, ref, t, name, sval, step, ival, fval) in enumerate(rows):
                        nid = 0 if name is None else strings.get(name)
                        sid = 0 if sval is None else strings.get(sval)
                        if nid is None or sid is None:  # a new string: the locked path interns it
                            rows = rows[i:]
                            break
                        pack(mm, off, hdr, oid, ref, t, nid, sid, step, ival, fval)
                        off += RECORD_SIZE
                        cursor[0] = off
                    else:
                        return True
            finally:
                self.busy = False
        self._enter()
        try:
            sid_of, put = self._sid, self._put
            for hdr, oid, ref, t, name, sval, step, ival, fval in rows:
                put(hdr, oid, ref, t, 0 if name is None else sid_of(name),
                    0 if sval is None else sid_of(sval), step, ival, fval)
        except Dropped:
            self.count_drop(len(rows))
            return False
        finally:
            self._leave()
        return True

    def write_flat(self, flat: list[Any], n: int) -> bool:
        """Owner-thread fast path for ``n`` rows already resolved to ids, as one flat list.

        One ``pack_into`` call for all rows (a cached n-record Struct).  False when
        this is not the owner thread or the rows do not fit: use ``write`` then.
        """
        if _get_ident() != self.owner:
            return False
        self.busy = True
        try:
            cursor = self.cursor
            off = cursor[0]
            end = off + n * RECORD_SIZE
            if end > cursor[1]:
                return False
            pack = _PACKERS.get(n)
            if pack is None:
                pack = _PACKERS[n] = struct.Struct("<" + RECORD_HDR.format[1:] * n).pack_into
            pack(self.mm, off, *flat)
            cursor[0] = end
            return True
        finally:
            self.busy = False

    @property
    def off(self) -> int:
        """The byte offset of the next record in the segment (``cursor[0]``)."""
        return self.cursor[0]

    @off.setter
    def off(self, value: int) -> None:
        self.cursor[0] = value

    @property
    def fast_end(self) -> int:
        """The fast path may write while ``off`` is below it; 0 while a locked section runs
        (``cursor[1]``)."""
        return self.cursor[1]

    @fast_end.setter
    def fast_end(self, value: int) -> None:
        self.cursor[1] = value

    def count_drop(self, n: int = 1) -> None:
        """Count records that found no slot: backpressure, or no aggregator at all."""
        self.seg.drops[BACKPRESSURE if self.mode in ("shm", "inline", "pending")
                       else NO_AGGREGATOR] += n

    def bad_value(self, name: str, why: str) -> None:
        """Drop one metric point whose value or step is not data provhpc can store: count it
        as ``bad_value`` and warn once per metric name (data never raises)."""
        with self._bad_lock:
            self.seg.drops[BAD_VALUE] += 1
            first = name not in self._bad_names and len(self._bad_names) < BAD_NAMES_WARNED
            if first:
                self._bad_names.add(name)
        if first:
            log.warning("provhpc: rank %d: metric %r: %s; the point is dropped and counted as "
                        "bad_value (said once per metric name)", self.rank, name, why)

    # -- the lock protocol around the owner's fast path
    def _enter(self) -> None:
        self._acquire()
        self.fast_end = 0
        if self.busy:
            self._await_owner()

    def _leave(self) -> None:
        self.fast_end = self._end
        self._unlock()

    def _reclaim(self) -> None:
        """After a condition wait (the lock was released): close the fast path again."""
        self.fast_end = 0
        if self.busy:
            self._await_owner()

    def _await_owner(self) -> None:
        if _get_ident() == self.owner:
            self.busy = False  # the owner itself: its fast path ended by an exception
            return
        deadline = time.monotonic() + 1.0
        while self.busy and time.monotonic() < deadline:
            time.sleep(0)  # releases the GIL so the owner finishes its one write

    def _define(self, text: str) -> int:
        """Intern ``text``: a STRING record plus its bytes in the slot heap (lock held)."""
        if text.__class__ is not str:
            raise ValueError(f"provhpc: names and keys must be strings, got {text!r}")
        if not text:
            return 0
        data = text.encode("utf-8", "backslashreplace")
        flags = 0
        if len(data) > self.max_string:
            data = data[: self.max_string].decode("utf-8", "ignore").encode()
            flags = F_TRUNCATED
        if self.off >= self._end or self._heap + len(data) > self._layout.heap:
            if not self._rotate(len(data)):
                raise Dropped
        sid = self._next_sid()
        start = self._layout.heap_offset(self._slot) + self._heap
        self.mm[start:start + len(data)] = data
        self.pack(self.mm, self.off, header(STRING, 0, flags, self.rank), sid, 0, 0, 0, 0,
                   len(data), self._heap, 0.0)
        self._heap += len(data)
        self.off += RECORD_SIZE
        self._u32[self._slot * SLOT_U32 + T_HEAP_USED] = self._heap
        self.strings[text] = sid
        self.strings_defined += 1
        return sid

    # ------------------------------------------------------------------ slots
    def _rotate(self, heap_need: int = 0) -> bool:
        """Make room for one record (and ``heap_need`` heap bytes) in the current slot.

        Lock held.  Seals a full slot and opens a free one, waiting up to the
        backpressure timeout; after one timeout the agent is 'starved' and drops
        at once until a slot frees, so a dead aggregator costs the training one
        timeout, not one per call.  While it waits another thread may have
        opened a slot: it is used, never replaced.
        """
        deadline = None
        while True:
            if self._slot >= 0:
                if self.off < self._end and self._heap + heap_need <= self._layout.heap:
                    return True
                self._seal_locked()
            if self._free:
                self._open_slot()
                continue
            if self._starved or self._closing.is_set() and self.mode != "shm":
                return False
            if deadline is None:  # while the aggregator starts, wait for it, not for a slot
                deadline = time.monotonic() + (self.cfg.startup_timeout if self.mode == "pending"
                                               else self.cfg.backpressure_timeout)
            left = deadline - time.monotonic()
            if left <= 0 or not self._slot_freed.wait(left):
                if not self._free and self._slot < 0:
                    self._starved = True
                    return False
            self._reclaim()

    def _open_slot(self) -> None:
        slot = self._free.popleft()
        self._seq += 1
        lay = self._layout
        base = slot * SLOT_U32
        self._u32[base + T_COUNT] = 0
        self._u32[base + T_HEAP_USED] = 0
        self._u64[slot * SLOT_U64 + T_SEQ] = self._seq
        self._u64[slot * SLOT_U64 + T_OPENED] = time.monotonic_ns()
        self._u32[base + T_STATE] = FILLING
        self._slot, self._heap = slot, 0
        self._base = self.off = lay.records_offset(slot)
        self._end = self._base + lay.slot_records * RECORD_SIZE
        self._opened = time.monotonic()

    def _seal_current(self) -> None:
        self._enter()
        try:
            if self._has_data():
                self._seal_locked()
        finally:
            self._leave()

    def _has_data(self) -> bool:
        return self._slot >= 0 and (self.off > self._base or self._heap > 0)

    def _seal_locked(self) -> None:
        slot = self._slot
        n = (self.off - self._base) // RECORD_SIZE
        self._u32[slot * SLOT_U32 + T_COUNT] = n
        self._u32[slot * SLOT_U32 + T_STATE] = SEALED
        self.records += n
        self._outbox.append((slot, self._seq, n, self._heap))
        self._slot, self._base, self.off, self._end = -1, 0, 0, 0
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the I/O thread is already awake

    def _release(self, slot: int) -> None:
        with self._lock:
            if self.seg.state(slot) == SEALED:
                if self.mode != "shm":  # in shm mode the aggregator zeroed it before the ack
                    self.seg.zero(slot)
                self._u32[slot * SLOT_U32 + T_STATE] = FREE
                self._free.append(slot)
                self._starved = False
                self._slot_freed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Hand the current slot over and wait until every sealed slot is acknowledged.
        While the aggregator has not welcomed this rank yet (it is starting), wait for the
        welcome first, within the same ``timeout``: False only when the records are not
        all on disk by then."""
        self._seal_current()
        deadline = time.monotonic() + (self.cfg.shutdown_timeout if timeout is None else timeout)
        self._welcomed.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and self.mode in ("shm", "inline") and \
                self._thread.is_alive():
            with self._lock:
                if len(self._free) == self._layout.slots:
                    return True
            time.sleep(0.002)
        return False

    # ------------------------------------------------------------------ I/O thread
    def _io_main(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{self.rank}:{self.pid}".encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 20)  # the aggregator may bind after we connect
        try:
            if self.key_file:
                netkey.setup_client(sock, self.key_file)
                sock.setsockopt(zmq.RECONNECT_IVL, 200)  # a refused handshake: back off
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sock.connect(self.endpoint)
            self._io_loop(sock)
        except Exception:  # the I/O thread must never take the training down
            log.exception("provhpc I/O thread failed; further records are counted as dropped")
            self.mode = "failed"
        finally:
            self._welcomed.set()
            sock.close(0)
            ctx.term()
            self._done.set()

    def _hello(self) -> dict[str, Any]:
        ident = self.ident
        return {"rank": ident.rank, "local_rank": ident.local_rank, "size": ident.size,
                "pid": self.pid, "host": _socket.gethostname(), "node": ident.node,
                "gpu": ident.gpu, "role": self.role, "segment": self.seg.path,
                "start": time.time_ns(), "run_id": self.run_id, "job": self.job,
                "launcher": ident.launcher, "job_id": ident.job_id}

    def _io_loop(self, sock: Any) -> None:
        sock.send_multipart([P.HELLO, P.dumps(self._hello())])
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        # Records already go into the slots while the aggregator starts (ZeroMQ queues the
        # hello until it binds); writers that run out of slots meanwhile wait, see _rotate.
        deadline = time.monotonic() + self.cfg.startup_timeout
        failed = self.ready_path + ".failed" if self.ready_path else ""
        while self.mode == "pending":
            if time.monotonic() > deadline or failed and os.path.exists(failed):
                log.warning("provhpc: no aggregator at %s; records will be counted as dropped",
                            self.endpoint)
                self.mode = "detached"
                break
            if dict(poller.poll(20)).get(sock):
                self._on_message(sock.recv_multipart())
        self._welcomed.set()
        with self._lock:  # wake writers waiting for the end of the start-up
            self._slot_freed.notify_all()
        # ms: a tenth of the interval, at most a second (the heartbeat of inline mode)
        tick = max(1, min(1000, int(self.cfg.flush_interval * 100)))
        age = self.cfg.flush_interval / 2
        beat = 0.0
        while True:
            events = dict(poller.poll(tick))
            if self.mode == "inline" and time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()  # a remote rank has no pid the aggregator can watch
                sock.send_multipart([P.HEARTBEAT, b""])
            if events.get(self._wake_r):
                try:
                    woke = os.read(self._wake_r, 4096)
                except BlockingIOError:
                    woke = b""
                if _SIGTERM_BYTE in woke and self._sigterm_at is None:
                    self._sigterm_at = time.monotonic()  # signal.set_wakeup_fd wrote it
            if self._sigterm_at is not None and not self._closing.is_set() and \
                    time.monotonic() - self._sigterm_at > SIGTERM_GRACE and \
                    self.sigterm_exit is not None and self.sigterm_exit():
                self._terminate(sock, poller)
            if events.get(sock):
                while True:
                    try:
                        self._on_message(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self._slot >= 0 and time.monotonic() - self._opened >= age:
                self._seal_current()
            self._send_outbox(sock)
            if self._closing.is_set() and not self._outbox:
                self._goodbye(sock, poller)
                return

    def _send_outbox(self, sock: Any) -> None:
        while self._outbox:
            slot, seq, n, heap = self._outbox.popleft()
            if self.mode == "shm":
                sock.send_multipart([P.BATCH, P.BATCH_FMT.pack(slot, seq, n, heap)])
            elif self.mode == "inline":
                lay = self._layout
                r0, h0 = lay.records_offset(slot), lay.heap_offset(slot)
                sock.send_multipart([P.BATCH, P.BATCH_FMT.pack(slot, seq, n, heap),
                                     bytes(self.mm[r0:r0 + n * RECORD_SIZE]),
                                     bytes(self.mm[h0:h0 + heap])])
            else:  # detached or failed: the slot stays sealed in the segment, which is
                pass  # kept at exit; `provhpc recover` adds it to the node's partition

    def _on_message(self, frames: list[Any]) -> None:
        kind = frames[0]
        if kind == P.ACK:
            slot, _seq = P.ACK_FMT.unpack(frames[1])
            if 0 <= slot < self._layout.slots:
                self._release(slot)
        elif kind == P.WELCOME:
            msg = P.loads(frames[1])
            self.mode = msg.get("mode", "detached") if "error" not in msg else "detached"
            if "error" in msg:
                log.warning("provhpc: aggregator refused this rank: %s", msg["error"])
        elif kind == P.FAREWELL:
            self.farewell = True
        elif kind == P.NACK:
            log.warning("provhpc: aggregator reported: %s",
                        bytes(frames[1][:1000]).decode(errors="replace"))

    def _terminate(self, sock: Any, poller: Any) -> None:
        """SIGTERM, and the program did not unwind (blocked in C, e.g. an MPI collective):
        drain from this thread, say goodbye as 'terminated' and end the process (143)."""
        log.warning("provhpc: rank %d did not stop %.0fs after SIGTERM (blocked outside "
                    "Python?); draining and exiting", self.rank, SIGTERM_GRACE)
        self.end_open_activities()
        self._seal_current()
        self._send_outbox(sock)
        self.status, self.exit_code = "terminated", 143
        self._closing.set()
        self._goodbye(sock, poller, timeout=min(2.0, self.cfg.shutdown_timeout))
        os._exit(143)

    def _goodbye(self, sock: Any, poller: Any, timeout: float | None = None) -> None:
        if self.mode not in ("shm", "inline"):
            return
        deadline = time.monotonic() + (self.cfg.shutdown_timeout if timeout is None else timeout)
        # Wait for the acks of every batch, then say goodbye and wait for the farewell.
        while time.monotonic() < deadline and len(self._free) < self._layout.slots:
            if dict(poller.poll(20)).get(sock):
                self._on_message(sock.recv_multipart())
        drops = self.seg.drop_counts()
        sock.send_multipart([P.GOODBYE, P.dumps({
            "status": self.status, "exit_code": self.exit_code,
            "records": self.records - self.strings_defined,
            "dropped": drops, "end": time.time_ns()})])
        while time.monotonic() < deadline and not self.farewell:
            if dict(poller.poll(20)).get(sock):
                self._on_message(sock.recv_multipart())
        if not self.farewell:
            log.warning("provhpc: rank %d: no farewell from the aggregator within %.1fs; "
                        "segment %s kept for `provhpc recover %s`", self.rank,
                        self.cfg.shutdown_timeout, self.seg.path,
                        os.path.join(os.path.abspath(self.cfg.out), self.run_id))

    # ------------------------------------------------------------------ lifecycle
    def end_open_activities(self, keep: int = 0) -> None:
        """End every activity the program left open (innermost first) as 'unfinished' errors."""
        for aid in list(self.open_activities)[::-1]:
            if aid != keep:
                self.emit(ACTIVITY_END, 0, 0, aid, 0, time.time_ns(), None, "unfinished",
                          NO_STEP, STATUS_ERROR, 0.0)
                del self.open_activities[aid]

    def wait_ready(self, timeout: float) -> bool:
        return self._welcomed.wait(timeout) and self.mode in ("shm", "inline")

    def shutdown(self, status: str = "ok", exit_code: int = 0) -> bool:
        """Seal, hand everything over, say goodbye; True when all is on disk."""
        if self._closing.is_set():
            return self.farewell
        self.status, self.exit_code = status, exit_code
        self._enter()
        try:
            if self._has_data():
                self._seal_locked()
            self._closing.set()
        finally:
            self._leave()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        self._thread.join(self.cfg.shutdown_timeout + 1.0)
        pid = os.getpid()
        if pid == self.pid:
            os.close(self._wake_r)
            os.close(self._wake_w)
        if _fast is not None:  # C holds the segment's buffer: let it go, so the map closes
            _fast.forget(self)
        # Keep the segment when the aggregator did not confirm: `provhpc recover` reads it.
        self.seg.close(unlink=self.farewell)
        return self.farewell

    @property
    def dropped(self) -> dict[str, int]:
        return self.seg.drop_counts()


__all__ = ["Agent", "ACTIVITY_START", "ACTIVITY_END"]


def start_worker_agent(cfg: Any, ident: Any, run_id: str, endpoint: str,
                       job: str = "", role: str = "worker") -> Agent:
    """The agent of a forked (role ``worker``) or attached (``child``) process of a rank:
    its own segment and ids, the same rank."""
    pid = os.getpid()
    seg_path = os.path.join(shm_dir(), segment_name(run_id, ident.node, ident.rank, pid))
    agent = Agent(cfg, ident, run_id, endpoint, seg_path, id_base=pid << 32, role=role,
                  job=job)
    atexit.register(agent.shutdown)
    return agent
