"""Hostile input to the aggregator (contract 7): malformed, truncated, oversized,
replayed and out-of-order frames and bogus segment names are counted and logged;
the aggregator keeps serving the honest rank and maps nothing outside its job."""

from __future__ import annotations

import json
import os
import threading

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
