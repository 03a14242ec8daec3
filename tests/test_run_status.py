"""A run whose rank 0 said goodbye but has not yet written the manifest's end is still
running (it waits for its aggregator first); it reads from its ranks only once rank 0's
process is gone, and a later process given rank 0's pid does not keep it running.  Seen
from another host, rank 0 is finishing for ``LIVE_WINDOW_S`` after its goodbye."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import h5py

import provhpc
from provhpc.post.reader import LIVE_WINDOW_S, Run
from provhpc.testing import capture


def _set_rank0(run_dir: str, **fields) -> None:
    (path,) = [os.path.join(run_dir, f) for f in os.listdir(run_dir) if f.endswith(".h5")]
    with h5py.File(path, "r+") as f:
        table = f["ranks"][:]
        for k, v in fields.items():
            table[0][k] = v.encode() if isinstance(v, str) else v
        f["ranks"][:] = table


def _manifest(run_dir: str, status: str) -> None:
    with open(os.path.join(run_dir, "manifest.json"), "w") as fh:
        json.dump({"run_id": os.path.basename(run_dir), "status": status}, fh)


def _status(run_dir: str) -> tuple[str, str]:
    with Run(run_dir) as run:
        return run.status, run.end()["state"]


def test_rank0_between_its_goodbye_and_the_manifest_end_reads_running(tmp_path):
    with capture(tmp_path) as cap:
        provhpc.metric("loss", 1.0, step=0)
    run_dir = cap.run_dir
    (r0,) = cap.run.ranks()
    assert (r0["rank"], r0["pid"], r0["status"]) == (0, os.getpid(), "ok")
    cap.close()

    _manifest(run_dir, "running")  # rank 0 (this process, alive) has not written the end
    assert _status(run_dir) == ("running", "running")

    _manifest(run_dir, "ok")  # it has: the manifest's word
    assert _status(run_dir) == ("ok", "completed")

    _manifest(run_dir, "running")  # rank 0 died before it wrote the end
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _set_rank0(run_dir, pid=gone.pid)
    assert _status(run_dir) == ("ended", "completed")

    # rank 0's pid now belongs to a process that started after rank 0 did: not rank 0
    _set_rank0(run_dir, pid=os.getpid(), start=time.time_ns() - 10**9 * 3600 * 24 * 365 * 30)
    assert _status(run_dir) == ("ended", "completed")


def test_rank0_on_another_host_is_finishing_for_the_live_window(tmp_path):
    with capture(tmp_path) as cap:
        provhpc.metric("loss", 1.0, step=0)
    run_dir = cap.run_dir
    cap.close()
    _manifest(run_dir, "running")
    _set_rank0(run_dir, host="another-host", end=time.time_ns())
    assert _status(run_dir) == ("running", "running")
    _set_rank0(run_dir, end=time.time_ns() - int((LIVE_WINDOW_S + 1) * 1e9))
    assert _status(run_dir) == ("ended", "completed")
