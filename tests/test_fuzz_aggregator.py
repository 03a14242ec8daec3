"""Hostile input to the aggregator (contract 7): malformed, truncated, oversized,
replayed and out-of-order frames and bogus segment names are counted and logged;
the aggregator keeps serving the honest rank and maps nothing outside its job."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import provhpc
from provhpc.format import protocol as P
from provhpc.format import records as R
from provhpc.format import segment as S
from provhpc.testing import capture

pytestmark = pytest.mark.timeout(180)

KINDS = [P.HELLO, P.BATCH, P.GOODBYE, P.HEARTBEAT, P.ACK, b"Z", b"", b"HH"]
BOGUS_SEGMENTS = ["/etc/passwd", "../../etc/shadow", "/dev/shm/../etc/passwd",
                  "/dev/shm/provhpc-0-other-run-testnode-r0-p1", "/tmp/x", "", "\x00",
                  "/dev/shm/provhpc-{uid}-{run}-testnode-r0-p{pid}",  # the honest one: taken
                  "/dev/shm/provhpc-{uid}-{run}-othernode-r0-p1"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)

hello = st.fixed_dictionaries({
    "rank": st.one_of(st.integers(-5, 2**40), st.text(max_size=4), st.none()),
    "pid": st.one_of(st.integers(-5, 2**40), st.just(os.getpid())),
    "segment": st.sampled_from(BOGUS_SEGMENTS),
    "run_id": st.sampled_from(["{run}", "other", ""]),
}, optional={"role": st.text(max_size=12), "host": st.text(max_size=80), "x": json_values})

frame = st.one_of(
    st.binary(max_size=200),
    hello.map(lambda h: ("hello", h)),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)).map(lambda t: ("batch", t)),
    json_values.map(lambda v: ("json", v)),
)
message = st.tuples(st.sampled_from(KINDS), frame,
                    st.lists(st.binary(max_size=256), max_size=3))


def _encode(payload, run_id: str, pid: int) -> bytes:
    if isinstance(payload, bytes):
        return payload
    tag, v = payload
    if tag == "hello":
        v = {k: (x.format(uid=os.getuid(), run=run_id, pid=pid)
                 if k in ("segment", "run_id") else x) for k, x in v.items()}
        return json.dumps(v).encode()
    if tag == "batch":
        return P.BATCH_FMT.pack(*v)
    return json.dumps(v).encode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An honest rank (capture) and a hostile connection to the same aggregator."""
    tmp = tmp_path_factory.mktemp("fuzz")
    attached = []
    real_attach = S.Segment.attach.__func__

    def spy(cls, path):
        attached.append(path)
        return real_attach(cls, path)

    S.Segment.attach = classmethod(spy)
    ctx = zmq.Context()
    try:
        with capture(tmp, flush_interval=0.05) as cap:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, b"intruder")
            sock.connect(cap.aggregator.endpoint)
            yield cap, sock, attached
    finally:
        S.Segment.attach = classmethod(real_attach)
        ctx.destroy(linger=0)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(message, min_size=1, max_size=8), step=st.integers(0, 10**6))
def test_hostile_frames_never_stop_the_aggregator(hostile, msgs, step):
    cap, sock, attached = hostile
    for kind, payload, extra in msgs:
        frames = [kind, _encode(payload, cap.run_id, os.getpid()), *extra]
        sock.send_multipart(frames)
        provhpc.metric("honest", float(step), step=step)
    agg = cap.aggregator
    assert not agg._stop.is_set()
    assert any(t.name == "provhpc-aggregator" and t.is_alive() for t in threading.enumerate()), \
        "the aggregator thread died"
    shm = os.path.realpath(S.shm_dir())
    for path in attached:  # only this run's own segment, by its exact name
        assert os.path.dirname(os.path.realpath(path)) == shm
        assert os.path.basename(path).startswith(f"provhpc-{os.getuid()}-{cap.run_id}-testnode-")


def test_honest_rank_served_and_garbage_counted(tmp_path):
    """After a storm (oversized, truncated, replayed, out-of-order), every honest record
    is there and the bad frames are in the counters."""
    ctx = zmq.Context()
    try:
        with capture(tmp_path, flush_interval=0.05) as cap:
            bad = ctx.socket(zmq.DEALER)
            bad.setsockopt(zmq.LINGER, 0)
            bad.setsockopt(zmq.SNDTIMEO, 5000)  # a dead aggregator fails the test, not hangs it
            bad.setsockopt(zmq.RCVTIMEO, 5000)
            bad.connect(cap.aggregator.endpoint)
            ok_hello = {"rank": 9, "pid": 1, "segment": "", "run_id": cap.run_id}
            bad.send_multipart([P.HELLO, json.dumps(ok_hello).encode()])  # inline stream
            bad.recv_multipart()
            rec = bytes(R.RECORD_SIZE)
            for i in range(500):
                provhpc.metric("honest", float(i), step=i)
                bad.send_multipart([P.BATCH, P.BATCH_FMT.pack(0, 5, 1, 0), rec, b""])   # gap
                bad.send_multipart([P.BATCH, P.BATCH_FMT.pack(0, 1, 1, 0), rec, b""])   # replay
                bad.send_multipart([P.BATCH, P.BATCH_FMT.pack(0, 9, 3, 0), rec, b""])   # short
                bad.send_multipart([P.BATCH, b"\x01\x02"])                              # truncated
                bad.send_multipart([P.HELLO, b"[" * 100000])                            # deep JSON
                bad.send_multipart([P.GOODBYE, os.urandom(64)])
            bad.send_multipart([P.BATCH, os.urandom(4 << 20)])  # oversized payload
            bad.close(0)
        counters = cap.run.partitions[0].counters()
        steps = sorted(int(r["step"]) for r in cap.records("metric")
                       if cap.run.partitions[0].strings[r["name"]] == "honest")
        assert steps == list(range(500))
        assert counters["malformed_frames"] >= 500  # the queue left at close is not read
        assert counters["replayed_batches"] >= 1 and counters["sequence_gaps"] >= 1
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------- string-id bounds
# A STRING record may define rank-local ids 1 .. LOCAL_ID_LIMIT-1 (id 0 is the empty
# string, never defined).  The aggregator and `provhpc recover` take definitions through
# the one StringMap / valid_definition of provhpc.format.strings; these tests sit on
# both sides of each bound, so a `<=` where `<` belongs (or the reverse) fails them.
from provhpc.format import strings as SI  # noqa: E402
from provhpc.format.partition import open_partition  # noqa: E402
from provhpc.launch import config  # noqa: E402
from provhpc.node.aggregator import Aggregator, Stream  # noqa: E402
from provhpc.node.recover import recover  # noqa: E402

