"""Issue 14 point 2 (part): how every job ended, read by summary, ls and watch.

Real ``mpiexec -n 2`` jobs, real signals: one that completes, one whose rank 1 raises
(failed: rank, exit code, exception, message, the last frame of the traceback), one whose
rank 1 SIGKILLs itself (killed: rank 1 first, as the aggregator saw it), one killed
whole, aggregator included (lost), a rank that gets SIGTERM twice, the second during
its shutdown (terminated: it said goodbye), and SIGTERM or SIGINT to the wrapper of a
command or a Python program (terminated).  None of them reads as ``running`` afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import h5py
import pytest
from test_faults_lib import (
    check_rank0_ended_unseen,
    kill_tree,
    rank_agent,
    remove_segments,
    start_aggregator,
)

pytestmark = pytest.mark.timeout(150)

PROG = """
import os, signal, sys, time, provhpc
rank = int(os.environ["PMI_RANK"])
how = sys.argv[1]

def train():
    with provhpc.stage("train"):
        for i in range(20):
            provhpc.metric("loss", 1.0 / (i + 1), step=i)
        provhpc.flush(10)
        if rank == 1 and how == "failed":
            raise ValueError("bad batch at step 19")
        if rank == 1 and how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "lost":
            open(sys.argv[2] + f".{rank}", "w").close()
            time.sleep(60)
        if how == "killed":
            time.sleep(5)
        if how == "terminated":
            # A time limit signals twice within milliseconds (slurmstepd, then srun's
            # "forcing job termination"): the second SIGTERM lands in the shutdown.
            from provhpc.launch.session import on_shutdown
            on_shutdown(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

train()
"""


def _job(venv_bin, env, tmp_path, how, wait=True, ranks=2):
    script = tmp_path / "prog.py"
    script.write_text(PROG)
    env = {**env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), "PROVHPC_RUN_ID": how,
           "PROVHPC_FLUSH_INTERVAL": "0.2"}
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", str(ranks), os.path.join(venv_bin, "provhpc"),
           "run", "-o", str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
           str(script), how, str(tmp_path / "mark")]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if wait:
        proc.wait(90)
    return proc, str(tmp_path / "prov" / how)


def _summary(venv_bin, env, run):
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), "summary", run, "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout)


def _settled(venv_bin, env, run):
    """The summary once the job's processes are gone (their aggregator writes the last
    rank statuses when it closes)."""
    deadline = time.monotonic() + 20
    while True:
        s = _summary(venv_bin, env, run)
        if s["status"] != "running" or time.monotonic() > deadline:
            return s
        time.sleep(0.3)


@pytest.mark.parametrize("how", ["completed", "failed", "killed"])
def test_how_a_job_ended(venv_bin, clean_env, tmp_path, how):
    proc, run = _job(venv_bin, clean_env, tmp_path, how)
    try:
        assert (proc.returncode == 0) == (how == "completed")
        s = _settled(venv_bin, clean_env, run)
        end = s["end"]
        assert end["state"] == how, end
        if how == "failed":
            assert (end["rank"], end["exception"]) == (1, "ValueError") and end["exit_code"]
            assert end["message"] == "bad batch at step 19"
            line = PROG.split("\n").index('            raise ValueError("bad batch at step 19")')
            assert end["where"].endswith(f"prog.py:{line + 1} in train"), end["where"]
        if how == "killed":  # rank 1 died; the launcher then took rank 0 down: either the
            # aggregator saw rank 1 go first, or it found both gone in one check
            assert set(end["ranks"]) == {0, 1} and end["first"] in (1, None), end
        text = subprocess.run([os.path.join(venv_bin, "provhpc"), "summary", run],
                              env=clean_env, capture_output=True, text=True).stdout
        assert f"ended {how}" in text, text
        ls = subprocess.run([os.path.join(venv_bin, "provhpc"), "ls", str(tmp_path / "prov"),
                             "--json"], env=clean_env, capture_output=True, text=True).stdout
        assert json.loads(ls)[0]["end"] == how
        snap = subprocess.run([os.path.join(venv_bin, "provhpc"), "watch", run, "--once",
                               "--json"], env=clean_env, capture_output=True, text=True).stdout
        assert json.loads(snap)["end"]["state"] == how
    finally:
        kill_tree(proc)
        remove_segments(how)


def test_a_job_killed_whole_is_lost(venv_bin, clean_env, tmp_path):
    proc, run = _job(venv_bin, clean_env, tmp_path, "lost", wait=False)
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(tmp_path / f"mark.{r}") for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        s = _summary(venv_bin, clean_env, run)
        assert s["status"] == "running"
        (part,) = s["partitions"]
        with h5py.File(os.path.join(run, f"{part['node']}.h5"), "r", swmr=True) as f:
            agg = int(f.attrs["writer_pid"])
        os.kill(agg, signal.SIGKILL)  # every process of the job, its aggregator first
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        s = _settled(venv_bin, clean_env, run)
        assert s["status"] == "lost" and s["end"]["state"] == "lost", (s["status"], s["end"])
        rec = subprocess.run([os.path.join(venv_bin, "provhpc"), "recover", run],
                             env=clean_env, capture_output=True, text=True, timeout=60)
        assert rec.returncode == 0, rec.stderr
        assert rec.stdout.startswith(f"recover {run}: ended lost"), rec.stdout
        # after recover (segments salvaged, partition complete) the run is still lost
        assert _settled(venv_bin, clean_env, run)["end"]["state"] == "lost"
        # and its manifest says so: it no longer reads running to anyone
        with open(os.path.join(run, "manifest.json")) as fh:
            m = json.load(fh)
        assert m["status"] == "lost" and m["ended"]["state"] == "lost", m
    finally:
        kill_tree(proc)
        remove_segments("lost")


def test_a_second_sigterm_during_the_shutdown_is_ignored(venv_bin, clean_env, tmp_path):
    """A time limit signals twice within milliseconds (slurmstepd, then srun's "forcing job
    termination"): the second SIGTERM lands in the rank's shutdown, which must still end
    with its goodbye.  One rank: with two, the launcher kills the slower rank as soon as
    the first exits 143, which is the launcher's doing, not this property."""
    proc, run = _job(venv_bin, clean_env, tmp_path, "terminated", ranks=1)
    try:
        assert proc.returncode == 143
        s = _settled(venv_bin, clean_env, run)
        assert s["end"]["state"] == "terminated" and s["end"]["ranks"] == [0], s["end"]
        assert [r["status"] for r in s["ranks"]] == ["terminated"], s["ranks"]  # not killed
    finally:
        kill_tree(proc)
        remove_segments("terminated")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("what", ["command", "python"])
def test_a_signal_to_the_wrapper_ends_the_run_terminated(venv_bin, clean_env, tmp_path, sig,
                                                         what):
    """SIGTERM or SIGINT to ``provhpc run`` (as a launcher passes it on): a command of its
    own (a shell here) gets it forwarded, a Python program unwinds; either way the run
    ends ``terminated`` with the shell's exit code 128 + N, not ``error`` or ``ok``."""
    mark = tmp_path / "started"
    if what == "command":
        cmd = ["sh", "-c", f"touch {mark}; exec sleep 60"]
    else:
        cmd = [os.path.join(venv_bin, "python"), "-c",
               f"import time; open({str(mark)!r}, 'w').close(); time.sleep(60)"]
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), "PROVHPC_RUN_ID": what}
    proc = subprocess.Popen([os.path.join(venv_bin, "provhpc"), "run", "-o",
                             str(tmp_path / "prov"), "--", *cmd], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)  # the Python program is in its sleep
        proc.send_signal(sig)  # to the wrapper only, not its process group
        assert proc.wait(30) == 128 + sig
        s = _settled(venv_bin, clean_env, str(tmp_path / "prov" / what))
        assert s["status"] == "terminated" and s["end"]["state"] == "terminated", s["end"]
        (rank,) = [r for r in s["ranks"] if r["role"] == "rank"]
        assert (rank["status"], rank["exit_code"]) == ("terminated", 128 + sig), rank
    finally:
        kill_tree(proc)
        remove_segments(what)


