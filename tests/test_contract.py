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


WATCH = """
import sys, time
from provhpc.format.partition import open_partition
path, deadline = sys.argv[1], time.time() + 10
while time.time() < deadline:
    try:
        with open_partition(path) as f:
            if f["records"].shape[0] >= 1:
                print(time.time())
                break
    except OSError:
        pass
    time.sleep(0.01)
"""


def test_record_reaches_partition_within_flush_interval(tmp_path):
    """Contract 2: one record, then silence; a reader in another process sees it within
    the flush interval (0.2 s here; asserted with a generous 1 s margin)."""
    with capture(tmp_path, flush_interval=0.2) as cap:
        provhpc.metric("warmup", 0.0)
        provhpc.flush()
        watcher = subprocess.Popen([sys.executable, "-c", WATCH, cap.aggregator.path],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        n0 = cap.aggregator.writer._n
        t0 = time.time()
        provhpc.metric("lonely", 1.0, step=1)
        while cap.aggregator.writer._n == n0 and time.time() - t0 < 5:
            time.sleep(0.005)
        seen_in_file = time.time() - t0
        out, _ = watcher.communicate(timeout=15)
    assert out.strip(), "the reader never saw a record"
    assert seen_in_file < 0.2 + 1.0, seen_in_file


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
