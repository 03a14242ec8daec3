"""Issue 12 point 7: nothing of a run stays behind on any path.

After a job under a real ``mpiexec -n 2`` that completes, fails (one rank raises, the job
is aborted) or is terminated (SIGTERM to the launcher), no segment of the run is left in
the shared-memory directory, and its runtime directory (ready files, sockets, claims) is
gone; the partition is complete.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_faults_lib import leftover_segments

from provhpc.post.reader import Run

pytestmark = pytest.mark.timeout(180)

PROG = """
import os, sys, time, provhpc
rank = int(os.environ["PMI_RANK"])
for i in range(200):
    provhpc.metric("m", float(i), step=i)
open(f"{sys.argv[1]}.{rank}", "w").close()
if sys.argv[2] == "fail" and rank == 1:
    raise RuntimeError("rank 1 fails")
if sys.argv[2] in ("terminate", "fail"):
    time.sleep(60)
"""


@pytest.mark.parametrize("end", ["complete", "fail", "terminate"])
def test_no_segment_socket_or_runtime_directory_is_left(venv_bin, clean_env, tmp_path, end):
    script = tmp_path / "prog.py"
    script.write_text(PROG)
    rt = tmp_path / "rt"
    run_id = f"cleanup-{end}"
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(rt), "PROVHPC_RUN_ID": run_id,
           "PROVHPC_TELEMETRY_INTERVAL": "0"}
    marks = tmp_path / "started"
    proc = subprocess.Popen([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                             os.path.join(venv_bin, "provhpc"), "run", "--out",
                             str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
                             str(script), str(marks), end], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if end == "terminate":
            deadline = time.monotonic() + 60
            while not all(os.path.exists(f"{marks}.{r}") for r in (0, 1)):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode == 0) == (end == "complete"), out
    base = rt / f"provhpc-{os.getuid()}"
    deadline = time.monotonic() + 20  # an aborted job's aggregator ends on its own
    while ((base / run_id).exists() or leftover_segments(run_id)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_segments(run_id) == [], out
    assert not (base / run_id).exists(), sorted(str(p) for p in (base / run_id).rglob("*"))
    assert not list(base.glob("*.sock")), "a socket was left"
    with Run(str(tmp_path / "prov" / run_id)) as run:
        assert [p.complete for p in run.partitions] == [True]
        status = sorted(r["status"] for r in run.ranks() if r["role"] == "rank")
        assert status == {"complete": ["ok", "ok"], "fail": ["error", "killed"],
                          "terminate": ["terminated", "terminated"]}[end], status
