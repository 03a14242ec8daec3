"""Partitions written before the layout move still open (issue 11).

The fixture ``tests/fixtures/old_partition_79c95fe/`` is a run written by the
code of commit 79c95fe (before provhpc moved into layer folders) running
``small_program.py`` of the same folder; its README gives the exact command.
Here the current code reads it: record counts, metric values, a lineage answer,
and the summary / query / lineage / export verbs of the CLI.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import provhpc
from provhpc.format import records as R
from provhpc.format.partition import open_partition
from provhpc.post.reader import summary

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "old_partition_79c95fe")
RUN_ID = "old-79c95fe"


@pytest.fixture()
def old_run(tmp_path):
    """A copy of the old run directory (verbs may write caches beside the partition)."""
    run = tmp_path / RUN_ID
    run.mkdir()
    shutil.copy(os.path.join(FIXTURE, "manifest.json"), run / "manifest.json")
    src_path = os.path.join(FIXTURE, "vm.h5.gz")
    with gzip.open(src_path, "rb") as src, open(run / "vm.h5", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return str(run)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "provhpc", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_the_raw_file_has_the_schema_the_current_code_expects(old_run):
    with open_partition(os.path.join(old_run, "vm.h5")) as f:
        assert f.attrs["format"] == "provhpc-partition"
        assert int(f.attrs["schema_version"]) == R.SCHEMA_VERSION
        assert bool(f.attrs["complete"])
        assert f["records"].dtype == R.RECORD_DTYPE
        recs = f["records"][:]
    assert len(recs) == 72
    assert set(np.unique(recs["kind"]).tolist()) <= set(R.KIND_NAMES)


def test_record_counts_by_kind(old_run):
    s = summary(provhpc.open(old_run))
    assert s["run_id"] == RUN_ID and s["status"] == "ok"
    assert s["records_total"] == 72 and s["dropped_total"] == 0
    assert s["records_by_kind"] == {"activity_start": 10, "activity_end": 10, "entity": 4,
                                    "relation": 7, "attribute": 21, "metric": 20}
    (rank,) = s["ranks"]
    assert (rank["rank"], rank["status"], rank["records"], rank["reported"]) == (0, "ok", 64, 64)


def test_metric_values(old_run):
    m = provhpc.open(old_run).metrics()
    loss = sorted((int(r["step"]), float(r["value"])) for r in m if r["name"] == "train_loss")
    # small_program.py: loss = 1 / (1 + step) for steps 0..11
    assert loss == [(k, 1.0 / (1 + k)) for k in range(12)]


def test_tasks_and_stages(old_run):
    tasks = provhpc.open(old_run).tasks()
    by_type: dict = {}
    for t in tasks:
        by_type.setdefault(str(t["type"]), []).append(str(t["name"]))
    assert sorted(by_type["stage"]) == ["curation", "train"]
    assert sorted(by_type["task"]) == ["clean", "normalise", "normalise", "normalise"]
    assert len(by_type["epoch"]) == 3


def test_lineage_answer_via_cli(old_run):
    p = _cli("lineage", old_run, "curated/part0", "--json")
    assert p.returncode == 0, p.stderr
    g = json.loads(p.stdout)
    names = {n["node"]: n["name"] for n in g["nodes"]}
    edges = {(names[e["src"]], e["relation"], names[e["dst"]]) for e in g["edges"]}
    # the run's code (its script, from the partition's meta) is a node each activity used
    assert edges == {("clean", "used", "data/survey_00.npz"), ("clean", "used", "small_program.py"),
                     ("curated/part0", "wasDerivedFrom", "data/survey_00.npz"),
                     ("curated/part0", "wasGeneratedBy", "clean")}


@pytest.mark.parametrize("args, expect", [
    (("summary",), "records 72"),
    (("query", "{run}", "metrics", "--name", "train_loss"), "train_loss"),
    (("query", "{run}", "produced", "ckpt.npz"), "lr=0.01"),
    (("query", "{run}", "stages"), "curation"),
    (("export", "{run}", "--format", "prov-json"), "wasGeneratedBy"),
    (("export", "{run}", "--format", "prov-n"), "document"),
])
def test_verbs_exit_0(old_run, args, expect):
    argv = [a.format(run=old_run) for a in args]
    if "{run}" not in args:
        argv.append(old_run)
    p = _cli(*argv)
    assert p.returncode == 0, p.stderr
    assert expect in p.stdout
