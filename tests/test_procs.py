"""format.procs.pid_alive: a pid is the process a run recorded only if the live process
with that pid started by the time it was seen (pids are reused: pid_max is 32768 here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from provhpc.format.procs import pid_alive, writer_alive


def test_a_live_process_seen_after_it_started_is_alive():
    assert pid_alive(os.getpid())
    assert pid_alive(os.getpid(), time.time_ns())


def test_a_pid_seen_before_its_process_started_names_another_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        before = time.time_ns() - 60 * 10**9  # the pid's earlier owner was seen a minute ago
        time.sleep(0.2)
        assert pid_alive(child.pid)  # by pid alone: "alive"
        assert pid_alive(child.pid, time.time_ns())
        assert not pid_alive(child.pid, before)  # this process is not the one seen then
    finally:
        child.kill()
        child.wait()


def test_dead_and_zombie_processes_are_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while True:  # exited, not yet reaped: a zombie
        with open(f"/proc/{child.pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)


def test_a_writer_is_alive_only_while_the_process_that_wrote_its_file_lives(tmp_path):
    path = tmp_path / "ready"
    path.write_text(json.dumps({"pid": os.getpid()}))
    assert writer_alive(str(path)) == os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        path.write_text(json.dumps({"pid": child.pid}))
        assert writer_alive(str(path)) == child.pid
        old = time.time_ns() - 60 * 10**9  # written a minute ago: by an earlier owner of the pid
        os.utime(path, ns=(old, old))
        assert writer_alive(str(path)) == 0
    finally:
        child.kill()
        child.wait()
    path.write_text(json.dumps({"pid": child.pid}))  # that process is gone
    assert writer_alive(str(path)) == 0
    for text in ("", "{}", '{"pid": "x"}', '{"pid": 0}', '{"pid": -1}', "[1]"):
        path.write_text(text)
        assert writer_alive(str(path)) == 0, text
    assert writer_alive(str(tmp_path / "missing")) == 0
