"""Capture across real node boundaries on the emulated 3-node SLURM cluster.

srun, aggregators as their own job step, sbatch of jobs/capture.sbatch and
mpiexec (Hydra under SLURM): three partitions named by the nodes' host names,
one aggregator per node running on that node, every rank's SLURM identity in
the partition of its node, one run id across nodes whose /dev/shm is private.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from .conftest import (
    BIN,
    NODES,
    PER_NODE,
    ROOT,
    cluster,
    identity_wrapper,
    only_run,
    partitions,
    read_identities,
    run,
    sbatch_wait,
    summary,
    train_cmd,
)

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                       reason="SLURM_CONF unset: multi-node tests run through tests/multinode.sh"),
]

HOSTS = [f"node{k}" for k in range(1, NODES + 1)]


def test_nodes_have_own_host_names_and_private_dev_shm(cluster3):
    probe = f"provhpc-mn-probe-{os.getpid()}"
    for k, host in enumerate(HOSTS, 1):
        p = cluster("exec", k, "hostname")
        assert (p.returncode, p.stdout.strip()) == (0, host), p.stderr
    p = cluster("exec", 1, "touch", f"/dev/shm/{probe}")
    assert p.returncode == 0, p.stderr
    try:
        assert cluster("exec", 1, "test", "-e", f"/dev/shm/{probe}").returncode == 0
        for k in range(2, NODES + 1):
            assert cluster("exec", k, "test", "-e", f"/dev/shm/{probe}").returncode == 1
        assert not os.path.exists(f"/dev/shm/{probe}")
    finally:
        cluster("exec", 1, "rm", "-f", f"/dev/shm/{probe}")


def _read(path) -> str:
    """A file a job wrote (an exit status), or '' when the job never got there."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def check_three_nodes(run_dir, ids, leader_spawned=True):
    """The partitions of a 3 x 2 run against the identities the tasks wrote themselves.

    ``ids``: rank -> (real host name, rank, local rank, node id, SLURMD_NODENAME).
    """
    assert sorted(ids) == list(range(NODES * PER_NODE)), ids
    assert all(i[0] == i[4] for i in ids.values()), ids  # SLURMD_NODENAME is the host name
    by_host = {}
    for host, rank, local, nodeid, _ in ids.values():
        by_host.setdefault(host, []).append((rank, local, nodeid))
    assert sorted(by_host) == HOSTS, by_host
    for host, tasks in by_host.items():
        assert sorted(t[1] for t in tasks) == list(range(PER_NODE)), (host, tasks)
        assert len({t[2] for t in tasks}) == 1, (host, tasks)
    parts = partitions(run_dir)
    assert sorted(parts) == HOSTS, sorted(os.listdir(run_dir))  # one partition per node, no .1
    run_id = os.path.basename(run_dir)
    for host, (attrs, ranks, nrec, rec_ranks) in parts.items():
        assert attrs["node"] == host
        assert attrs["writer_host"] == host, attrs["writer_host"]  # the aggregator ran there
        assert attrs["run_id"] == run_id
        assert attrs["complete"] and attrs["complete_reason"] == "all ranks closed", attrs
        assert attrs["expect"] == PER_NODE
        want = {rank: local for rank, local, _ in by_host[host]}
        assert {r["rank"]: r["local_rank"] for r in ranks} == want, ranks
        assert all(r["host"] == r["node"] == host for r in ranks), ranks
        assert all(r["status"] == "ok" and r["records"] > 0 and r["dropped"] == 0
                   for r in ranks), ranks
        assert rec_ranks == set(want) and nrec >= sum(r["records"] for r in ranks)  # + telemetry
        if leader_spawned:  # the leader's environment, kept in the partition's metadata
            env = json.loads(attrs["meta"])["environment"]["env"]
            assert int(env["SLURM_NODEID"]) == by_host[host][0][2]
            assert env["SLURMD_NODENAME"] == host
    with open(os.path.join(run_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["run_id"] == run_id and manifest["status"] == "ok", manifest["status"]
    assert manifest["meta"]["world_size"] == NODES * PER_NODE
    logs = sorted(f for f in os.listdir(run_dir) if f.endswith(".aggregator.log"))
    assert logs == ([f"{h}.aggregator.log" for h in HOSTS] if leader_spawned else []), logs
    return parts, manifest


def rendezvous_left(run_id, env) -> list:
    base = env.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    d = os.path.join(base, f"provhpc-{os.getuid()}", run_id)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_srun_three_nodes(srun_run, mn_env):
    work, run_dir, ids, res = srun_run
    parts, manifest = check_three_nodes(run_dir, ids)
    assert manifest["meta"]["launcher"] == "srun"
    assert manifest["identity"]["node"] == "node1" and manifest["identity"]["rank"] == 0
    # one run id, agreed over MPI although no two nodes share /dev/shm
    assert {a["run_id"] for a, *_ in parts.values()} == {os.path.basename(run_dir)}
    assert rendezvous_left(os.path.basename(run_dir), mn_env) == []


def test_aggregators_as_their_own_job_step(cluster3, shared_dir):
    work = shared_dir / "aggstep"
    idir = work / "ids"
    idir.mkdir(parents=True)
    out = work / "prov"
    agg = ["srun", "-N", NODES, "-n", NODES, "--ntasks-per-node=1", "--overlap", "--mpi=none",
           "bash", "-c", 'hostname > "$0/agg-$SLURM_NODEID.host"; exec "$@"', str(idir),
           os.path.join(BIN, "provhpc"), "aggregate", "--out", str(out),
           "--expect", PER_NODE]  # no --run-id, no --node: PROVHPC_RUN_ID, SLURMD_NODENAME
    train = ["srun", "-N", NODES, f"--ntasks-per-node={PER_NODE}", "--overlap", "--mpi=pmi2"] \
        + identity_wrapper(idir) + train_cmd(out, work)
    q = lambda cmd: " ".join(f"'{c}'" for c in map(str, cmd))  # noqa: E731
    script = work / "aggstep.sh"
    script.write_text(f"""#!/bin/bash
export PROVHPC_RUN_ID=mn-aggstep-$SLURM_JOB_ID
timeout -k 5 150 {q(agg)} &
AGG=$!
PROVHPC_EXTERNAL_AGGREGATOR=1 timeout -k 5 150 {q(train)}
echo $? > {work}/train.rc
wait $AGG
echo $? > {work}/agg.rc
""")

    def launch():
        for f in ("train.rc", "agg.rc"):
            (work / f).unlink(missing_ok=True)
        code, job, text = sbatch_wait(["-N", NODES, f"--ntasks-per-node={PER_NODE}",
                                       str(script)], cluster3, work)
        rcs = [_read(work / f) for f in ("train.rc", "agg.rc")]
        return code == 0 and rcs == ["0", "0"], f"{text}\nrc train, aggregators: {rcs}", job

    ok, text, job = launch()
    assert ok, text[-5000:]
    run_dir = only_run(out)
    assert os.path.basename(run_dir) == f"mn-aggstep-{job}"
    parts, _ = check_three_nodes(run_dir, read_identities(idir), leader_spawned=False)
    for k, host in enumerate(HOSTS):  # each aggregator task ran on the node it wrote for
        assert (idir / f"agg-{k}.host").read_text().strip() == host
        assert json.loads(parts[host][0]["meta"])["launcher"] == "srun"
    assert rendezvous_left(os.path.basename(run_dir), cluster3) == []


def test_sbatch_capture_script(cluster3, shared_dir):
    work = shared_dir / "sbatch"
    work.mkdir()
    out = work / "prov"
    env = {**cluster3, "PROVHPC_HOME": ROOT, "PROVHPC_OUT": str(out),
           "TRAIN_ARGS": " ".join(train_cmd(out, work)[7:])}  # after the script

    def launch():
        code, job, text = sbatch_wait(["-N", NODES, f"--ntasks-per-node={PER_NODE}",
                                       f"--chdir={work}",
                                       os.path.join(ROOT, "jobs", "capture.sbatch")], env, work)
        return code == 0, text, job

    ok, logs, _ = launch()
    assert ok, logs[-5000:]
    run_dir = only_run(out)
    s = summary(run_dir, cluster3, work)
    assert s["nodes"] == HOSTS and s["world_size"] == NODES * PER_NODE
    assert s["dropped_total"] == 0 and not s["partition_errors"]
    assert all(p["complete"] for p in s["partitions"]) and len(s["partitions"]) == NODES
    for host in HOSTS:
        ranks = [r for r in s["ranks"] if r["node"] == host]
        assert sorted(r["local_rank"] for r in ranks) == list(range(PER_NODE)), s["ranks"]
        assert all(r["status"] == "ok" and r["records"] > 0 for r in ranks)
    assert f"nodes {NODES}: {', '.join(HOSTS)}   ranks {NODES * PER_NODE}" in logs  # its summary


def comparable(s: dict) -> dict:
    """What must not depend on the launcher: ranks, placement, records by kind, drops."""
    return {"nodes": s["nodes"], "world_size": s["world_size"],
            "records_total": s["records_total"], "records_by_kind": s["records_by_kind"],
            "dropped_total": s["dropped_total"],
            "ranks": [(r["rank"], r["node"], r["local_rank"], r["role"], r["status"],
                       r["records"], r["records_by_kind"]) for r in s["ranks"]],
            "partitions": [(os.path.basename(p["path"]), p["node"], p["complete"],
                            p["records"]) for p in s["partitions"]]}


def test_mpiexec_inside_sbatch_matches_srun(cluster3, shared_dir, srun_run):
    work = shared_dir / "hydra"
    idir = work / "ids"
    idir.mkdir(parents=True)
    out = work / "prov"
    # Hydra starts one proxy per node with srun; ranks know themselves from PMI_RANK
    wrapper = ["bash", "-c", 'printf "%s %s %s %s %s\\n" "$(hostname)" "$PMI_RANK" '
               '"$MPI_LOCALRANKID" "$SLURM_NODEID" "$SLURMD_NODENAME" > "$0/task-$PMI_RANK.id";'
               ' exec "$@"', str(idir)]
    cmd = [os.path.join(BIN, "mpiexec"), "-n", NODES * PER_NODE, "-ppn", PER_NODE] + wrapper \
        + train_cmd(out, work)
    script = work / "hydra.sh"
    script.write_text("#!/bin/bash\ntimeout -k 5 150 " + " ".join(f"'{c}'" for c in map(str, cmd))
                      + f"\necho $? > {work}/mpiexec.rc\n")

    def launch():
        (work / "mpiexec.rc").unlink(missing_ok=True)
        code, job, text = sbatch_wait(["-N", NODES, f"--ntasks-per-node={PER_NODE}",
                                       str(script)], cluster3, work)
        rc = _read(work / "mpiexec.rc")
        return code == 0 and rc == "0", f"{text}\nmpiexec rc: {rc}", job

    ok, text, _ = launch()
    assert ok, text[-5000:]
    run_dir = only_run(out)
    _, manifest = check_three_nodes(run_dir, read_identities(idir))
    assert manifest["meta"]["launcher"] == "hydra"
    hydra = summary(run_dir, cluster3, work)
    srun_work, srun_dir, _, _ = srun_run
    ref = summary(srun_dir, cluster3, srun_work)
    assert comparable(hydra) == comparable(ref)
    assert _final_metrics(run_dir, cluster3) == pytest.approx(
        _final_metrics(srun_dir, cluster3), rel=1e-5)


def _final_metrics(run_dir, env) -> dict:
    """rank -> epoch_loss of the last epoch, val and test accuracy (same data, same seed)."""
    p = run([os.path.join(BIN, "provhpc"), "query", run_dir, "metrics", "--json",
             "--name", "epoch_loss", "--name", "val_accuracy", "--name", "test_accuracy"],
            env, ROOT)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    out = {}
    for r in rows:
        out[(r["rank"], r["name"], r["step"])] = r["value"]
    assert len(out) == NODES * PER_NODE * 5, sorted(out)  # 2 epochs x 2 + test accuracy
    return out
