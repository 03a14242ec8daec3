"""Issue 13 point 5: a live run reads as live.

A real ``mpiexec -n 2`` job records, flushes and then keeps running with a task open.
Read from another process meanwhile, ``summary`` says its partition is being written (no
advice to ``recover``), the per-rank record counts are what is stored so far (not 0 until
the goodbye), and the open task is not a failure.  After the aggregator is SIGKILLed,
the same run is reported as not being written any more, with the exact ``recover``
command, and the open task is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import h5py
import pytest
from test_faults_lib import kill_tree, remove_segments

pytestmark = pytest.mark.timeout(150)

PROG = """
import os, sys, time, provhpc
rank = int(os.environ["PMI_RANK"])
with provhpc.task("train"):
    for i in range(300):
        provhpc.metric("loss", 1.0 / (i + 1), step=i)
    provhpc.flush(10)
    open(f"{sys.argv[1]}.{rank}", "w").close()
    time.sleep(90)
"""


def _cli(venv_bin, env, *args):
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), *args], env=env,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def test_a_running_job_reads_as_live_and_a_dead_one_does_not(venv_bin, clean_env, tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(PROG)
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), "PROVHPC_RUN_ID": "live",
           "PROVHPC_TELEMETRY_INTERVAL": "0", "PROVHPC_FLUSH_INTERVAL": "0.2"}
    marks = tmp_path / "flushed"
    proc = subprocess.Popen([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                             os.path.join(venv_bin, "provhpc"), "run", "--out",
                             str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
                             str(script), str(marks)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = str(tmp_path / "prov" / "live")
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{marks}.{r}") for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(2.5)  # one heartbeat of the aggregator (every 2 s) after the flush
        rc, out, err = _cli(venv_bin, env, "summary", run, "--json")
        assert rc == 0, err
        s = json.loads(out)
        (part,) = s["partitions"]
        assert part["live"] and not part["complete"], part
        assert s["status"] == "running" and not s["status_note"], s["status"]
        ranks = {r["rank"]: r for r in s["ranks"] if r["role"] == "rank"}
        assert [ranks[r]["status"] for r in (0, 1)] == ["running", "running"]
        for r in (0, 1):  # what is stored so far, not 0: 300 metrics and the rest
            assert ranks[r]["records"] == sum(ranks[r]["records_by_kind"].values()) >= 300
        rc, text, _ = _cli(venv_bin, env, "summary", run)
        assert "live: partition" in text and "recover" not in text, text
        rc, out, _ = _cli(venv_bin, env, "query", run, "failures", "--json")
        assert rc == 0 and json.loads(out) == []  # 'train' and the run: running, not failed

        with h5py.File(os.path.join(run, f"{part['node']}.h5"), "r", swmr=True) as f:
            agg = int(f.attrs["writer_pid"])
        os.kill(agg, signal.SIGKILL)
        time.sleep(0.5)
        rc, text, _ = _cli(venv_bin, env, "summary", run)
        assert "not marked complete and nothing wrote it for" in text, text
        assert f"run `provhpc recover {run}`" in text and "live:" not in text, text
        rc, out, _ = _cli(venv_bin, env, "query", run, "failures", "--json")
        # every open activity of the dead job, its run activities included, is a failure
        assert sorted(f["name"] for f in json.loads(out)) == ["prog.py", "prog.py", "train",
                                                              "train"]
        kill_tree(proc)
        deadline = time.monotonic() + 10  # until the killed ranks are reaped
        while True:
            rc, out, _ = _cli(venv_bin, env, "summary", run, "--json")
            s = json.loads(out)  # every process is gone: the run no longer reads as running
            if s["status"] != "running" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # the aggregator died first: nobody saw the ranks go, nobody wrote an end
        assert s["status"] == "lost" and "manifest says running" in s["status_note"], s
        assert s["end"]["state"] == "lost" and s["end"]["ranks"] == [0, 1], s["end"]
    finally:
        kill_tree(proc)
        remove_segments("live")
