"""Pre-encoded slots replayed into a real node aggregator: only the node side is timed.

The records of a training step (an activity start, five metrics, an attribute,
the activity end; eight interned names) are encoded once into numpy arrays of
the record layout.  A producer in this process then plays N ranks: it makes
each rank's segment (the name, header and slot table the agent makes), says
hello over ZeroMQ like the agent, and keeps every slot in flight -- copy the
pre-encoded slot into shared memory (a memcpy), mark it sealed, send the
batch frame; on its ack, refill and resend -- until each rank has sent its
batches.  The aggregator is the real ``provhpc aggregate`` process: it maps
the segments, remaps string ids, appends, flushes, zeroes the slot and acks.

The clock runs from the first batch to the last ack (every record flushed);
start-up and the partition's close are outside it, as they are outside the
raw h5py figure beside it.  The producer's work per slot (a 256 KiB copy and a
frame) is ~1/40 of the aggregator's, so it is never the bottleneck.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from provhpc.format import protocol as P  # noqa: E402
from provhpc.format import records as R  # noqa: E402
from provhpc.format import segment as S  # noqa: E402

NAMES = [b"step", b"task", b"loss", b"lr", b"accuracy", b"grad_norm", b"tokens", b"batch"]
STEP = 8  # records per step: start, five metrics (names 3..7), an int attribute (8), end


def step_rows(n: int, rank: int = 0) -> np.ndarray:
    """``n`` records of training steps, string ids 1..8 as the rank's agent interns them."""
    rows = np.zeros(n, R.RECORD_DTYPE)
    i = np.arange(n)
    step, k = i // STEP, i % STEP
    rows["rank"] = rank
    rows["t"] = 1_700_000_000_000_000_000 + i * 1000
    rows["id"] = step + 2  # the step activity (1 is the run)
    rows["step"] = R.NO_STEP
    start, end = k == 0, k == STEP - 1
    metric, attr = (k >= 1) & (k <= 5), k == 6
    rows["kind"][start], rows["ref"][start] = R.ACTIVITY_START, 1
    rows["name"][start], rows["sval"][start] = 1, 2
    rows["step"][start] = step[start]
    rows["kind"][end] = R.ACTIVITY_END
    rows["kind"][metric], rows["vtype"][metric] = R.METRIC, R.V_FLOAT
    rows["name"][metric] = k[metric] + 2
    rows["step"][metric] = step[metric]
    rows["fval"][metric] = np.sin(i[metric] * 1e-3)
    rows["kind"][attr], rows["vtype"][attr], rows["name"][attr] = R.ATTRIBUTE, R.V_INT, 8
    rows["ival"][attr] = 4096
    return rows


def string_rows(rank: int = 0) -> tuple[np.ndarray, bytes]:
    """The STRING records (and heap) of the rank's first slot: the first use of each name."""
    rows = np.zeros(len(NAMES), R.RECORD_DTYPE)
    heap, off = bytearray(), 0
    for j, name in enumerate(NAMES):
        rows[j] = (R.STRING, 0, 0, rank, j + 1, 0, 0, 0, 0, len(name), off, 0.0)
        heap += name
        off += len(name)
    return rows, bytes(heap)


class Slots:
    """The pre-encoded slots of one rank: the first (with its strings), then the steady one."""

    def __init__(self, rank: int, slot_records: int):
        strings, self.heap = string_rows(rank)
        steady = step_rows(slot_records, rank)
        first = np.concatenate([strings, steady[: slot_records - len(strings)]])
        self.first, self.steady = first.tobytes(), steady.tobytes()
        self.stored_first = first[len(strings):]  # the rows the partition keeps
        self.stored_steady = steady


