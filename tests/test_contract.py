"""Contract points not covered elsewhere: 1 (slow disk: bounded memory, backpressure,
counted drops), 2 (within the flush interval without further calls), 6 (a corrupt
partition is named while the others stay readable).  Points 3-5 are in
test_faults.py, bad values in test_badvalues.py, 7 in test_security.py and
test_fuzz_aggregator.py; docs/reliability.md maps each point to its test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import provhpc
from provhpc.format import partition as PW
from provhpc.post.reader import Run, summary
from provhpc.testing import capture

pytestmark = pytest.mark.timeout(60)


# A reader in another process, through the public API only: it opens the live run afresh
# every 10 ms and reports the wall-clock time at which the metric named argv[2] is readable.
WATCH = """
import sys, time
import provhpc
run_dir, name = sys.argv[1], sys.argv[2]

def names():
    with provhpc.open(run_dir) as run:
        return set(run.metrics()["name"].tolist())

deadline = time.time() + 10
while "warmup" not in names():  # flushed before the watch: the run is readable
    if time.time() > deadline:
        sys.exit("the flushed warm-up record is not readable")
    time.sleep(0.01)
print("ready", flush=True)
deadline = time.time() + 5
while time.time() < deadline:
    if name in names():
        print("seen", time.time(), flush=True)
        break
    time.sleep(0.01)
else:
    print("never", flush=True)
"""


def test_record_reaches_partition_within_flush_interval(tmp_path):
    """Contract 2: one record at time t, then silence (no further API call, no flush); a
    reader in another process finds it in the partition within the flush interval (0.2 s
    here; asserted with a generous 1 s margin for a loaded machine)."""
    interval = 0.2
    with capture(tmp_path, flush_interval=interval, telemetry_interval=0) as cap:
        provhpc.metric("warmup", 0.0)
        assert provhpc.flush()
        watcher = subprocess.Popen([sys.executable, "-c", WATCH, cap.run_dir, "lonely"],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert watcher.stdout.readline().strip() == "ready", watcher.communicate()
            t0 = time.time()
            provhpc.metric("lonely", 1.0, step=1)
            out, _ = watcher.communicate(timeout=15)  # still inside capture: no exit flush
        finally:
            watcher.kill()
            watcher.wait()
    word, *seen = out.split()
    assert word == "seen", "the record never became readable in the partition while the " \
        "program was silent"
    assert float(seen[0]) - t0 < interval + 1.0, float(seen[0]) - t0


def test_slow_disk_bounded_memory_counted_drops(tmp_path, monkeypatch):
    """Contract 1: a writer slower than the program; the segment never grows, calls stay
    bounded by the backpressure timeout, and each record is stored or counted as dropped."""
    real_append = PW.PartitionWriter.append

    def slow_append(self, recs):
        time.sleep(0.05)
        real_append(self, recs)

    monkeypatch.setattr(PW.PartitionWriter, "append", slow_append)
    n = 20000
    with capture(tmp_path, slots=2, slot_records=64, backpressure_timeout=0.02,
                 flush_interval=0.05) as cap:
        size = os.path.getsize(cap.agent.seg.path)
        worst = 0.0
        for i in range(n):
            t = time.perf_counter()
            provhpc.metric("x", float(i), step=i)
            worst = max(worst, time.perf_counter() - t)
        assert os.path.getsize(cap.agent.seg.path) == size  # fixed: memory bounded
    with Run(cap.run_dir) as run:
        s = summary(run)
        metrics = cap.records("metric")
        # only "x": the aggregator's telemetry samples are metrics too (named telemetry.*)
        steps = [int(r["step"]) for r, name in zip(metrics, cap.strings(metrics["name"]))
                 if name == "x"]
    dropped = s["dropped_by_reason"].get("backpressure", 0)
    assert dropped > 0, "the slow writer should have forced drops"
    assert len(steps) == len(set(steps))  # stored once each
    assert len(steps) + dropped == n  # every metric call stored or counted as dropped
    assert worst < 0.02 + 1.0, worst  # bounded by the configured timeout (generous margin)


def test_corrupt_partition_named_others_readable(tmp_path):
    """Contract 6: a corrupt partition gives an error naming the file."""
    with capture(tmp_path, node="good") as cap:
        provhpc.metric("m", 1.0)
    bad = os.path.join(cap.run_dir, "bad.h5")
    shutil.copy(cap.aggregator.path, bad)
    with open(bad, "r+b") as fh:
        fh.truncate(700)
    with Run(cap.run_dir) as run:
        assert [p.node for p in run.partitions] == ["good"]
        assert bad in run.errors and "bad.h5" in run.errors[bad]


def test_flush_waits_for_a_late_welcome(tmp_path):
    """``flush()`` while the aggregator has not welcomed this rank yet (it starts late)
    waits for the welcome, then for the acknowledgement, within its timeout: True, and
    the record is on disk.  It used to return False at once, so a rank that flushed and
    then died might not even have been heard of (its hello still unread)."""
    import secrets
    import threading

    from provhpc.capture.agent import Agent
    from provhpc.format import records as R
    from provhpc.format.segment import segment_name, shm_dir
    from provhpc.launch.config import load
    from provhpc.launch.identity import Identity
    from provhpc.node.aggregator import Aggregator

    run_id = "late-" + secrets.token_hex(3)
    cfg = load(out=str(tmp_path), run_id=run_id, runtime_dir=str(tmp_path), heartbeat=0.05,
               telemetry_interval=0, flush_interval=0.2)
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    endpoint = f"ipc://{rt}/sock"
    seg = os.path.join(shm_dir(), segment_name(run_id, "n0", 0, os.getpid()))
    agent = Agent(cfg, Identity(rank=0, node="n0", host="n0"), run_id, endpoint, seg)
    agg = Aggregator(cfg, run_id, "n0", str(tmp_path), endpoint, str(rt / "ready"),
                     expect=1, linger=5.0)
    threads: list = []
    timer = threading.Timer(0.5, lambda: threads.append(agg.start_thread()))
    try:
        assert agent.emit(R.METRIC, R.V_FLOAT, 0, 0, 0, time.time_ns(), "early", None, 0, 0,
                          1.0)
        timer.start()
        t0 = time.monotonic()
        assert agent.flush(20), "flush gave up before the aggregator's welcome"
        assert time.monotonic() - t0 >= 0.4, "flush returned before the aggregator started"
        assert agent.shutdown()
    finally:
        timer.join()
        if not threads:
            agent.shutdown()
        for t in threads:
            t.join(15)
    with provhpc.open(os.path.join(str(tmp_path), run_id)) as run:
        assert run.metrics()["name"].tolist() == ["early"]
