"""Fixtures of the multi-node tests: an emulated SLURM cluster of 3 nodes.

tests/multinode.sh starts ``jobs/emulated-cluster.sh start 3`` (node1..node3,
each in its own network/UTS/IPC/mount/PID namespaces with a private /dev/shm;
/tmp and the venv shared like NFS) and exports SLURM_CONF; without it every
test here is skipped.  Jobs see the host's /tmp, so work dirs live there.
Every client call is bounded: ``timeout -k`` around srun/sbatch (srun gets
SIGTERM first, so it cancels its step) and a subprocess timeout on top.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

import h5py
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, ".venv", "bin")
CLUSTER = os.path.join(ROOT, "jobs", "emulated-cluster.sh")
TRAIN = os.path.join(ROOT, "examples", "train_mlp.py")
NODES = 3
PER_NODE = 2
SMALL = ["--files", "6", "--traces", "200", "--epochs", "2"]
SKIP_REASON = "SLURM_CONF unset: multi-node tests run through tests/multinode.sh " \
              "(starts jobs/emulated-cluster.sh)"


def need_cluster():
    if not os.environ.get("SLURM_CONF") or shutil.which("srun") is None:
        pytest.skip(SKIP_REASON)


def run(cmd, env, cwd, timeout=120):
    """A bounded client call: SIGTERM at ``timeout`` (srun cancels its step), KILL 10 s later."""
    full = ["timeout", "-k", "10", str(timeout)] + [str(c) for c in cmd]
    return subprocess.run(full, env=env, cwd=str(cwd), timeout=timeout + 30,
                          capture_output=True, text=True)


def cluster(*args, timeout=120):
    return subprocess.run(["bash", CLUSTER, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def mn_env():
    """The environment of a submission: no launcher/provhpc variables, SLURM_CONF kept."""
    need_cluster()
    strip = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "MPI_LOCAL", "PROVHPC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return env


@pytest.fixture
def cluster3(mn_env):
    """The 3-node cluster, healthy (``start 3``: a no-op when up, a restart after a lost node)."""
    p = cluster("start", NODES)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={mn_env['SLURM_CONF']}"
    yield mn_env
    # nothing of this test may run on into the next one
    subprocess.run(["scancel", "--quiet", "--user", str(os.getuid())], env=mn_env,
                   capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A work dir on the file system every node sees (/tmp is shared, /dev/shm is not)."""
    d = tmp_path_factory.mktemp("mn")
    assert str(d).startswith("/tmp/"), d
    return d


def train_cmd(out, work, *extra):
    """``provhpc run -- python train_mlp.py`` with small sizes and per-run data/checkpoint."""
    return [os.path.join(BIN, "provhpc"), "run", "--out", str(out), "--",
            os.path.join(BIN, "python"), TRAIN, *SMALL, "--data", str(work / "data"),
            "--checkpoint", str(work / "ckpt" / "mlp.npz"), *extra]


def identity_wrapper(idir):
    """A bash prefix each task runs first: it writes its SLURM identity and real host name."""
    script = ('printf "%s %s %s %s %s\\n" "$(hostname)" "$SLURM_PROCID" "$SLURM_LOCALID" '
              '"$SLURM_NODEID" "$SLURMD_NODENAME" > "$0/task-$SLURM_PROCID.id"; exec "$@"')
    return ["bash", "-c", script, str(idir)]


def read_identities(idir) -> dict:
    """{procid: (hostname, procid, localid, nodeid, slurmd_nodename)} from the tasks' files."""
    out = {}
    for path in glob.glob(os.path.join(str(idir), "task-*.id")):
        with open(path) as fh:
            host, procid, localid, nodeid, nodename = fh.read().split()
        out[int(procid)] = (host, int(procid), int(localid), int(nodeid), nodename)
    return out


def run_dirs(out) -> list:
    return sorted(d for d in glob.glob(os.path.join(str(out), "*"))
                  if os.path.isdir(d) and not os.path.islink(d))


def only_run(out) -> str:
    runs = run_dirs(out)
    assert len(runs) == 1, runs
    return runs[0]


def summary(run_dir, env, cwd) -> dict:
    p = run([os.path.join(BIN, "provhpc"), "summary", "--json", run_dir], env, cwd, 120)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def partitions(run_dir) -> dict:
    """node name -> (attrs, rank table rows as dicts, record count, record ranks)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*.h5"))):
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            ranks = [{k: (r[k].decode() if isinstance(r[k], bytes) else r[k].item())
                      for k in r.dtype.names} for r in f["ranks"][:]]
            recs = f["records"]["rank"] if f["records"].shape[0] else []
            out[os.path.basename(path)[:-3]] = (attrs, ranks, f["records"].shape[0],
                                                 set(int(r) for r in recs))
    return out


def wait_for(pred, timeout, step=0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def sbatch_wait(args, env, work, timeout=200):
    """``sbatch --wait ARGS`` -> (returncode, job id, its output file's text + sbatch's)."""
    p = run(["sbatch", "--wait", "--parsable", f"--output={work}/job-%j.out", *args], env, work,
            timeout=timeout)
    job = p.stdout.strip().split(";")[0].splitlines()[0] if p.stdout.strip() else ""
    text = p.stdout + p.stderr
    path = os.path.join(str(work), f"job-{job}.out")
    if job and os.path.exists(path):
        with open(path, errors="replace") as fh:
            text += fh.read()
    return p.returncode, job, text


def job_logs(work) -> str:
    text = ""
    for path in sorted(glob.glob(os.path.join(str(work), "*.out"))):
        with open(path, errors="replace") as fh:
            text += f"--- {path}\n{fh.read()[-4000:]}"
    return text


@pytest.fixture(scope="session")
def srun_run(mn_env, shared_dir):
    """One ``srun -N 3 --ntasks-per-node=2 provhpc run -- python train_mlp.py``, shared by tests.

    Returns (work dir, run dir, identities written by the tasks, srun result).
    """
    p = cluster("start", NODES)
    assert p.returncode == 0, p.stdout + p.stderr
    work = shared_dir / "srun"
    idir = work / "ids"
    idir.mkdir(parents=True)
    out = work / "prov"
    cmd = ["srun", "-N", NODES, f"--ntasks-per-node={PER_NODE}", "--mpi=pmi2"] \
        + identity_wrapper(idir) + train_cmd(out, work)

    def launch():
        res = run(cmd, mn_env, work, timeout=180)
        return res.returncode == 0, res.stdout + res.stderr, res

    ok, text, res = launch()
    assert ok, text[-5000:]
    return work, only_run(out), read_identities(idir), res


def pytest_collection_modifyitems(session, config, items):
    """The lost-node test kills a node: it runs last (it restarts the cluster when done)."""
    items.sort(key=lambda item: "lost_node" in item.nodeid)