# The aggregator under cProfile from the start of ``Aggregator.serve`` (its public entry)
# to its return: the imports of the process are outside the profile.
PROFILED = """
import cProfile, runpy, sys
from provhpc.node.aggregator import Aggregator
path, serve, prof = sys.argv[1], Aggregator.serve, cProfile.Profile()
def profiled(self):
    prof.enable()
    try:
        return serve(self)
    finally:
        prof.disable()
        prof.dump_stats(path)
Aggregator.serve = profiled
sys.argv = ["provhpc"] + sys.argv[2:]
runpy.run_module("provhpc", run_name="__main__")
"""


class Replay:
    """One aggregator process fed by ``ranks`` replayed ranks, ``batches`` slots each."""

    def __init__(self, ranks: int, batches: int, compression: str, work: str, cfg,
                 profile: str = ""):
        self.ranks, self.batches, self.compression = ranks, batches, compression
        self.work, self.cfg, self.profile = work, cfg, profile
        self.run_id = "replay-" + os.path.basename(work)
        self.node = "n0"
        self.pid = os.getpid()

    def _spawn(self) -> subprocess.Popen:
        self.endpoint = "ipc://" + os.path.join(self.work, "agg.sock")
        self.ready = os.path.join(self.work, "agg.ready")
        cmd = [sys.executable]
        cmd += ["-c", PROFILED, self.profile] if self.profile else ["-m", "provhpc"]
        cmd += ["aggregate", "--run-id", self.run_id, "--node", self.node,
                "--out", os.path.join(self.work, "out"), "--endpoint", self.endpoint,
                "--ready", self.ready, "--expect", str(self.ranks)]
        env = C.clean_env(PROVHPC_COMPRESSION=self.compression)
        self.log = open(os.path.join(self.work, "agg.log"), "wb")
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                stderr=subprocess.STDOUT)

    def run(self) -> dict:
        os.makedirs(self.work, mode=0o700, exist_ok=True)
        proc = self._spawn()
        ctx = zmq.Context()
        cfg = self.cfg
        streams = []
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(self.ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"aggregator did not start; see {self.log.name}")
                time.sleep(0.01)
            for r in range(self.ranks):
                streams.append(self._hello(ctx, r))
            for s in streams:
                self._welcome(s)
            res = self._pump(streams, proc.pid)
            for s in streams:
                s["sock"].send_multipart([P.GOODBYE, P.dumps({
                    "status": "ok", "exit_code": 0, "records": s["stored"], "dropped": {},
                    "end": time.time_ns()})])
            for s in streams:
                self._expect(s, P.FAREWELL, 30)
            proc.wait(timeout=60)
            res["exit"] = proc.returncode
            res.update(self._check(cfg))
            return res
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.log.close()
            for s in streams:
                s["sock"].close(0)
                s["seg"].close(unlink=os.path.exists(s["seg"].path))
            ctx.term()

    def _hello(self, ctx, rank: int) -> dict:
        cfg = self.cfg
        path = os.path.join(S.shm_dir(), S.segment_name(self.run_id, self.node, rank, self.pid))
        seg = S.Segment.create(path, rank, cfg.slots, cfg.slot_records, cfg.slot_heap)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{rank}:{self.pid}".encode())
        sock.connect(self.endpoint)
        sock.send_multipart([P.HELLO, P.dumps({
            "rank": rank, "local_rank": rank, "size": self.ranks, "pid": self.pid,
            "host": "replay", "node": self.node, "gpu": "", "role": "rank",
            "segment": path, "start": time.time_ns(), "run_id": self.run_id})])
        return {"rank": rank, "seg": seg, "sock": sock, "slots": Slots(rank, cfg.slot_records),
                "free": list(range(cfg.slots)), "sent": 0, "acked": 0, "stored": 0}

    @staticmethod
    def _expect(s: dict, kind: bytes, timeout: float) -> list:
        if not s["sock"].poll(int(timeout * 1000)):
            raise RuntimeError(f"rank {s['rank']}: no {kind!r} from the aggregator")
        frames = s["sock"].recv_multipart()
        if frames[0] != kind:
            raise RuntimeError(f"rank {s['rank']}: {frames[0]!r} instead of {kind!r}")
        return frames

    def _welcome(self, s: dict) -> None:
        msg = P.loads(self._expect(s, P.WELCOME, 30)[1])
        if msg.get("mode") != "shm":
            raise RuntimeError(f"rank {s['rank']}: not mapped by the aggregator: {msg}")

    def _send(self, s: dict) -> None:
        slot = s["free"].pop()
        seg, lay, sl = s["seg"], s["seg"].layout, s["slots"]
        first = s["sent"] == 0
        data, heap = (sl.first, sl.heap) if first else (sl.steady, b"")
        off = lay.records_offset(slot)
        seg.mm[off:off + len(data)] = data
        if heap:
            hoff = lay.heap_offset(slot)
            seg.mm[hoff:hoff + len(heap)] = heap
        s["sent"] += 1
        count = len(data) // R.RECORD_SIZE
        seg.u32[slot * 8 + 1], seg.u32[slot * 8 + 2] = count, len(heap)
        seg.u64[slot * 4 + 2] = s["sent"]
        seg.u32[slot * S.SLOT_U32 + S.T_STATE] = S.SEALED
        s["stored"] += len(sl.stored_first) if first else len(sl.stored_steady)
        s["sock"].send_multipart([P.BATCH, P.BATCH_FMT.pack(slot, s["sent"], count, len(heap))])

    def _pump(self, streams: list, agg_pid: int) -> dict:
        poller = zmq.Poller()
        by_sock = {}
        for s in streams:
            poller.register(s["sock"], zmq.POLLIN)
            by_sock[s["sock"]] = s
        total = self.ranks * self.batches
        acked, rss_quarter = 0, 0
        cpu0 = C.cpu_times_of(agg_pid)
        t0 = time.perf_counter()
        for s in streams:
            while s["free"] and s["sent"] < self.batches:
                self._send(s)
        while acked < total:
            events = poller.poll(30_000)
            if not events:
                raise RuntimeError(f"no ack for 30 s ({acked}/{total} batches)")
            for sock, _ in events:
                s = by_sock[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames[0] != P.ACK:
                        continue
                    slot, _seq = P.ACK_FMT.unpack(frames[1])
                    s["seg"].u32[slot * S.SLOT_U32 + S.T_STATE] = S.FREE
                    s["free"].append(slot)
                    s["acked"] += 1
                    acked += 1
                    if acked == total // 4:
                        rss_quarter = _rss_of(agg_pid)
                while s["free"] and s["sent"] < self.batches:
                    self._send(s)
        dt = time.perf_counter() - t0
        cpu = C.cpu_times_of(agg_pid) - cpu0
        records = sum(s["stored"] for s in streams)
        return {"rate": records / dt, "seconds": dt, "records": records, "agg_cpu_s": cpu,
                "rss_quarter": rss_quarter, "rss_end": _rss_of(agg_pid),
                "peak_rss": C.peak_rss_of(agg_pid)}

    def _check(self, cfg) -> dict:
        """Every replayed record is in the partition, none dropped; its size on disk."""
        import glob

        import h5py

        (path,) = glob.glob(os.path.join(self.work, "out", self.run_id, "*.h5"))
        with h5py.File(path, "r", locking=False) as f:
            stored = f["records"].shape[0]
            complete = bool(f.attrs.get("complete", False))
        return {"stored": stored, "complete": complete, "bytes": os.path.getsize(path)}

    def stored_rows(self) -> list:
        """The rows the partition keeps, rank by rank, batch by batch (for raw h5py)."""
        out = []
        for r in range(self.ranks):
            sl = Slots(r, self.cfg.slot_records)
            out += [sl.stored_first] + [sl.stored_steady] * (self.batches - 1)
        return out


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def raw_h5py(batches: list, compression: str, work: str, flush_each: bool = True) -> dict:
    """The same rows appended with plain h5py, to a dataset made as the partition's.

    Chunks, filters, libver and SWMR are read from a partition that
    ``PartitionWriter`` creates, so the comparison follows the format.  Every
    batch is a resize and a write; ``flush_each`` flushes after each batch
    (the aggregator flushes before it acks, once per burst of batches),
    otherwise once at the end (plain append speed: the disk-speed ceiling).
    File creation and close are outside the clock, as for the replay.
    """
    import h5py

    from provhpc.format.partition import LIBVER, PartitionWriter

    os.makedirs(work, exist_ok=True)
    ref = PartitionWriter(os.path.join(work, "ref.h5"), {}, compression)
    d = ref.records
    opts = {"chunks": d.chunks, "compression": d.compression,
            "compression_opts": d.compression_opts, "shuffle": d.shuffle}
    swmr = ref.swmr
    ref.close()
    path = os.path.join(work, "raw.h5")
    with h5py.File(path, "w", libver=LIBVER) as f:
        ds = f.create_dataset("records", (0,), maxshape=(None,), dtype=R.RECORD_DTYPE, **opts)
        if swmr:
            f.swmr_mode = True
        t0 = time.perf_counter()
        n = 0
        for rows in batches:
            ds.resize((n + len(rows),))
            ds[n:] = rows
            n += len(rows)
            if flush_each:
                f.flush()
        f.flush()
        dt = time.perf_counter() - t0
    size = os.path.getsize(path)
    for p in (path, os.path.join(work, "ref.h5")):
        os.unlink(p)
    return {"rate": n / dt, "seconds": dt, "records": n, "bytes": size}


# Where the aggregator's time goes: the cumulative time of the steps of a batch,
# (file, function) as cProfile names them.  "own" rows are a function's own time.
STEPS = [
    ("receive frames (zmq)", "cum", "socket.py", "recv_multipart"),
    ("copy into the stage, string remap, rank column (own time of _ingest)", "own",
     "aggregator.py", "_ingest"),
    ("free-space check (statvfs)", "cum", "partition.py", "room"),
    ("append: resize + write (h5py), once per stage of batches", "cum", "partition.py",
     "append"),
    ("flush: batch table, counters, H5Fflush", "cum", "partition.py", "flush"),
    ("zero the slot", "cum", "segment.py", "zero"),
    ("send acks (zmq)", "cum", "socket.py", "send_multipart"),
    ("poll", "cum", "poll.py", "poll"),
]


def profile_summary(path: str, top: int = 15) -> str:
    """cProfile of one aggregator's ``serve``: the steps of a batch, then the top functions."""
    import io
    import pstats

    st = pstats.Stats(path, stream=io.StringIO())
    total = st.total_tt
    steps = []
    for label, how, fname, func in STEPS:
        hits = [(nc, tt, ct) for (f, _l, fn), (_cc, nc, tt, ct, _c) in st.stats.items()
                if fn == func and os.path.basename(f) == fname]
        calls = sum(h[0] for h in hits)
        t = sum(h[1] if how == "own" else h[2] for h in hits)
        steps.append([label, f"{calls:,}", f"{t:.3f}", f"{t / total:.0%}"])
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = fn if file == "~" else f"{os.path.basename(file)}:{line}({fn})"
        rows.append([where, f"{nc:,}", f"{tt:.3f}", f"{tt / total:.0%}", f"{ct:.3f}"])
    return (C.table(["step", "calls", "s", "share"], steps) + "\n\n" +
            C.table(["function (own time, descending)", "calls", "own s", "share", "cum s"],
                    rows) + f"\n(profile total {total:.3f} s: Aggregator.serve, from opening "
            "the partition to closing it)")


def scratch() -> str:
    return tempfile.mkdtemp(prefix="agg-", dir=os.environ.get("TMPDIR", "/tmp"))
