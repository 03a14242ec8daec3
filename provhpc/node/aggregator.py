"""The per-node aggregator: the only writer of its node's partition.

It maps each local rank's segment, takes sealed slots, remaps rank-local
string ids, appends to the partition, flushes and only then acknowledges the
slot.  It watches the ranks' pids and salvages a dead rank's segment.  The
same class runs as a thread in tests (``start_thread``) and as a process in
production (``provhpc aggregate``); sockets and files are created in
``serve`` on the thread that uses them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np
import zmq

from .._version import __version__
from ..format import netkey
from ..format import protocol as P
from ..format.drops import AGGREGATOR_WRITE, DROP_REASONS, REASONS
from ..format.modes import remove_rendezvous_dirs, run_modes
from ..format.partition import DISK_RESERVE, RECORD_CHUNK, PartitionWriter
from ..format.procs import pid_alive, writer_alive
from ..format.records import F_SALVAGED, RECORD_DTYPE, RECORD_SIZE, STRING
from ..format.segment import (
    Segment,
    never_made,
    parse_segment_name,
    segment_name,
    segment_prefix,
    shm_dir,
)
from ..format.strings import StringMap, valid_definition
from . import telemetry as _telemetry

__all__ = ["Aggregator", "MAX_FRAME", "Stream", "run_process"]

log = logging.getLogger("provhpc.aggregator")

MAX_FRAME = 64 << 20


class Stream:
    """One connected process (a rank, or a forked worker of one)."""

    def __init__(self, key: bytes, hello: dict, seg: Segment | None, mode: str):
        self.key, self.hello, self.seg, self.mode = key, hello, seg, mode
        self.rank = int(hello["rank"])
        self.pid = int(hello["pid"])
        self.role = str(hello.get("role", "rank"))[:8]
        self.expected_seq = 1
        self.smap = StringMap()
        self.records = 0
        self.salvaged = 0
        self.write_drops = 0  # records this aggregator could not write (aggregator_write)
        # the socket its hello came on (None for a salvaged orphan)
        self.sock: zmq.Socket | None = None
        self.closed = False
        self.last_seen = time.monotonic()


# Rows the writer gathers before one h5py write (4 MiB): a burst of batches becomes a few
# large writes, flushed once before its acks.
STAGE_ROWS = 4 * RECORD_CHUNK

BEAT_S = 2.0  # seconds between heartbeats written to the partition (see _beat)


class Aggregator:
    def __init__(self, cfg, run_id: str, node: str, out: str, endpoint: str, ready_path: str,
                 expect: int = 0, linger: float = 30.0, meta: dict | None = None,
                 job: str = "", leader: dict | None = None):
        self.cfg, self.run_id, self.node = cfg, run_id, node
        self.job = job  # the digest of the job that started it ("" = any rank of the run id)
        self.out, self.endpoint, self.ready_path = out, endpoint, ready_path
        self.expect, self.linger = expect, linger
        self.meta = meta or {}
        self.path = os.path.join(out, run_id, f"{node}.h5")
        self.streams: dict[bytes, Stream] = {}
        self._acks: list = []  # batches ingested, to acknowledge after the next flush
        self.closed_ranks = 0
        self._stop = threading.Event()
        self._drain_deadline = None
        self._writer: PartitionWriter | None = None  # open() creates it
        self.ready = threading.Event()
        self.exit_status = 0
        self._orphans: set[int] = set()
        self._unseen: set[int] = set()  # pids recorded as ended before a hello, no segment
        # The rank that started this aggregator ({"rank", "local_rank", "pid"}; None when
        # started by hand), watched until its hello: see _check_leader.  It was alive when
        # it started us, which dates it against a later owner of its pid.
        self._leader: tuple[int, int, int] | None = None
        if leader:
            try:
                self._leader = (int(leader["rank"]), int(leader.get("local_rank", 0)),
                                int(leader["pid"]))
            except (KeyError, TypeError, ValueError):
                log.warning("ignored a malformed leader description: %r", leader)
        self._leader_seen = time.time_ns()
        self.gpus = _telemetry.GPUs()  # NVML, opened on first use
        self.telemetry: _telemetry.Sampler | None = None
        self.listen = getattr(cfg, "listen", "")
        self._keys = None
        self.refused_connections = 0
        # The write path (see _fits, _lose, _flush): what was appended since the last
        # successful flush, and why writing stopped ("" while it goes on).
        self._unflushed = 0
        self._since_flush: list = []
        self._stage = np.zeros(STAGE_ROWS, RECORD_DTYPE)  # rows of the next write (_stage_for)
        self._staged = self._staged_batches = 0
        self._mark: tuple | None = None
        self.stopped_writing = ""
        self.write_lost = 0
        self._reserves: list[str] = []  # files of DISK_RESERVE bytes each (_take_reserve)
        if self.listen:  # never an unauthenticated network port: refuse to start instead
            if not cfg.key_file:
                raise ValueError(f"provhpc: PROVHPC_LISTEN={self.listen} needs PROVHPC_KEY_FILE "
                                 "(a CURVE secret, `provhpc keygen FILE`); the aggregator opens "
                                 "no unauthenticated network port")
            self._keys = netkey.keypair(cfg.key_file)

    # ------------------------------------------------------------------ lifecycle

    @property
    def writer(self) -> PartitionWriter:
        """The partition's writer; it exists from ``open()`` on."""
        if self._writer is None:
            raise RuntimeError("aggregator: the partition is not open yet")
        return self._writer
    def stop(self) -> None:
        """Drain: let connected ranks finish for a short grace, salvage the rest, close."""
        self._stop.set()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve, name="provhpc-aggregator", daemon=True)
        t.start()
        return t

    def serve(self) -> int:
        os.makedirs(os.path.dirname(self.path), mode=run_modes(self.cfg.group_readable)[1],
                    exist_ok=True)
        other = _live_aggregator(self.ready_path)
        if other:  # binding over it would steal its ranks and delete its rendezvous files
            log.error("another aggregator (pid %d) already serves run %s on node %s",
                      other, self.run_id, self.node)
            self.exit_status = 3
            return self.exit_status
        ctx = zmq.Context()
        remote = zap = None
        if self.listen:  # before the partition: a listener that cannot bind leaves no file
            try:
                remote, zap = self._bind_remote(ctx)
            except zmq.ZMQError as exc:
                log.error("cannot listen on %s (PROVHPC_LISTEN): %s", self.listen, exc)
                ctx.term()
                self.exit_status = 2
                return self.exit_status
        try:
            self._open_partition()
        except BaseException:
            self._close_remote(remote, zap)
            ctx.term()
            raise
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        try:
            old = os.umask(0o077)  # the ipc socket file is owner-only
            try:
                sock.bind(self.endpoint)
            finally:
                os.umask(old)
            self._write_ready()
            self.ready.set()
            self._loop(sock, remote, zap)
        finally:
            self._finish()
            sock.close(0)
            self._close_remote(remote, zap)
            ctx.term()
            self._cleanup_rendezvous()
        return self.exit_status

    @staticmethod
    def _close_remote(remote, zap) -> None:
        if remote is not None:
            remote.sock.close(0)
        if zap is not None:
            zap.close(0)

    def _open_partition(self) -> None:
        import h5py

        self.meta.setdefault("h5py", h5py.__version__)
        self.meta.setdefault("hdf5", h5py.version.hdf5_version)
        attrs = {"run_id": self.run_id, "node": self.node, "created": time.time_ns(),
                 "config": self.cfg.to_dict(), "meta": self.meta,
                 "writer": f"provhpc {__version__}", "expect": self.expect,
                 "writer_pid": os.getpid(), "writer_host": socket.gethostname()}
        self.path = _unused_path(self.path)  # a restarted aggregator never overwrites
        fmode, _dmode = run_modes(self.cfg.group_readable)
        self._writer = PartitionWriter(self.path, attrs, self.cfg.compression, mode=fmode)
        self._mark = self.writer.mark()
        self._take_reserve()
        if self.cfg.telemetry_interval > 0:
            self.telemetry = _telemetry.Sampler(self.writer, self.gpus)
        os.chmod(self.path, fmode)

    def _bind_remote(self, ctx):
        """The CURVE-only tcp ROUTER of PROVHPC_LISTEN and its ZAP handler (bound first:
        libzmq admits every client when no handler is bound)."""
        public, secret = self._keys
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(netkey.ZAP_ENDPOINT)
        tcp = ctx.socket(zmq.ROUTER)
        tcp.setsockopt(zmq.LINGER, 0)
        tcp.setsockopt(zmq.ROUTER_HANDOVER, 1)
        tcp.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        netkey.setup_server(tcp, public, secret)
        try:
            tcp.bind(self.listen)
        except zmq.ZMQError:
            tcp.close(0)
            zap.close(0)
            raise
        log.info("listening on %s (CURVE, one shared key)", self.listen)
        return _Remote(tcp), zap

    def _write_ready(self) -> None:
        tmp = f"{self.ready_path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump({"pid": os.getpid(), "endpoint": self.endpoint, "path": self.path,
                       "listen": self.listen, "job": self.job}, fh)
        os.replace(tmp, self.ready_path)

    def _cleanup_rendezvous(self) -> None:
        for p in (self.ready_path, self.endpoint.replace("ipc://", "", 1)):
            if p and not p.startswith(("tcp:", "@")):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        if self.ready_path:  # the node's directory, then the run's once no other node is in it
            if self.job:  # this job's claim of the directory (launch.session.claim_rendezvous)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(os.path.dirname(self.ready_path), "job"))
            remove_rendezvous_dirs(self.ready_path, self.run_id, self.node)

    # ------------------------------------------------------------------ main loop
    def _loop(self, sock, remote=None, zap=None) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        socks = [sock]
        if remote is not None:
            poller.register(remote.sock, zmq.POLLIN)
            poller.register(zap, zmq.POLLIN)
            socks.append(remote)
        tick = max(10, int(self.cfg.heartbeat * 1000))
        last_check = last_beat = time.monotonic()
        idle_since = time.monotonic()
        next_sample = last_check + self.cfg.telemetry_interval
        while True:
            events = dict(poller.poll(tick))
            if zap is not None and events.get(zap):
                self._answer_zap(zap)
            for s in socks:
                if not events.get(getattr(s, "sock", s)):
                    continue
                for _ in range(1000):  # bound the burst so liveness checks still run
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._handle(s, frames)
                self._commit()
                idle_since = time.monotonic()
            now = time.monotonic()
            if now - last_check >= self.cfg.heartbeat:
                last_check = now
                self._check_liveness(lambda: self._drain(poller, socks))
            if now - last_beat >= BEAT_S:
                last_beat = now
                self._beat()
            if self.telemetry is not None and now >= next_sample:
                next_sample = now + self.cfg.telemetry_interval
                self._sample_telemetry([s for s in self.streams.values() if not s.closed])
            if self._stop.is_set() and self._drain_deadline is None:
                self._drain_deadline = now + min(3.0, self.cfg.shutdown_timeout)
            if self._done(now, idle_since):
                return

    def _beat(self) -> None:
        """Say, in the partition, that this aggregator lives and what each running rank has
        stored so far: a reader on any host tells a live run from a dead one by the
        ``heartbeat_ns`` counter, and the rank table's ``records`` are right while the job
        runs (not 0 until the goodbye)."""
        if self._writer is None or self.stopped_writing:
            return
        for s in self.streams.values():
            if not s.closed:
                self._writer.upsert_rank((s.rank, s.pid), {"records": s.records})
        self._writer.counters["heartbeat_ns"] = time.time_ns()
        self._flush()

    def _answer_zap(self, zap) -> None:
        assert self._keys is not None  # ZAP runs only on a TCP endpoint, which has keys
        public = self._keys[0]
        for _ in range(100):
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = netkey.zap_reply(frames, public)
            if reply[2] != b"200":
                self.refused_connections += 1  # logged; not a partition counter
                n = self.refused_connections
                if n <= 10 or n & (n - 1) == 0:  # a retrying peer does not flood the log
                    log.warning("refused tcp connection #%d from %s: not the run's CURVE key",
                                n, bytes(frames[3][:64]).decode(errors="replace")
                                if len(frames) > 3 else "?")
            zap.send_multipart(reply)

    def _done(self, now: float, idle_since: float) -> bool:
        open_streams = [s for s in self.streams.values() if not s.closed]
        if self._drain_deadline is not None:
            if not open_streams or now >= self._drain_deadline:
                for s in open_streams:
                    self._salvage(s, "terminated")
                return True
            return False
        if open_streams:
            return False
        if self.expect and self.closed_ranks >= self.expect:
            return True
        return now - idle_since >= self.linger

    def _handle(self, sock, frames) -> None:
        if len(frames) < 3:
            return self._malformed(sock, frames[0] if frames else b"", "short message")
        key, kind, payload = frames[0], frames[1], frames[2]
        try:
            if kind == P.HELLO:
                self._on_hello(sock, key, P.loads(payload))
            elif kind == P.BATCH:
                self._on_batch(sock, key, payload, frames[3:])
            elif kind == P.GOODBYE:
                self._on_goodbye(sock, key, P.loads(payload))
            elif kind == P.HEARTBEAT:
                s = self.streams.get(key)
                if s is not None:
                    s.last_seen = time.monotonic()
            else:
                self._malformed(sock, key, f"unknown frame type {bytes(kind[:8])!r}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError,
                RecursionError, struct.error) as exc:
            self._malformed(sock, key, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a hostile or buggy peer must never stop the node's writer
            log.exception("unexpected error handling a frame from %r", bytes(key[:32]))
            self._malformed(sock, key, f"{type(exc).__name__}")

    def _malformed(self, sock, key, why: str) -> None:
        self.writer.counters["malformed_frames"] += 1
        log.warning("malformed frame from %r: %s", bytes(key[:32]), why)
        if key:
            try:
                sock.send_multipart([key, P.NACK, why.encode()[:200]], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # ------------------------------------------------------------------ messages
    def _on_hello(self, sock, key: bytes, hello: dict) -> None:
        rank, pid = int(hello["rank"]), int(hello["pid"])
        if not (0 <= rank < 1 << 31 and 0 < pid < 1 << 31):
            raise ValueError(f"hello with rank {rank} / pid {pid} out of range")
        if pid in self._orphans:
            return self._refuse(sock, key, f"pid {pid} ended; its segment was salvaged")
        if hello.get("run_id") != self.run_id:
            return self._refuse(sock, key, f"run id {hello.get('run_id')!r} is not {self.run_id!r}")
        if self.job:  # the same run id given to another job: never merged into this one
            theirs = (hello.get("launcher"), hello.get("job_id"))
            ours = (self.meta.get("launcher"), self.meta.get("job_id"))
            if theirs != ours:
                return self._refuse(sock, key, f"rank {rank} belongs to another job "
                                    f"(launcher {theirs[0]!r}, job {theirs[1]!r}; this "
                                    f"aggregator serves launcher {ours[0]!r}, job {ours[1]!r})")
            if hello.get("job") != self.job:
                return self._refuse(sock, key, f"rank {rank} belongs to another job with "
                                    f"run id {self.run_id!r} (its job secret differs)")
        old = self.streams.get(key)
        if old is not None and not old.closed:
            return self._malformed(sock, key, "second hello on an open stream")
        seg, mode = None, "inline"
        # a rank on the network is on another host: its batches come inline
        path = "" if isinstance(sock, _Remote) else str(hello.get("segment", ""))
        if path:
            try:
                seg = self._attach(path, rank, pid)
                mode = "shm"
            except (OSError, ValueError) as exc:
                log.info("rank %d: segment %s not mapped (%s); inline mode", rank, path, exc)
        s = Stream(key, hello, seg, mode)
        s.sock = sock
        self.streams[key] = s
        self.writer.upsert_rank((rank, pid), {
            "rank": rank, "local_rank": int(hello.get("local_rank", -1)), "pid": pid,
            "role": s.role, "host": str(hello.get("host", "")), "node": self.node,
            "gpu": self._gpu_label(str(hello.get("gpu", ""))),
            "start": int(hello.get("start", 0)),
            "status": "running", "reported": -1})
        self._flush()
        sock.send_multipart([key, P.WELCOME, P.dumps({"mode": mode})])

    def _refuse(self, sock, key, why: str) -> None:
        self.writer.counters["refused_hellos"] += 1
        log.warning("refused hello from %r: %s", bytes(key[:32]), why)
        sock.send_multipart([key, P.WELCOME, P.dumps({"error": why})])

    def _attach(self, path: str, rank: int, pid: int) -> Segment:
        """Map a segment, but only one of this user's and this run's, in the shm dir."""
        real = os.path.realpath(path)
        if os.path.dirname(real) != os.path.realpath(shm_dir()):
            raise ValueError("segment outside the shared-memory directory")
        # exactly the name this rank's agent gives it: this user, run, node, rank and pid
        if os.path.basename(real) != segment_name(self.run_id, self.node, rank, pid):
            raise ValueError("segment of another user, run, node or process")
        if any(s.seg is not None and not s.closed and s.seg.path == real
               for s in self.streams.values()):
            raise ValueError("segment already mapped for another connection")
        seg = Segment.attach(real)
        if seg.rank != rank or seg.pid != pid:
            seg.close()
            raise ValueError("segment header does not match the hello")
        return seg

    def _on_batch(self, sock, key: bytes, payload: bytes, inline) -> None:
        s = self.streams.get(key)
        if s is None or s.closed:
            return self._malformed(sock, key, "batch from an unknown or closed stream")
        slot, seq, count, heap_used = P.BATCH_FMT.unpack(payload)
        s.last_seen = time.monotonic()
        if s.mode == "shm":
            seg = s.seg
            assert seg is not None  # a shm stream always has its segment
            lay = seg.layout
            if slot >= lay.slots or count > lay.slot_records or heap_used > lay.heap:
                return self._malformed(sock, key, "batch outside the segment geometry")
            if seq < s.expected_seq:  # a replay: already on disk, just free the slot again
                self.writer.counters["replayed_batches"] += 1
                return sock.send_multipart([key, P.ACK, P.ACK_FMT.pack(slot, seq)])
            recs, heap = seg.view(slot, count), seg.heap(slot, heap_used)
        else:
            if len(inline) != 2 or len(inline[0]) != count * RECORD_SIZE \
                    or len(inline[1]) != heap_used:
                return self._malformed(sock, key, "inline batch with inconsistent lengths")
            if seq < s.expected_seq:
                self.writer.counters["replayed_batches"] += 1
                return sock.send_multipart([key, P.ACK, P.ACK_FMT.pack(slot, seq)])
            recs = np.frombuffer(inline[0], RECORD_DTYPE)  # read only: _ingest copies it
            heap = bytes(inline[1])
        if seq > s.expected_seq:
            self.writer.counters["sequence_gaps"] += 1
            log.warning("rank %d: batches %d..%d missing", s.rank, s.expected_seq, seq - 1)
        s.expected_seq = seq + 1
        self._ingest(s, recs, heap, 0, seq)
        self._acks.append((sock, key, s, slot, seq, count))  # sent by _commit, after the flush

    def _commit(self) -> None:
        """Flush once for a burst of batches, then free their slots and acknowledge them.

        A slot is acknowledged only after its records were flushed (an aggregator
        killed before that leaves them in the rank's segment for salvage).
        """
        if not self._acks:
            return
        self._flush()
        acks, self._acks = self._acks, []
        for sock, key, s, slot, seq, count in acks:
            if s.mode == "shm" and not s.closed:
                s.seg.zero(slot, count)
            try:
                sock.send_multipart([key, P.ACK, P.ACK_FMT.pack(slot, seq)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the rank is gone; its stream is closed by the liveness check

    def _on_goodbye(self, sock, key: bytes, msg: dict) -> None:
        s = self.streams.get(key)
        if s is None or s.closed:
            return self._malformed(sock, key, "goodbye from an unknown or closed stream")
        self._commit()
        drops = {str(k): int(v) for k, v in dict(msg.get("dropped", {})).items()}
        if self.telemetry is not None:  # the last sample, while the process still lives
            self._sample_telemetry([s])
        self._close_stream(s, str(msg.get("status", "ok")), int(msg.get("exit_code", 0)),
                           int(msg.get("end", time.time_ns())), int(msg.get("records", -1)), drops)
        sock.send_multipart([key, P.FAREWELL, b""])

    # ------------------------------------------------------------------ ingest
    def _ingest(self, s: Stream, recs: np.ndarray, heap: bytes, flags: int, seq: int = 0) -> None:
        is_str = recs["kind"] == STRING
        if not self._fits(recs.nbytes + len(heap)):  # before any of it is written
            return self._lose(s, int(len(recs) - is_str.sum()))
        if is_str.any():
            for r in recs[is_str]:
                off, length, sid = int(r["ival"]), int(r["step"]), int(r["id"])
                if not valid_definition(sid, off, length, len(heap)):
                    self.writer.counters["malformed_frames"] += 1
                    continue
                gid = self._intern(heap[off:off + length], int(r["flags"]))
                s.smap.define(sid, gid)
                self.writer.map_string(s.rank, s.pid, sid, gid)
            recs = recs[~is_str]
        if not len(recs):
            self.writer.note_batch(s.rank, s.pid, seq, self.writer.nrecords + self._staged, 0,
                                   flags)
            return
        n = len(recs)
        start = self.writer.nrecords + self._staged
        try:
            rows = self._stage_for(n)
        except (OSError, RuntimeError) as exc:  # disk full, read-only: count, keep serving
            self._write_failed(exc)
            return self._lose(s, n)
        # The rows are fixed in the copy: ``recs`` may be the slot in shared memory, which
        # stays as the rank wrote it until it is acknowledged (a salvage reads it again).
        # bytes, not fields: numpy copies a structured array field by field (30x slower)
        rows.view(np.uint8)[...] = np.ascontiguousarray(recs).view(np.uint8)
        # a string the stream never defined becomes the empty one: the record is kept
        rows["name"], bad_names = s.smap.remap(recs["name"])
        rows["sval"], bad_svals = s.smap.remap(recs["sval"])
        if bad_names or bad_svals:
            self.writer.counters["malformed_frames"] += 1
        rows["rank"] = s.rank  # the stream's rank, whatever the frame claims
        if flags:
            rows["flags"] |= flags
        if n <= len(self._stage):  # rows is the stage's next n rows
            self._staged += n  # written with the stage: at the next _flush at the latest
            self._staged_batches += 1
        else:  # larger than the stage: a write of its own
            try:
                self.writer.append(rows)
            except (OSError, RuntimeError) as exc:
                self._write_failed(exc)
                return self._lose(s, n)
        self.writer.note_batch(s.rank, s.pid, seq, start, n, flags)
        s.records += n
        self._unflushed += recs.nbytes + len(heap)
        self._since_flush.append((s, n))

    # A burst of batches is gathered in ``_stage`` and appended with one h5py write (one
    # resize + write per STAGE_ROWS rows instead of one per batch), always before the
    # flush that precedes the acks; the rows have their final positions (nrecords +
    # staged) from the start, so their batch notes are right.
    def _stage_for(self, n: int) -> np.ndarray:
        """Where ``n`` rows go: the stage's next rows (written out first if they do not
        fit), or an array of their own when they are more than the whole stage."""
        if n > len(self._stage):
            self._write_stage()
            return np.empty(n, RECORD_DTYPE)
        if self._staged + n > len(self._stage):
            self._write_stage()
        return self._stage[self._staged:self._staged + n]

    def _write_stage(self) -> None:
        if not self._staged:
            return
        rows, batches = self._stage[:self._staged], self._staged_batches
        self._staged = self._staged_batches = 0
        self.writer.append(rows)
        self.writer.counters["batches"] += batches - 1  # the counter counts batches

    def _write_failed(self, exc: BaseException) -> None:
        """A write failed: everything appended or staged since the last flush is gone."""
        self.writer.counters["write_errors"] += 1
        self._undo_unflushed(f"a write failed: {exc}")

    def _intern(self, data: bytes, flags: int) -> int:
        try:
            return self.writer.intern(data, flags)
        except (OSError, RuntimeError):
            self.writer.counters["write_errors"] += 1
            return 0

    def _flush(self) -> None:
        try:
            self._write_stage()
            self.writer.flush()
        except (OSError, RuntimeError) as exc:
            self.writer.counters["write_errors"] += 1
            log.error("flush failed: %s", exc)
            self._undo_unflushed(f"a flush failed: {exc}")
            return
        self._unflushed = 0
        self._since_flush.clear()
        self._mark = self.writer.mark()

    # ------------------------------------------------------------------ a full disk
    # Every record is stored or counted, exactly: a batch is written only when it fits
    # with one chunk and DISK_RESERVE to spare, counting what HDF5 has not flushed yet
    # (``_fits``); the first batch that does not fit stops the writing of records for
    # good (strings of lost batches are gone too), and each later record is counted as
    # an ``aggregator_write`` drop of its rank (``_lose``).  A write or flush that fails
    # anyway is rolled back to the last good flush and its records counted the same way.
    def _fits(self, nbytes: int) -> bool:
        if self.stopped_writing:
            return False
        if self.writer.room(self._unflushed + nbytes):
            return True
        if self._unflushed:  # what HDF5 still holds is not on disk yet: flush, look again
            self._flush()
            if not self.stopped_writing and self.writer.room(nbytes):
                return True
        if not self.stopped_writing:
            try:
                st = os.statvfs(self.path)
                free = f"{st.f_bavail * st.f_frsize} bytes free"
            except OSError as exc:
                free = str(exc)
            self._stop_writing(f"the file system is full ({free})")
        return False

    def _take_reserve(self) -> None:
        """Hold two files of DISK_RESERVE bytes beside the partition.  When another process
        fills the file system, the first is given back when writing stops (the rollback and
        the ranks' last rows), the second only for the close, so a filler still writing
        meanwhile cannot take what the close needs."""
        for i in range(2):
            path = os.path.join(os.path.dirname(self.path),
                                f".{os.path.basename(self.path)}.{i}.reserve")
            self._reserves.append(path)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, DISK_RESERVE)
                finally:
                    os.close(fd)
            except OSError:
                self._give_reserve(every=True)
                return

    def _give_reserve(self, every: bool = False) -> None:
        while self._reserves:
            path = self._reserves.pop(0)
            try:
                os.unlink(path)
            except OSError:
                pass
            if not every:
                return

    def _stop_writing(self, why: str) -> None:
        if not self.stopped_writing:
            self.stopped_writing = why
            self._give_reserve()
            log.error("%s: %s; records are no longer written, each is counted as an "
                      "aggregator_write drop of its rank", self.path, why)

    def _lose(self, s: Stream, n: int) -> None:
        """Count ``n`` records of ``s`` that will never be in the partition."""
        if n <= 0:
            return
        first = not self.write_lost
        s.write_drops += n
        self.write_lost += n
        self.writer.counters["dropped_records"] += n
        try:
            self.writer.set_drops(s.rank, s.pid, {REASONS[AGGREGATOR_WRITE]: s.write_drops})
        except (OSError, RuntimeError) as exc:
            log.error("cannot record the drops of rank %d: %s", s.rank, exc)
        if first:
            self._tell_ranks()

    def _undo_unflushed(self, why: str) -> None:
        lost, self._since_flush, self._unflushed = self._since_flush, [], 0
        self._staged = self._staged_batches = 0
        self._stop_writing(why)
        if self._mark is not None:
            try:
                self.writer.rollback(self._mark)
            except Exception as exc:  # noqa: BLE001 - recover validates what is left
                log.error("rolling %s back failed: %s", self.path, exc)
        for s, n in lost:
            s.records -= n
            self._lose(s, n)

    def _tell_ranks(self) -> None:
        """One line on the job's stderr, printed by the lowest open rank of this node."""
        open_ = [s for s in self.streams.values()
                 if not s.closed and s.sock is not None and s.role == "rank"]
        if not open_:
            return
        s = min(open_, key=lambda x: x.rank)
        sock = s.sock
        assert sock is not None  # open_ holds only streams with a socket
        text = (f"node {self.node}: {self.stopped_writing} at {self.path}: records of this "
                f"node are no longer stored ({self.write_lost} lost so far, each counted as "
                "an aggregator_write drop); the program goes on")
        try:
            sock.send_multipart([s.key, P.NACK, text.encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ telemetry
    def _sample_telemetry(self, streams) -> None:
        if self.telemetry is None:
            return
        try:
            self._write_stage()  # the samples' rows come after the staged ones
        except (OSError, RuntimeError) as exc:
            self._write_failed(exc)
            return
        try:
            self.telemetry.sample(streams)
        except Exception:  # telemetry must never stop the writer of the partition
            log.exception("telemetry sample failed")
            return
        self._flush()

    def _gpu_label(self, spec: str) -> str:
        try:
            return self.gpus.label(spec)
        except Exception:
            log.exception("GPU %r not resolved", spec)
            return spec

    # ------------------------------------------------------------------ liveness and salvage
    def _sweep_orphans(self) -> None:
        """Salvage segments of this run and node whose process died before its hello
        arrived (a forked worker that ended at once); their records are not lost."""
        prefix = segment_prefix(self.run_id, self.node)
        known = {s.pid for s in self.streams.values()} | self._orphans
        try:
            names = os.listdir(shm_dir())
        except OSError:
            return
        for name in names:
            parsed = parse_segment_name(name, self.run_id) if name.startswith(prefix) else None
            if parsed is None or parsed[0] != self.node:
                continue
            _node, rank, pid = parsed
            if pid in known:
                continue
            try:  # the segment's time: its creator ran then (a later owner of the pid did not)
                seen = os.stat(os.path.join(shm_dir(), name)).st_mtime_ns
            except OSError:
                continue
            if pid_alive(pid, seen):
                continue
            self._orphans.add(pid)
            path = os.path.join(shm_dir(), name)
            worker = any(s.rank == rank and s.role == "rank" for s in self.streams.values())
            try:
                seg = self._attach(path, rank, pid)
            except (OSError, ValueError) as exc:
                if never_made(path):  # no record in it: nothing to keep in /dev/shm
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    log.info("removed %s: pid %d (rank %d) died making it, before any "
                             "record", name, pid, rank)
                    lead = self._leader if self._leader and self._leader[2] == pid else None
                    self._ended_unseen(rank, lead[1] if lead else -1, pid,
                                       "worker" if worker else "rank", seen)
                else:
                    log.warning("orphan segment %s not salvaged: %s", name, exc)
                continue
            s = Stream(b"orphan:%d" % pid, {"rank": rank, "pid": pid,
                                            "role": "worker" if worker else "rank"}, seg, "shm")
            self.streams[s.key] = s
            self.writer.upsert_rank((rank, pid), {
                "rank": rank, "local_rank": -1, "pid": pid, "role": s.role, "node": self.node,
                "status": "running", "reported": -1})
            log.info("salvaging the segment of pid %d (rank %d), which never said hello",
                     pid, rank)
            self._salvage(s, "killed")

    def _drain(self, poller, socks, wait_ms: int = 100) -> None:
        """Handle what the sockets hold now, waiting up to ``wait_ms`` for the first frame:
        a rank's goodbye sent just before it exited may not have been read yet."""
        for _ in range(100):
            events = dict(poller.poll(wait_ms))
            wait_ms = 0
            got = False
            for s in socks:
                if not events.get(getattr(s, "sock", s)):
                    continue
                for _ in range(1000):
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    got = True
                    self._handle(s, frames)
            self._commit()
            if not got:
                return

    def _check_liveness(self, drain=None) -> None:
        self._sweep_orphans()
        self._check_leader(drain)
        now = time.monotonic()
        dead = [s for s in self.streams.values()
                if not s.closed and s.mode == "shm"
                and not pid_alive(s.pid, int(s.hello.get("start", 0) or 0))]
        if dead and drain is not None:
            drain()  # its goodbye may be in flight: a rank that said it is not killed
        for s in dead:
            if not s.closed:
                self._salvage(s, "killed")
        for s in list(self.streams.values()):
            if s.closed or s.mode == "shm":
                continue
            if now - s.last_seen > max(10.0, 20 * self.cfg.heartbeat):
                self._close_stream(s, "lost", -1, time.time_ns(), -1, {})

    def _check_leader(self, drain=None) -> None:
        """The rank that started this aggregator ended before its hello reached it (killed
        during its start-up, before it made its segment: nothing of it to salvage).  It is
        recorded as killed -- it ended without a goodbye, as this aggregator saw -- and
        counts as a closed rank, so that the partition is completed now instead of after
        ``linger`` seconds of waiting for a rank that cannot come any more."""
        if self._leader is None:
            return
        rank, local_rank, pid = self._leader

        def seen() -> bool:  # it said hello, its segment was salvaged or found half-made
            return pid in self._unseen or any(s.pid == pid for s in self.streams.values())

        if seen():
            self._leader = None
            return
        if pid_alive(pid, self._leader_seen):
            return
        if drain is not None:
            drain()  # its hello may still be in the socket
            if seen():
                self._leader = None
                return
        self._leader = None
        self._ended_unseen(rank, local_rank, pid, "rank", self._leader_seen)
        log.info("rank %d (pid %d), which started this aggregator, ended before it said "
                 "hello", rank, pid)

    def _ended_unseen(self, rank: int, local_rank: int, pid: int, role: str,
                      start: int) -> None:
        """Record a process that ended before its hello, with no record to salvage, as
        killed (it ended without a goodbye, as this aggregator saw); a rank counts as
        closed, so that the partition is completed without waiting for it."""
        self._orphans.add(pid)  # a hello still on its way is refused, as an orphan's
        self._unseen.add(pid)
        self.writer.upsert_rank((rank, pid), {
            "rank": rank, "local_rank": local_rank, "pid": pid, "role": role,
            "host": socket.gethostname(), "node": self.node, "start": start,
            "end": time.time_ns(), "status": "killed", "exit_code": -1, "records": 0,
            "reported": -1})
        if role == "rank":
            self.closed_ranks += 1
        self._flush()

    def _salvage(self, s: Stream, status: str) -> None:
        """Take every record the rank wrote that is not yet on disk, oldest slot first."""
        if s.seg is not None:
            for slot in s.seg.pending(s.expected_seq - 1):
                recs = s.seg.committed(slot)
                before = s.records
                self._ingest(s, recs, s.seg.heap(slot, s.seg.heap_used(slot)), F_SALVAGED,
                             s.seg.seq(slot))
                s.salvaged += s.records - before
                s.expected_seq = s.seg.seq(slot) + 1
            self.writer.counters["salvaged_records"] += s.salvaged
            drops = s.seg.drop_counts()
        else:
            drops = {}
        self._close_stream(s, status, -1, time.time_ns(), -1, drops)

    def _close_stream(self, s: Stream, status, exit_code, end, reported, drops) -> None:
        s.closed = True
        if s.role == "rank":
            self.closed_ranks += 1
        drops = {k: v for k, v in drops.items() if v}
        already = s.write_drops  # counted in dropped_records when they were lost
        if already:
            reason = REASONS[AGGREGATOR_WRITE]
            drops[reason] = drops.get(reason, 0) + already
        self.writer.upsert_rank((s.rank, s.pid), {
            "end": end, "status": status, "exit_code": exit_code, "records": s.records,
            "reported": reported, "dropped": sum(drops.values()), "salvaged": s.salvaged})
        if drops:
            self.writer.set_drops(s.rank, s.pid, drops)
            self.writer.counters["dropped_records"] += sum(drops.values()) - already
        self._flush()
        if s.seg is not None:
            s.seg.close(unlink=True)

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._give_reserve(every=True)
        self._commit()
        self._sweep_orphans()
        for s in self.streams.values():
            if not s.closed:
                self._salvage(s, "terminated")
        if self._staged:  # every ingest path flushes; this is the guard that none is missed
            self._flush()
        try:
            self.writer.close({"complete_reason": "all ranks closed",
                               "drop_reasons": list(DROP_REASONS)})
        except OSError as exc:
            log.error("closing %s failed: %s", self.path, exc)
            self.exit_status = 1


class _Remote:
    """The tcp ROUTER, its peers' identities prefixed so that a remote stream never
    shares a key with a local one (replies strip the prefix again)."""

    PREFIX = b"tcp\0"

    def __init__(self, sock):
        self.sock = sock

    def recv_multipart(self, flags=0, copy=True):
        frames = self.sock.recv_multipart(flags, copy=copy)
        frames[0] = self.PREFIX + bytes(frames[0])
        return frames

    def send_multipart(self, frames, flags=0):
        key = bytes(frames[0])
        if key.startswith(self.PREFIX):
            key = key[len(self.PREFIX):]
        return self.sock.send_multipart([key, *frames[1:]], flags)


def _unused_path(path: str) -> str:
    """``path``, or ``<node>.<n>.h5`` when a partition of this node already exists."""
    base, n = path[:-3], 1
    while os.path.exists(path):
        path = f"{base}.{n}.h5"
        n += 1
    return path


def _live_aggregator(ready_path: str) -> int:
    """The pid of another live aggregator named in ``ready_path`` (0 when none)."""
    pid = writer_alive(ready_path)
    return pid if pid != os.getpid() else 0


def run_process(agg: Aggregator) -> int:
    """Run as the node's aggregator process: SIGTERM/SIGINT drain and close."""
    def _on_signal(signum, _frame):
        log.info("signal %d: draining", signum)
        agg.stop()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fmt = f"%(asctime)s provhpc-aggregator[{agg.node}] %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=fmt)
    return agg.serve()
