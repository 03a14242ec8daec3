"""Real SLURM launches: srun identity, an sbatch of a jobs/ script, SIGTERM via scancel.

Run by tests/slurm.sh, which starts a one-node SLURM on localhost; skipped
(with the reason) where SLURM_CONF is unset.  Not part of the `unit` part.
"""

import glob
import json
import os
import re
import subprocess
import time

import pytest

from .conftest import BIN, ROOT, run
from .conftest import wait as _wait

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                       reason="SLURM_CONF unset: SLURM tests run through tests/slurm.sh"),
]

TRAIN = os.path.join(ROOT, "examples", "train_mlp.py")
SMALL = ["--epochs", "1", "--traces", "100", "--files", "4"]


def summary(run_dir, env):
    p = run([os.path.join(BIN, "provhpc"), "summary", "--json", str(run_dir)], env, ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def only_run(out):
    runs = [d for d in glob.glob(os.path.join(str(out), "*")) if os.path.isdir(d)
            and not os.path.islink(d)]
    assert len(runs) == 1, runs
    return runs[0]


def test_srun_records_slurm_identity(slurm_env, jobdir):
    out = jobdir / "prov"
    cmd = ["srun", "--mpi=pmi2", "-n", "4", "bash", "-c",
           'echo "JOB=$SLURM_JOB_ID NTASKS=$SLURM_NTASKS"; exec "$0" "$@"',
           os.path.join(BIN, "provhpc"), "run", "--out", str(out), "--",
           os.path.join(BIN, "python"), TRAIN] + SMALL
    p = run(cmd, slurm_env, str(jobdir), timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    seen = set(re.findall(r"JOB=(\d+) NTASKS=(\d+)", p.stdout))
    assert len(seen) == 1, seen
    job_id, ntasks = seen.pop()
    run_dir = only_run(out)
    s = summary(run_dir, slurm_env)
    # A launcher/MPI mismatch gives 4 silent singletons: world size 1, rank 0 four times.
    assert s["world_size"] == int(ntasks) == 4
    ranks = sorted(r["rank"] for r in s["ranks"] if r["role"] == "rank")
    assert ranks == [0, 1, 2, 3]
    assert all(r["records"] > 0 and r["status"] == "ok" for r in s["ranks"])
    assert all(p["complete"] for p in s["partitions"])
    with open(os.path.join(run_dir, "manifest.json")) as fh:
        meta = json.load(fh)["meta"]
    assert meta["launcher"] == "srun"
    assert str(meta["job_id"]) == job_id
    assert meta["world_size"] == 4


def test_sbatch_capture_script_leaves_partitions(slurm_env, jobdir):
    env = {**slurm_env, "PROVHPC_HOME": ROOT, "PROVHPC_OUT": str(jobdir / "prov"),
           "TRAIN_ARGS": " ".join(SMALL)}
    p = run(["sbatch", "--wait", "--parsable", "--ntasks-per-node=2",
             f"--chdir={jobdir}", f"--output={jobdir}/job-%j.out",
             os.path.join(ROOT, "jobs", "capture.sbatch")], env, str(jobdir), timeout=180)
    logs = "".join(_read(f) for f in glob.glob(str(jobdir / "job-*.out")))
    assert p.returncode == 0, p.stdout + p.stderr + logs[-3000:]
    s = summary(only_run(jobdir / "prov"), slurm_env)
    assert s["world_size"] == 2
    assert sorted(r["rank"] for r in s["ranks"] if r["role"] == "rank") == [0, 1]
    assert s["partitions"] and all(p["complete"] for p in s["partitions"])
    assert "records" in logs  # the script's own `provhpc summary`


def _read(path):
    with open(path) as fh:
        return fh.read()


def _ranks_started(out, n):
    import h5py

    for path in glob.glob(os.path.join(str(out), "*", "*.h5")):
        try:
            with h5py.File(path, "r", swmr=True, locking=False) as f:
                return f["ranks"].shape[0] >= n and f["records"].shape[0] > 0
        except (OSError, KeyError):
            return False
    return False


def test_scancel_sigterm_leaves_complete_partitions(slurm_env, jobdir):
    out = jobdir / "prov"
    env = {**slurm_env, "PROVHPC_HOME": ROOT, "PROVHPC_OUT": str(out),
           "PROVHPC_FLUSH_INTERVAL": "0.2",
           "TRAIN_ARGS": "--epochs 100000 --step-sleep 0.01 --traces 100 --files 4"}
    p = run(["sbatch", "--parsable", f"--chdir={jobdir}", f"--output={jobdir}/job-%j.out",
             os.path.join(ROOT, "jobs", "capture.sbatch")], env, str(jobdir))
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    try:
        assert _wait(lambda: _ranks_started(out, 4), 90), "the job's ranks did not start"
        time.sleep(2)  # training under way on every rank
        p = run(["scancel", "--signal=TERM", job], slurm_env, str(jobdir))
        assert p.returncode == 0, p.stderr
        gone = _wait(lambda: job not in run(["squeue", "-h", "-o", "%i", "-j", job],
                                            slurm_env, str(jobdir)).stdout, 60)
        assert gone, "the job did not end within 60 s of SIGTERM"
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    s = summary(only_run(out), slurm_env)
    assert s["partitions"] and all(p["complete"] for p in s["partitions"]), s["partitions"]
    ranks = {r["rank"]: r for r in s["ranks"] if r["role"] == "rank"}
    assert sorted(ranks) == [0, 1, 2, 3]
    assert all(r["records"] > 0 for r in ranks.values())
    assert all(r["status"] in ("terminated", "error", "killed", "ok") for r in ranks.values())


@pytest.mark.timeout(300)
def test_srun_ddp_example(slurm_env, jobdir):
    """examples/train_ddp.py under srun: the same partitions as under mpiexec and torchrun."""
    from test_ddp_launch import ARGS, EXAMPLE, _check_run, _launch

    cmd = ["srun", "--mpi=pmi2", "-n", "2", os.path.join(BIN, "provhpc"), "run", "--out",
           str(jobdir / "prov"), "--", os.path.join(BIN, "python"), EXAMPLE, *ARGS]
    _launch(cmd, str(jobdir), slurm_env, timeout=240)
    _check_run(jobdir / "prov", "srun")
