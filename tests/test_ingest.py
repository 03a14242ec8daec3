"""The aggregator's ingest path: batches gathered into one write, slots read in place and
cleared only as far as they were used, every record stored or counted when a write fails."""

from __future__ import annotations

import os

import h5py
import numpy as np

from provhpc.format import records as R
from provhpc.format import segment as S
from provhpc.launch import config
from provhpc.node.aggregator import Aggregator, Stream


def _segment(tmp_path, slot_records=8):
    return S.Segment.create(str(tmp_path / "seg"), 0, 1, slot_records, 64)


def _fill(seg, n, first_step=0):
    off = seg.layout.records_offset(0)
    recs = np.frombuffer(seg.mm, R.RECORD_DTYPE, count=n, offset=off)
    recs["kind"], recs["step"] = R.METRIC, np.arange(first_step, first_step + n)
    del recs


def test_zero_clears_the_records_the_slot_was_sealed_with(tmp_path):
    seg = _segment(tmp_path)
    try:
        _fill(seg, 5)
        seg.zero(0, 5)
        assert not seg.view(0, 8).tobytes().strip(b"\0")
        # a filling slot after the reuse reads exactly the new records (salvage)
        _fill(seg, 3, first_step=100)
        assert seg.committed(0)["step"].tolist() == [100, 101, 102]
        # sealed with fewer records than it holds: the whole slot is cleared
        _fill(seg, 6)
        seg.zero(0, 2)
        assert not seg.view(0, 8).tobytes().strip(b"\0")
        _fill(seg, 8)
        seg.zero(0, 8)
        assert not seg.view(0, 8).tobytes().strip(b"\0")
    finally:
        seg.close(unlink=True)


def _aggregator(tmp_path):
    cfg = config.load({}, runtime_dir=str(tmp_path))
    agg = Aggregator(cfg, "ingest", "n", str(tmp_path), "ipc://unused", str(tmp_path / "r"))
    os.makedirs(tmp_path / "ingest")
    agg._open_partition()
    return agg


def _batch(n, rank, first_step):
    recs = np.zeros(n, R.RECORD_DTYPE)
    recs["kind"], recs["step"], recs["rank"] = R.METRIC, np.arange(first_step, first_step + n), 99
    recs.flags.writeable = False  # as a slot in shared memory: never changed in place
    return recs


def test_a_burst_is_gathered_and_its_batch_notes_point_at_its_rows(tmp_path):
    agg = _aggregator(tmp_path)
    streams = [Stream(b"a", {"rank": 0, "pid": 11}, None, "inline"),
               Stream(b"b", {"rank": 1, "pid": 12}, None, "inline")]
    for seq in range(1, 4):
        for s in streams:
            agg._ingest(s, _batch(100, s.rank, 1000 * s.rank + 100 * seq), b"", 0, seq)
    agg._flush()
    agg.writer.close()
    with h5py.File(agg.path, "r") as f:
        recs, batches = f["records"][:], f["batches"][:]
        counters = dict(zip(f["counters"]["name"], f["counters"]["value"]))
    assert len(recs) == 600 and counters[b"records"] == 600 and counters[b"batches"] == 6
    for b in batches:
        rows = recs[int(b["start"]):int(b["start"]) + int(b["count"])]
        rank = int(b["rank"])
        assert (rows["rank"] == rank).all()  # the stream's rank, not the frame's 99
        assert rows["step"][0] == 1000 * rank + 100 * int(b["seq"])


def test_a_failed_write_counts_every_record_since_the_last_flush(tmp_path):
    agg = _aggregator(tmp_path)
    s = Stream(b"a", {"rank": 0, "pid": 11}, None, "inline")
    agg._ingest(s, _batch(100, 0, 0), b"", 0, 1)
    agg._flush()
    agg._ingest(s, _batch(100, 0, 100), b"", 0, 2)
    agg._ingest(s, _batch(100, 0, 200), b"", 0, 3)

    def failing(recs):
        raise OSError("no space left on device")

    agg.writer.append = failing  # the gathered write fails
    agg._flush()
    agg._ingest(s, _batch(100, 0, 300), b"", 0, 4)  # writing stopped: counted, not written
    del agg.writer.append
    agg.writer.close()
    assert s.records == 100 and s.write_drops == 300 and agg.stopped_writing
    with h5py.File(agg.path, "r") as f:
        assert f["records"].shape == (100,)
        assert f["records"]["step"].tolist() == list(range(100))


def test_remap_of_small_ids_matches_the_general_path():
    from provhpc.format.strings import StringMap

    m = StringMap()
    m.define(3, 30)
    m.define(7, 70)
    small = np.array([0, 3, 4, 7, 3], "<u4")  # all below the dense table: the fast path
    ids, unknown = m.remap(small)
    assert ids.tolist() == [0, 30, 0, 70, 30] and unknown == 1 and ids.dtype == np.dtype("<u4")
    wide = np.array([0, 3, 4, 7, 3, 2**32 - 1], "<u4")  # one id beyond it: the general path
    ids, unknown = m.remap(wide)
    assert ids.tolist() == [0, 30, 0, 70, 30, 0] and unknown == 2
    assert m.remap(np.zeros(0, "<u4"))[0].tolist() == []


def test_zero_of_an_empty_sealed_slot_clears_nothing_else(tmp_path):
    seg = _segment(tmp_path)
    try:
        seg.zero(0, 0)  # a slot sealed with only strings' heap, or nothing
        assert not seg.view(0, 8).tobytes().strip(b"\0")
    finally:
        seg.close(unlink=True)