EDGE_IDS = [(0, False), (1, True), (SI.LOCAL_ID_LIMIT - 1, True), (SI.LOCAL_ID_LIMIT, False)]


def test_valid_definition_bounds():
    assert [SI.valid_definition(sid, 0, 1, 1) for sid, _ in EDGE_IDS] == [ok for _, ok in EDGE_IDS]
    assert SI.valid_definition(5, 2, 3, 5) and not SI.valid_definition(5, 2, 4, 5)
    assert not SI.valid_definition(5, -1, 1, 5) and not SI.valid_definition(5, 0, -1, 5)
    assert list(SI.unknown_ids(np.array([0, 2, 3]), 3)) == [False, False, True]


def test_string_map_remap_keeps_records_of_unknown_ids():
    m = SI.StringMap()
    m.define(3, 30)
    m.define(SI.LOCAL_ID_LIMIT - 1, 99)  # sparse: no 2**31-entry array
    ids, unknown = m.remap(np.array([0, 3, 4, SI.LOCAL_ID_LIMIT - 1, 2**32 - 1], "<u4"))
    assert ids.tolist() == [0, 30, 0, 99, 0] and unknown == 2
    with pytest.raises(ValueError):
        m.define(SI.LOCAL_ID_LIMIT, 1)
    with pytest.raises(ValueError):
        m.define(0, 1)


def _batch(sids, rank: int = 0):
    """One STRING record per id (bytes b"s<id>"), then one METRIC naming each id."""
    heap = b""
    recs = np.zeros(2 * len(sids), R.RECORD_DTYPE)
    for i, sid in enumerate(sids):
        text = b"s%d" % sid
        recs[i]["kind"], recs[i]["id"] = R.STRING, sid
        recs[i]["ival"], recs[i]["step"] = len(heap), len(text)
        heap += text
        m = recs[len(sids) + i]
        m["kind"], m["name"], m["step"], m["rank"] = R.METRIC, sid, i, rank
    return recs, heap


def _metric_names(path: str) -> dict:
    with open_partition(path) as f:
        recs, strings, heap = f["records"][:], f["strings"][:], f["string_heap"][:].tobytes()
    text = [heap[o:o + n].decode() for o, n, _ in strings.tolist()]
    return {int(r["step"]): text[int(r["name"])] for r in recs if r["kind"] == R.METRIC}


def _expected(sids) -> dict:
    ok = dict(EDGE_IDS)
    return {i: (f"s{sid}" if ok[sid] else "") for i, sid in enumerate(sids)}


def test_aggregator_takes_string_ids_up_to_the_bound(tmp_path):
    sids = [sid for sid, _ in EDGE_IDS]
    cfg = config.load({}, runtime_dir=str(tmp_path))
    agg = Aggregator(cfg, "bounds", "n", str(tmp_path), "ipc://unused", str(tmp_path / "r"))
    os.makedirs(tmp_path / "bounds")
    agg._open_partition()
    s = Stream(b"k", {"rank": 0, "pid": os.getpid()}, None, "inline")
    recs, heap = _batch(sids)
    agg._ingest(s, recs, heap, 0, 1)
    agg._flush()  # the aggregator's flush: it writes the rows it gathered, then flushes
    bad = agg.writer.counters["malformed_frames"]
    agg.writer.close()
    # ids 0 and LOCAL_ID_LIMIT: each definition refused, plus one for the batch's
    # records naming undefined ids; every record is kept
    assert bad == 3
    assert _metric_names(agg.path) == _expected(sids)


def test_recover_takes_string_ids_up_to_the_bound(tmp_path):
    sids = [sid for sid, _ in EDGE_IDS]
    run_id = "bounds-rec"
    rdir = tmp_path / run_id
    rdir.mkdir()
    path = os.path.join(S.shm_dir(), S.segment_name(run_id, "n", 0, os.getpid()))
    seg = S.Segment.create(path, 0, 2, 16, 256)
    try:
        recs, heap = _batch(sids)
        off = seg.layout.records_offset(0)
        seg.mm[off:off + recs.nbytes] = recs.tobytes()
        hoff = seg.layout.heap_offset(0)
        seg.mm[hoff:hoff + len(heap)] = heap
        seg.u32[S.T_COUNT], seg.u32[S.T_HEAP_USED] = len(recs), len(heap)
        seg.u64[S.T_SEQ] = 1
        seg.u32[S.T_STATE] = S.SEALED
        rep = recover(str(rdir), force=True)  # force: the segment's process (us) lives
    finally:
        seg.close(unlink=True)
    (entry,) = rep["partitions"]
    assert entry["action"] == "created" and entry["salvaged"] == len(sids)
    assert _metric_names(str(rdir / "n.h5")) == _expected(sids)
