"""A rank killed while it makes its segment leaves no file behind in /dev/shm.

``Segment.create`` opens the file, sizes it and then writes the header; a process killed
in between (here: a real process that does the first two steps and then gets a real
SIGKILL) leaves a file with no header, which holds no record.  The node's aggregator, and
``provhpc recover`` after it, remove such a file of a dead process instead of keeping it
forever as "not a provhpc segment"; a half-made file of a process that still runs is left
alone.  The aggregator records that rank as killed with no record, and does not wait
for it to come.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_faults_lib import check_rank0_ended_unseen, rank_agent, start_aggregator

from provhpc.format.segment import shm_dir

pytestmark = pytest.mark.timeout(120)

# Makes the segment file of its own pid as Segment.create does, up to the header, and
# dies there by a real SIGKILL once the test saw the file (or, with "live", waits to be
# killed).
MAKER = r"""
import os, signal, sys, time
from provhpc.format.segment import segment_name, shm_dir
run_id, node, rank, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
path = os.path.join(shm_dir(), segment_name(run_id, node, rank, os.getpid()))
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, 1 << 20)
print(path, flush=True)
sys.stdin.readline()  # the test saw the file
if mode == "live":
    time.sleep(60)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _half_made(run_id, node, rank, mode="die"):
    proc = subprocess.Popen([sys.executable, "-c", MAKER, run_id, node, str(rank), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    proc.stdout.close()
    assert os.path.exists(path)  # (its maker lives: nothing removes it yet)
    proc.stdin.write("\n")
    proc.stdin.close()
    if mode != "live":
        assert proc.wait(30) == -signal.SIGKILL
    return proc, path


def test_the_aggregator_removes_a_rank_killed_making_its_segment_and_ends(venv_bin, clean_env,
                                                                         tmp_path):
    from provhpc.format import records as R
    from provhpc.format.segment import segment_name

    run_id, node = "half-" + os.urandom(3).hex(), "n0"
    agg, endpoint = start_aggregator(venv_bin, clean_env, tmp_path, run_id, node, "--expect",
                                     "2", "--linger", "60")
    seg = os.path.join(shm_dir(), segment_name(run_id, node, 1, os.getpid()))
    dead = None
    try:
        agent = rank_agent(tmp_path, run_id, node, 1, endpoint)
        _proc, dead = _half_made(run_id, node, 0)
        deadline = time.monotonic() + 15
        while os.path.exists(dead):  # the orphan sweep of the running aggregator
            assert time.monotonic() < deadline, f"{dead} is still there"
            assert agg.poll() is None
            time.sleep(0.05)
        assert agent.emit(R.METRIC, R.V_FLOAT, 0, 0, 0, time.time_ns(), "loss", None, 0, 0, 0.5)
        assert agent.shutdown()
        assert agg.wait(15) == 0  # rank 0 counts as ended: not after --linger 60
        check_rank0_ended_unseen(tmp_path, run_id, int(dead.rsplit("-p", 1)[1]))
    finally:
        agg.kill()
        agg.wait()
        for path in (seg, dead):
            if path and os.path.exists(path):
                os.unlink(path)


def test_recover_removes_a_dead_makers_segment_and_keeps_a_live_ones(venv_bin, clean_env,
                                                                     tmp_path):
    run_id, node = "half-" + os.urandom(3).hex(), "n0"
    run = tmp_path / "prov" / run_id
    run.mkdir(parents=True)
    _dead_proc, dead = _half_made(run_id, node, 0)
    live_proc, live = _half_made(run_id, node, 1, "live")
    try:
        r = subprocess.run([os.path.join(venv_bin, "provhpc"), "recover", str(run), "--json"],
                           env=clean_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        segs = {s["path"]: s["action"] for s in json.loads(r.stdout)["segments"]}
        assert segs[dead] == "removed: its process died making it, before any record"
        assert not os.path.exists(dead)
        assert segs[live] == "skipped: process alive" and os.path.exists(live)
        from provhpc.node.recover import recover

        segs = {s["path"]: s["action"] for s in recover(str(run), force=True)["segments"]}
        assert segs[live].startswith("skipped: ") and os.path.exists(live), segs
    finally:
        live_proc.kill()
        live_proc.wait()
        for path in (dead, live):
            if os.path.exists(path):
                os.unlink(path)
