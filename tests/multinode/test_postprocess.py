"""Post-processing of the 3-node run: summary, query, lineage; MPI-parallel under srun -N 3.

The parallel answers (partitions divided among 3 ranks on 3 nodes, gathered
on rank 0) must equal the serial ones, and only rank 0 prints.
"""

from __future__ import annotations

import json
import os

import pytest

from .conftest import BIN, NODES, PER_NODE, run

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                       reason="SLURM_CONF unset: multi-node tests run through tests/multinode.sh"),
]

PROVHPC = os.path.join(BIN, "provhpc")
HOSTS = [f"node{k}" for k in range(1, NODES + 1)]


def serial(env, cwd, *args):
    p = run([PROVHPC, *args], env, cwd, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def parallel(env, cwd, *args):
    """``srun -N 3 -n 3 provhpc ARGS``: one post-processing rank per node."""
    p = run(["srun", "-N", NODES, "-n", NODES, "--ntasks-per-node=1", "--mpi=pmi2", PROVHPC,
             *args], env, cwd, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_summary_text(srun_run, cluster3):
    work, run_dir, _, _ = srun_run
    text = serial(cluster3, work, "summary", run_dir)
    assert f"nodes {NODES}: {', '.join(HOSTS)}   ranks {NODES * PER_NODE}" in text, text
    assert "dropped 0" in text and "status ok" in text, text
    rows = [line.split() for line in text.splitlines() if line[:5].strip().isdigit()]
    assert [(int(r[0]), r[1], r[3]) for r in rows] == \
        [(k, HOSTS[k // PER_NODE], "ok") for k in range(NODES * PER_NODE)], text
    assert "warning" not in text and "error" not in text, text


def test_parallel_summary_equals_serial(srun_run, cluster3):
    work, run_dir, _, _ = srun_run
    ser = json.loads(serial(cluster3, work, "summary", "--json", run_dir))
    par = json.loads(parallel(cluster3, work, "summary", "--json", run_dir))  # one document
    assert par == ser
    assert ser["nodes"] == HOSTS and ser["world_size"] == NODES * PER_NODE
    assert ser["records_total"] == sum(p["records"] for p in ser["partitions"]) > 0
    assert ser["dropped_total"] == 0 and not ser["partition_errors"]


@pytest.mark.parametrize("args", [("metrics",), ("tasks", "--node", "node3"),
                                  ("entities", "--kind", "raw")])
def test_parallel_query_equals_serial(srun_run, cluster3, args):
    work, run_dir, _, _ = srun_run
    ser = json.loads(serial(cluster3, work, "query", run_dir, *args, "--json"))
    par = json.loads(parallel(cluster3, work, "query", run_dir, *args, "--json"))
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(par["rows"], key=key) == sorted(ser["rows"], key=key)
    assert par["count"] == ser["count"] > 0 and not par["partition_errors"]
    if "--node" in args:
        assert {r["rank"] for r in ser["rows"]} == {4, 5}
        assert {r["node"] for r in ser["rows"]} == {"node3"}
    if "raw" in args:  # each rank curated one raw file: 6 files from 3 nodes
        assert {r["node"] for r in ser["rows"]} == set(HOSTS)
        assert len({r["key"] for r in ser["rows"]}) == 6


def test_lineage_on_every_node(srun_run, cluster3):
    """Backward lineage of each rank's training shard, read from its node's partition."""
    work, run_dir, _, _ = srun_run
    for rank in range(NODES * PER_NODE):
        lin = json.loads(serial(cluster3, work, "lineage", run_dir, f"shard/train/rank{rank}",
                                "--json"))
        nodes = lin["nodes"]
        # the shard's own provenance is on its rank's node; rank 0 (the checkpoint is
        # derived from every shard) declares each shard too, and entities merge by key;
        # the run's code is one node of the run (every activity used it), not a rank's
        own = [n for n in nodes if n["kind"] not in ("shard", "code")]
        assert len([n for n in nodes if n["kind"] == "code"]) == 1, nodes
        assert {n["host"] for n in own} == {HOSTS[rank // PER_NODE]}, nodes
        assert {n["rank"] for n in own} == {rank}
        assert {n["rank"] for n in nodes} - {rank} <= {0}, nodes
        names = {(n["kind"], os.path.basename(n["name"])) for n in nodes}
        assert ("raw", f"survey_{rank:02d}.npz") in names, names
        assert ("dataset", f"rank{rank}") in names and ("stage", "curation") in names, names
    text = serial(cluster3, work, "lineage", run_dir, str(work / "ckpt" / "mlp.npz"))
    assert "survey_00.npz" in text and "survey_05.npz" in text, text
    assert "ranks [0, 1, 2, 3, 4, 5], nodes ['node1', 'node2', 'node3']" in text, text
