"""A whole node lost mid-run: node3's namespace holder is killed during training.

The kernel kills everything of node3 at once (slurmd, ranks, aggregator) and
its /dev/shm goes with it.  SLURM notices in 10-18 s and ends the step.  The
other nodes' partitions must be complete and consistent, the job must end,
and node3's partition must be readable (SWMR, then rebuilt complete by
provhpc.node.recover.recover) with records from before the kill only, of node3's
ranks only.  Runs last (see conftest); restarts the cluster when done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from provhpc.format import records as R
from provhpc.node.recover import recover

from .conftest import (
    NODES,
    PER_NODE,
    cluster,
    only_run,
    partitions,
    run_dirs,
    summary,
    train_cmd,
    wait_for,
)

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                       reason="SLURM_CONF unset: multi-node tests run through tests/multinode.sh"),
]

TERMINAL = {"ok", "terminated", "error", "killed", "lost", "salvaged"}
LOST_RANKS = {2 * PER_NODE, 2 * PER_NODE + 1}  # node3's


def _training_on(path, ranks, min_metrics=10) -> bool:
    """``path`` holds train metrics of every rank in ``ranks`` (the training loop runs)."""
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            recs = f["records"][:]
    except (OSError, KeyError):
        return False
    met = recs[recs["kind"] == R.METRIC]
    return all((met["rank"] == r).sum() >= min_metrics for r in ranks)


@pytest.fixture
def restart_after(cluster3):
    yield cluster3
    p = cluster("start", NODES)  # the lost node does not come back by itself
    assert p.returncode == 0, p.stdout + p.stderr


def test_lost_node_mid_run(restart_after, shared_dir):
    env = {**restart_after, "PROVHPC_FLUSH_INTERVAL": "0.2"}
    work = shared_dir / "lost"
    work.mkdir()
    out = work / "prov"
    cmd = ["timeout", "-k", "10", "150", "srun", "-N", str(NODES),
           f"--ntasks-per-node={PER_NODE}", "--mpi=pmi2"] \
        + [str(c) for c in train_cmd(out, work, "--epochs", "100000", "--step-sleep", "0.02")]

    with open(work / "srun.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(work), stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: run_dirs(out) or proc.poll() is not None, 60)
        assert wait_for(lambda: len(run_dirs(out)) == 1, 60), \
            "no run directory\n" + (work / "srun.log").read_text()[-3000:]
        run_dir = only_run(out)
        node3 = os.path.join(run_dir, "node3.h5")
        assert wait_for(lambda: _training_on(node3, LOST_RANKS), 60), \
            (work / "srun.log").read_text()[-3000:]
        p = cluster("holder-pid", 3)
        assert p.returncode == 0, p.stderr
        os.kill(int(p.stdout.strip()), signal.SIGKILL)
        killed_ns, killed = time.time_ns(), time.monotonic()
        try:
            code = proc.wait(timeout=60)  # SLURM notices in 10-18 s, then ends the step
        except subprocess.TimeoutExpired:
            pytest.fail("srun still runs 60 s after node3 was lost")
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (work / "srun.log").read_text()
    assert code != 0 and code != 124, log[-3000:]  # ended by SLURM, not by our timeout
    assert ended < 45, ended
    assert "node3" in log, log[-3000:]  # srun: error: Node failure on node3

    # the surviving nodes' aggregators drain on SIGTERM and close their partitions
    def survivors_complete():
        parts = partitions(run_dir)
        return all(parts[h][0]["complete"] for h in ("node1", "node2"))

    assert wait_for(survivors_complete, 30), partitions(run_dir)
    parts = partitions(run_dir)
    assert sorted(parts) == ["node1", "node2", "node3"]
    for k, host in enumerate(("node1", "node2")):
        attrs, ranks, nrec, rec_ranks = parts[host]
        want = {k * PER_NODE, k * PER_NODE + 1}
        assert {r["rank"] for r in ranks} == want == rec_ranks, ranks
        assert all(r["status"] in TERMINAL and r["end"] > 0 and r["records"] > 0
                   for r in ranks), ranks
        assert nrec >= sum(r["records"] for r in ranks)

    # node3: open as it was left (SWMR, not complete), only its ranks, nothing after the kill
    attrs, ranks, nrec, rec_ranks = parts["node3"]
    assert not attrs["complete"]
    assert nrec > 0 and rec_ranks == LOST_RANKS, (nrec, rec_ranks)
    assert {r["rank"] for r in ranks} == LOST_RANKS
    with h5py.File(node3, "r", swmr=True, locking=False) as f:
        before = f["records"][:]
    assert before["t"].max() <= killed_ns

    rep = recover(run_dir)
    actions = {os.path.basename(p["path"]): p["action"] for p in rep["partitions"]}
    assert actions == {"node1.h5": "ok", "node2.h5": "ok", "node3.h5": "rebuilt"}, rep
    assert not rep["errors"], rep["errors"]
    with h5py.File(node3, "r", locking=False) as f:
        assert f.attrs["complete"]
        after = f["records"][:]
        statuses = {int(r["rank"]): r["status"].decode() for r in f["ranks"][:]}
        counted = {int(r["rank"]): int(r["records"]) for r in f["ranks"][:]}
    assert statuses == {r: "lost" for r in LOST_RANKS}
    ranks_held, held = np.unique(after["rank"], return_counts=True)
    assert counted == dict(zip(ranks_held.tolist(), held.tolist()))  # counted from the file
    assert len(after) == len(before) and np.array_equal(after["id"], before["id"])
    assert set(np.unique(after["rank"]).tolist()) == LOST_RANKS

    s = summary(run_dir, restart_after, work)
    assert s["nodes"] == ["node1", "node2", "node3"] and not s["partition_errors"]
    assert all(p["complete"] for p in s["partitions"])
    assert {r["rank"] for r in s["ranks"]} == set(range(NODES * PER_NODE))
    assert s["dropped_total"] == 0
