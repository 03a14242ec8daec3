"""How a SLURM job ended, told by SLURM: scancel, a time limit, a requeue (two attempts).

Run by tests/slurm.sh against jobs/local-slurm.sh, whose Epilog is jobs/slurm-epilog.sh.
Each test submits a real batch job whose two ranks run under ``srun provhpc run``, ends
it the way the test names (``scancel``, ``--time=1``, ``scontrol requeue``), and reads
the end from ``provhpc summary`` / ``ls`` and the manifest the epilog wrote.
"""

import glob
import json
import os
import textwrap

import pytest

from .conftest import BIN, run
from .conftest import wait as _wait

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                       reason="SLURM_CONF unset: SLURM tests run through tests/slurm.sh"),
]

PROVHPC = os.path.join(BIN, "provhpc")

# Attempt 0 writes a checkpoint, then trains until it is stopped; a later attempt (a
# requeue: SLURM_RESTART_COUNT > 0) reads the checkpoint and writes the model.
PROGRAM = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import provhpc
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    provhpc.hyperparameters(lr=0.1, attempt=attempt)
    ckpt = "ckpt.npy"
    if attempt == 0 or not os.path.exists(ckpt):
        with provhpc.stage("train"):
            if rank == 0:
                with provhpc.task("save") as t:
                    np.save(ckpt, np.arange(4.0))
                    t.generated(provhpc.data(ckpt, kind="checkpoint"))
            for epoch in range(100000):
                with provhpc.epoch(epoch):
                    provhpc.metric("loss", 1.0 / (epoch + 1))
                    time.sleep(0.2)
    else:
        with provhpc.stage("finish"):
            if rank == 0:
                with provhpc.task("resume") as t:
                    t.used(provhpc.data(ckpt, kind="checkpoint"))
                    np.save("model.npy", np.load(ckpt) * 2)
                    t.generated(provhpc.data("model.npy", kind="model"))
    MPI.COMM_WORLD.Barrier()
""")


def _job_script(jobdir, extra="") -> str:
    path = jobdir / "job.sh"
    # A requeued attempt's first step would be step 0 again, whose MPICH shared-memory
    # file (/dev/shm/mpich_shm_*, named after the job and step) the SIGTERMed ranks of
    # the attempt before left behind: MPI_Init then hangs.  Without provhpc too; a
    # throw-away step first gives the training another step id.
    path.write_text("#!/bin/bash\n" + extra + '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && '
                    "srun -n 1 true\n" + f"srun --mpi=pmi2 -n 2 {PROVHPC} run -- "
                    f"{os.path.join(BIN, 'python')} {jobdir / 'train.py'}\n")
    (jobdir / "train.py").write_text(PROGRAM)
    return str(path)


def _submit(env, jobdir, *opts) -> str:
    p = run(["sbatch", "--parsable", "-n", "2", f"--chdir={jobdir}",
             f"--output={jobdir}/job-%j.out", *opts, _job_script(jobdir)], env, str(jobdir))
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _state(env, jobdir, job) -> str:
    p = run(["squeue", "-h", "-o", "%T", "-j", job], env, str(jobdir))
    return p.stdout.strip()


def _runs(jobdir) -> list[str]:
    return sorted(d for d in glob.glob(str(jobdir / "provenance" / "*"))
                  if os.path.isdir(d) and not os.path.islink(d))


def _started(jobdir, n_runs=1) -> bool:
    """n_runs runs of the job exist and the latest has both ranks' records flowing."""
    runs = _runs(jobdir)
    if len(runs) < n_runs:
        return False
    p = run([PROVHPC, "watch", "--once", "--json", runs[-1]], os.environ, str(jobdir))
    if p.returncode != 0:
        return False
    snap = json.loads(p.stdout)
    return len(snap["ranks"]) == 2 and all(r["epoch"] is not None for r in snap["ranks"])


def _manifest(run_dir) -> dict:
    with open(os.path.join(run_dir, "manifest.json")) as fh:
        return json.load(fh)


def _summary(run_dir, env) -> dict:
    p = run([PROVHPC, "summary", "--json", run_dir], env, os.path.dirname(run_dir))
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def _logs(jobdir) -> str:
    text = ""
    for f in sorted(glob.glob(str(jobdir / "job-*.out"))):
        with open(f) as fh:
            text += fh.read()
    return text


def _gone(env, jobdir, job, timeout=90) -> bool:
    return _wait(lambda: _state(env, jobdir, job) == "", timeout)


def test_scancel_is_terminated_and_cancelled(slurm_env, jobdir):
    job = _submit(slurm_env, jobdir)
    try:
        assert _wait(lambda: _started(jobdir), 90), _logs(jobdir)[-3000:]
        assert run(["scancel", job], slurm_env, str(jobdir)).returncode == 0
        assert _gone(slurm_env, jobdir, job), "the job did not end within 90 s of scancel"
    finally:
        run(["scancel", job], slurm_env, str(jobdir))
    (run_dir,) = _runs(jobdir)
    # the epilog wrote the end while SLURM still read COMPLETING: scancel is not known then
    m = _manifest(run_dir)
    assert m["ended"]["state"] == "terminated", m.get("ended")
    assert m["status"] == "terminated"
    # SLURM tells once the job is gone: summary asks it
    end = _summary(run_dir, slurm_env)["end"]
    assert end["state"] == "terminated" and sorted(end["ranks"]) == [0, 1], end
    assert end["cause"] == "cancelled", end
    assert end["scheduler"]["final"] is True and end["scheduler"]["state"] == "cancelled"
    p = run([PROVHPC, "summary", run_dir], slurm_env, str(jobdir))
    assert "ended terminated" in p.stdout and "SLURM says cancelled" in p.stdout, p.stdout