def test_a_leader_killed_before_its_hello_completes_the_partition_now(venv_bin, clean_env,
                                                                       tmp_path):
    """The rank that starts a node's aggregator can be killed before its own hello (the
    launcher takes the job down while that rank still starts).  The aggregator, which
    watches that rank's pid, records it as killed and completes the partition at once,
    instead of waiting ``--linger`` seconds for a rank that cannot come (the run read
    ``running`` meanwhile).  The leader here is a real process, killed by a real SIGKILL;
    the other rank is a real agent that says hello, writes and says goodbye."""
    from provhpc.format import records as R

    run_id, node = "leader-" + os.urandom(3).hex(), "n0"
    (tmp_path / "rt").mkdir(mode=0o700)
    leader = subprocess.Popen(["sleep", "60"])
    meta = tmp_path / "rt" / "meta.json"
    meta.write_text(json.dumps({"_leader": {"rank": 0, "local_rank": 0, "pid": leader.pid}}))
    agg, endpoint = start_aggregator(venv_bin, clean_env, tmp_path, run_id, node, "--expect",
                                     "2", "--linger", "60", "--meta-file", str(meta))
    try:
        agent = rank_agent(tmp_path, run_id, node, 1, endpoint)
        assert agent.emit(R.METRIC, R.V_FLOAT, 0, 0, 0, time.time_ns(), "loss", None, 0, 0, 0.5)
        assert agent.shutdown()  # rank 1 said goodbye: 1 of the 2 expected ranks closed
        time.sleep(0.5)
        assert agg.poll() is None, "the aggregator ended while its leader lived"
        leader.kill()  # a real SIGKILL, before any hello of the leader
        leader.wait()
        t0 = time.monotonic()
        assert agg.wait(15) == 0  # not after --linger 60
        took = time.monotonic() - t0
        check_rank0_ended_unseen(tmp_path, run_id, leader.pid)
        assert took < 10, took
    finally:
        leader.kill()
        agg.kill()
        agg.wait()
