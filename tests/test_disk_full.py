"""A full output file system (issue 12, point 1), on a real tmpfs, at full speed.

Every record a rank emitted is either in the partition (once, with no row of
zeros and no hole) or counted as an ``aggregator_write`` drop of that rank;
the partition is closed and complete; one line on stderr says so; ``recover``
keeps no row it cannot validate.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import h5py
import numpy as np
import pytest
from test_faults_lib import (
    job_env,
    kill_tree,
    metric_steps,
    output,
    partitions_complete,
    remove_segments,
    run_dir,
    wait_for,
)

from provhpc.format import records as R
from provhpc.format.partition import PartitionWriter, open_partition
from provhpc.node.recover import recover
from provhpc.post.reader import Run, summary

pytestmark = pytest.mark.timeout(180)

# Unpaced: each rank calls metric() as fast as it can.  With FILL set, rank 0
# fills the file system itself a third of the way through (another user's job
# writing to the same scratch), so the aggregator's space check sees it late.
PROGRAM = r'''
import os, sys
import provhpc

n, fill = int(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("PMI_RANK", "0"))
with provhpc.task("train"):
    for i in range(n):
        provhpc.metric("x", float(i), step=i)
        if fill != "-" and rank == 0 and i == n // 3:
            try:  # the close at the end of the with flushes again, and fails too
                with open(fill, "wb") as fh:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
            except OSError:
                pass
'''

LINE = "records of this node are no longer stored"


@contextlib.contextmanager
def _tmpfs(path, size: str):
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run(venv_bin, tmp_path, out, n, fill="-"):
    prog = tmp_path / "emit_fast.py"
    prog.write_text(PROGRAM)
    env = job_env({k: v for k, v in os.environ.items()
                   if not k.startswith(("PMI", "PMIX", "OMPI_", "HYDRA", "MPI_LOCAL",
                                        "PROVHPC_", "SLURM_"))}, tmp_path)
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", "2", os.path.join(venv_bin, "provhpc"),
           "run", "--out", str(out), "--", os.path.join(venv_bin, "python"), str(prog), str(n),
           fill]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(120) == 0, output(proc)
        text = output(proc)
        rdir = run_dir(str(out))
        wait_for(lambda: partitions_complete(rdir), 30, "the partition to close")
    finally:
        kill_tree(proc)
    return rdir, text


def _per_rank(rdir):
    with Run(rdir) as run:
        rows = {r["rank"]: r for r in run.ranks()}
        drops = {}
        for d in run.drops():
            drops.setdefault(d["rank"], {})[d["reason"]] = d["count"]
        s = summary(run)
    return rows, drops, s


def _figures(**fig):
    path = os.environ.get("PROVHPC_FAULT_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(fig) + "\n")


@pytest.mark.parametrize("fill", [False, True], ids=["own-writes", "filled-by-another"])
def test_disk_full_every_record_stored_or_counted(fill, tmp_path, venv_bin):
    n = 200_000
    # what each rank emits: the same program on a roomy disk stores everything
    big, _ = _run(venv_bin, tmp_path / "c", _mk(tmp_path / "c" / "out"), n)
    rows, drops, _s = _per_rank(big)
    emitted = {r: int(row["records"]) for r, row in rows.items()}
    assert all(not d for d in drops.values()) and sorted(emitted) == [0, 1]
    assert all(e == int(rows[r]["reported"]) for r, e in emitted.items())

    size = "64m" if fill else "6m"
    with _tmpfs(tmp_path / "full", size) as out:
        fill_path = str(out / "filler") if fill else "-"
        rdir, text = _run(venv_bin, tmp_path, out, n, fill_path)
        rows, drops, s = _per_rank(rdir)
        paths = [os.path.join(rdir, p) for p in os.listdir(rdir) if p.endswith(".h5")]
        assert len(paths) == 1
        with open_partition(paths[0]) as f:
            recs = f["records"][:]
            assert bool(f.attrs["complete"])
        # no row of zeros, no record of an unknown kind
        assert (recs["kind"] != 0).all() and np.isin(recs["kind"], list(R.KIND_NAMES)).all()
        steps = metric_steps(rdir)
        for r in (0, 1):
            stored, lost = int(rows[r]["records"]), drops.get(r, {}).get("aggregator_write", 0)
            held = int((recs["rank"] == r).sum())
            assert held == stored, (r, held, stored)
            assert stored + lost == emitted[r] == int(rows[r]["reported"]), (r, stored, lost)
            assert set(drops.get(r, {})) <= {"aggregator_write"}
            assert int(rows[r]["dropped"]) == lost
            assert rows[r]["status"] == "ok"
            # what was stored is a prefix of the rank's calls: no hole
            got = steps.get(r, np.zeros(0, int))
            assert list(got) == list(range(len(got)))
        total_lost = sum(d.get("aggregator_write", 0) for d in drops.values())
        assert total_lost > 0 and s["records_total"] > 0
        assert s["dropped_by_reason"] == {"aggregator_write": total_lost}
        assert s["status"] == "ok"
        # one line on the job's stderr, naming the partition
        lines = [ln for ln in text.splitlines() if LINE in ln]
        assert len(lines) == 1, text
        assert paths[0] in lines[0]
        assert not [p for p in os.listdir(rdir) if p.endswith((".tmp", ".reserve"))]
        # recover has nothing to add or remove
        rep = recover(rdir)
        assert [p["action"] for p in rep["partitions"]] == ["ok"]
        _figures(test="disk_full", fill=fill, tmpfs=size, emitted=emitted,
                 stored={r: int(rows[r]["records"]) for r in rows},
                 dropped={r: drops.get(r, {}).get("aggregator_write", 0) for r in rows},
                 lost=0)
        remove_segments(os.path.basename(rdir))


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_writer_rollback_returns_to_the_last_flush(tmp_path):
    """A failed flush is undone: records, strings and batch notes after the mark go."""
    w = PartitionWriter(str(tmp_path / "p.h5"), {"run_id": "r", "node": "n"})
    recs = np.zeros(100, R.RECORD_DTYPE)
    recs["kind"], recs["id"] = R.METRIC, np.arange(100)
    a = w.intern(b"kept")
    w.append(recs)
    w.note_batch(0, 1, 1, 0, 100)
    w.flush()
    mark = w.mark()
    b = w.intern(b"gone")
    w.append(recs)
    w.note_batch(0, 1, 2, 100, 100)
    w.rollback(mark)
    assert (w.records.shape[0], w.batches.shape[0], w.strings.shape[0]) == (100, 1, a + 1)
    assert w.intern(b"gone") == b  # the id is given again, to the next string
    w.close()
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f["records"].shape == (100,) and list(f["batches"]["seq"]) == [1]
        assert dict(zip(f["counters"]["name"], f["counters"]["value"]))[b"records"] == 100


def test_recover_keeps_no_row_it_cannot_validate(tmp_path):
    """A partition whose extent grew past what reached the disk (rows of zeros between
    and after real ones): recover removes exactly those rows and keeps the batch table
    pointing at the right rows."""
    rdir = tmp_path / "run1"
    rdir.mkdir()
    path = str(rdir / "n.h5")
    w = PartitionWriter(path, {"run_id": "run1", "node": "n", "writer_pid": 0})
    sid = w.intern(b"x")
    w.upsert_rank((0, 7), {"rank": 0, "pid": 7, "role": "rank", "status": "ok"})
    for seq, lo in enumerate((0, 1000), 1):
        recs = np.zeros(500, R.RECORD_DTYPE)
        recs["kind"], recs["name"], recs["step"] = R.METRIC, sid, np.arange(lo, lo + 500)
        start = w.records.shape[0]
        w.records.resize((start + 500,))
        w.records[start:] = recs
        w.note_batch(0, 7, seq, start, 500)
        w.records.resize((start + 1000,))  # 500 rows the writer never wrote
    w._n = w.records.shape[0]
    w.flush()
    w.f.close()  # not closed by the writer: incomplete, as a killed aggregator leaves it
    rep = recover(str(rdir))
    (entry,) = rep["partitions"]
    assert entry["action"] == "rebuilt" and entry["invalid_rows_removed"] == 1000
    with open_partition(path) as f:
        recs = f["records"][:]
        batches = f["batches"][:]
        assert bool(f.attrs["complete"])
    assert len(recs) == 1000 and (recs["kind"] == R.METRIC).all()
    assert sorted(recs["step"]) == list(range(500)) + list(range(1000, 1500))
    for b in batches:
        rows = recs[int(b["start"]):int(b["start"]) + int(b["count"])]
        assert len(rows) == 500 and rows["step"][0] == (0 if b["seq"] == 1 else 1000)