@pytest.mark.timeout(400)
def test_time_limit_is_terminated_by_timeout(slurm_env, jobdir):
    """SLURM counts time limits in minutes and checks them every 30 s: ~1.5 min."""
    job = _submit(slurm_env, jobdir, "--time=1")
    try:
        assert _wait(lambda: _started(jobdir), 90), _logs(jobdir)[-3000:]
        assert _gone(slurm_env, jobdir, job, timeout=240), "the job outlived its time limit"
    finally:
        run(["scancel", job], slurm_env, str(jobdir))
    (run_dir,) = _runs(jobdir)
    assert "DUE TO TIME LIMIT" in _logs(jobdir)
    m = _manifest(run_dir)  # known while the job completed: Reason=TimeLimit
    assert m["ended"]["state"] == "terminated" and m["ended"]["cause"] == "timeout", m["ended"]
    # srun's "forcing job termination" signals again within milliseconds: every rank still
    # said its own goodbye (none salvaged as killed)
    assert sorted(m["ended"]["ranks"]) == [0, 1], m["ended"]
    assert m["scheduler"]["verdict"] == "timeout"
    end = _summary(run_dir, slurm_env)["end"]
    assert end["state"] == "terminated" and end["cause"] == "timeout", end
    p = run([PROVHPC, "ls", str(jobdir / "provenance")], slurm_env, str(jobdir))
    assert "terminated (timeout)" in p.stdout, p.stdout


@pytest.mark.timeout(400)
def test_requeue_gives_two_linked_attempts(slurm_env, jobdir):
    job = _submit(slurm_env, jobdir, "--requeue")
    try:
        assert _wait(lambda: _started(jobdir), 90), _logs(jobdir)[-3000:]
        assert os.path.exists(jobdir / "ckpt.npy")
        p = run(["scontrol", "requeue", job], slurm_env, str(jobdir))
        assert p.returncode == 0, p.stderr
        # SLURM holds a requeued job back for two minutes (its BeginTime): start it now
        assert _wait(lambda: _state(slurm_env, jobdir, job) == "PENDING", 60)
        p = run(["scontrol", "update", f"job={job}", "StartTime=now"], slurm_env, str(jobdir))
        assert p.returncode == 0, p.stderr
        assert _wait(lambda: len(_runs(jobdir)) == 2, 90), _logs(jobdir)[-3000:]
        assert _gone(slurm_env, jobdir, job, timeout=120), _logs(jobdir)[-3000:]
    finally:
        run(["scancel", job], slurm_env, str(jobdir))
    first, second = sorted(_runs(jobdir), key=lambda d: _manifest(d)["start"])
    m1, m2 = _manifest(first), _manifest(second)
    assert m1["meta"]["restart_count"] == 0 and m2["meta"]["restart_count"] == 1
    assert m2["previous_attempt"] == os.path.basename(first)
    assert str(m1["meta"]["job_id"]) == str(m2["meta"]["job_id"]) == job
    # attempt 0 was stopped by the requeue, attempt 1 completed
    e1, e2 = _summary(first, slurm_env)["end"], _summary(second, slurm_env)["end"]
    assert e1["state"] == "terminated" and e1["cause"] == "requeued", e1
    assert e2["state"] == "completed", e2
    # the checkpoint attempt 0 wrote is in the lineage of attempt 1's model, and the
    # attempts' run activities are linked
    p = run([PROVHPC, "lineage", "--json", second, "model.npy"], slurm_env, str(jobdir))
    assert p.returncode == 0, p.stdout + p.stderr
    lin = json.loads(p.stdout)
    names = {(n.get("run"), n.get("name"), n.get("type")) for n in lin["nodes"]}
    first_id = os.path.basename(first)
    assert any(r == first_id and t == "activity" and n == "save" for r, n, t in names), names
    from provhpc.post.lineage import graph
    from provhpc.post.reader import Run

    with Run(second) as r2:
        g = graph(r2)
        nodes, edges = g.nodes.to_dicts(), g.edges.to_dicts()
    informed = {(nodes[e["src"]]["run"], nodes[e["src"]]["rank"], nodes[e["dst"]]["run"],
                 nodes[e["dst"]]["kind"]) for e in edges if e["relation"] == "wasInformedBy"}
    second_id = os.path.basename(second)
    # each rank's run activity of attempt 1 wasInformedBy the run of attempt 0
    assert {(second_id, 0, first_id, "run"), (second_id, 1, first_id, "run")} <= informed, \
        informed
    # ls lists the two attempts together, in order
    p = run([PROVHPC, "ls", "--json", str(jobdir / "provenance")], slurm_env, str(jobdir))
    rows = json.loads(p.stdout)
    assert [(r["run_id"], r["attempt"], r["job"]) for r in rows] == [
        (first_id, 0, job), (os.path.basename(second), 1, job)], rows
