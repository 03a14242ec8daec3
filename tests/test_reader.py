"""provhpc.open: tables, metadata, timelines, collections, bad partitions."""

import os
import shutil

import numpy as np
import pytest
from _post_runs import build_run

import provhpc
from provhpc.format import records as R
from provhpc.post.reader import Collection, PartitionError, Run, summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("out"), "run-a", fail_rank=0)


def test_tasks_join_start_and_end(run_dir):
    run = provhpc.open(run_dir)
    t = run.tasks()
    assert set(t["node"]) == {"node-a", "node-b"}
    epochs = t[t["type"] == "epoch"]
    assert sorted(epochs["index"][epochs["rank"] == 1].tolist()) == [0, 1, 2]
    assert (t["end"] >= t["start"]).all()
    assert np.allclose(t["duration_s"], (t["end"] - t["start"]) / 1e9)
    failed = t[t["status"] == "error"]
    assert failed["name"].tolist() == ["export_onnx"] and failed["error"][0] == "RuntimeError"
    parents = dict(zip(zip(t["rank"], t["id"]), t["name"]))
    assert {parents[(r, p)] for r, p in zip(epochs["rank"], epochs["parent"])} == {"train"}


def test_entities_attributes_metrics_relations(run_dir):
    run = provhpc.open(run_dir)
    e = run.entities()
    raw = e[e["kind"] == "raw"]
    assert len(raw) == 2 and raw["hash"][0].startswith("blake2b:") and \
        raw["hash"][0] == raw["hash"][1]
    a = run.attributes()
    lr = a[(a["key"] == "lr")]
    assert lr["value"].tolist() == [0.05, 0.05] and set(lr["vtype"]) == {"float"}
    assert set(a["role"][a["key"] == "max_abs"]) == {"parameter"}
    assert set(a["role"][a["key"] == "kept"]) == {"generated"}
    m = run.metrics()
    va = m[(m["name"] == "val_accuracy") & (m["rank"] == 1)]
    assert va["step"].tolist() == [0, 1, 2]
    rel = run.relations()
    assert {"used", "wasGeneratedBy", "wasDerivedFrom"} <= set(rel["relation"])
    df = run.tasks().to_pandas()
    assert list(df.columns)[:4] == ["run", "node", "rank", "id"] and len(df) == len(run.tasks())


def test_timeline_and_metadata(run_dir):
    run = provhpc.open(run_dir)
    tl = run.timeline(rank=1)
    assert set(tl["rank"]) == {1} and (np.diff(tl["start"]) >= 0).all()
    meta = run.metadata()
    assert meta["nodes"] == ["node-a", "node-b"] and meta["ranks"] == [0, 1]
    assert meta["config"]["flush_interval"] == 0.2
    assert meta["versions"]["writer"].startswith("provhpc ") and meta["dropped_by_reason"] == {}


def test_collection_of_runs(tmp_path):
    build_run(tmp_path, "run-1", lr=0.01, nodes=("n0",))
    build_run(tmp_path, "run-2", lr=0.1, nodes=("n0",))
    os.symlink("run-1", tmp_path / "latest")
    c = provhpc.open(tmp_path)
    assert isinstance(c, Collection) and [r.run_id for r in c] == ["run-1", "run-2"]
    assert c.latest.run_id == "run-1" and c.run_id == "run-1"  # a collection stands for latest
    assert set(c.tasks()["run"]) == {"run-1", "run-2"}
    assert summary(c)["run_id"] == "run-1"


def test_corrupt_partition_is_named_and_others_stay_readable(tmp_path):
    run_dir = build_run(tmp_path, "run-c")
    bad = os.path.join(run_dir, "node-b.h5")
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) // 3)
    run = Run(run_dir)
    tasks = run.tasks()
    assert set(tasks["node"]) == {"node-a"} and len(tasks) > 0
    assert list(run.errors) == [bad] and bad in run.errors[bad]
    with pytest.raises(PartitionError, match="node-b.h5"):
        provhpc.post.reader.Partition(bad)


def test_garbage_and_missing_partitions(tmp_path):
    run_dir = build_run(tmp_path, "run-g")
    with open(os.path.join(run_dir, "node-b.h5"), "wb") as fh:
        fh.write(b"not hdf5 at all" * 100)
    open(os.path.join(run_dir, "node-c.aggregator.log"), "w").close()
    run = Run(run_dir)
    assert len(run.tasks()) > 0
    errs = run.errors
    assert set(errs) == {os.path.join(run_dir, "node-b.h5"), os.path.join(run_dir, "node-c.h5")}
    assert "missing" in errs[os.path.join(run_dir, "node-c.h5")]
    s = summary(run)
    assert s["partition_errors"] == errs and s["nodes"] == ["node-a"]


def test_select_divides_partitions(run_dir):
    halves = [Run(run_dir, select=lambda p, i=i: p[i::2]) for i in range(2)]
    assert sorted(n for h in halves for n in set(h.tasks()["node"])) == ["node-a", "node-b"]
    total = sum(len(h.tasks()) for h in halves)
    assert total == len(Run(run_dir).tasks())


def test_merge_compacts_partitions(run_dir, tmp_path):
    from provhpc.post.merge import merge

    res = merge([run_dir], str(tmp_path / "m"))
    merged = Run(res["runs"][0]["path"].rsplit("/", 1)[0])
    orig = Run(run_dir)
    assert len(merged.partitions) == 1
    for name in ("tasks", "entities", "metrics", "relations"):
        a, b = np.asarray(orig.table(name)), np.asarray(merged.table(name))
        assert len(a) == len(b)
        assert sorted(zip(a["rank"], a["node"])) == sorted(zip(b["rank"], b["node"]))
    assert sorted(merged.entities()["key"]) == sorted(orig.entities()["key"])
    with pytest.raises(FileExistsError):
        merge([run_dir], str(tmp_path / "m"))
    shutil.rmtree(tmp_path / "m")


def test_pandas_tables_have_datetimes_and_na(run_dir):
    """Times are UTC datetimes (NaT for an activity that has not ended), no step is NA
    (never INT64_MIN), an empty hash or error is NA."""
    pd = pytest.importorskip("pandas")
    run = provhpc.open(run_dir)
    t = run.tasks()
    df = t.to_pandas()
    assert str(df["start"].dtype) == "datetime64[ns, UTC]"
    assert df["start"].iloc[0] == pd.Timestamp(int(t["start"][0]), unit="ns", tz="UTC")
    open_ = np.asarray(t["end"]) < 0
    assert df["end"].isna().tolist() == open_.tolist()
    no_index = np.asarray(t["index"]) == R.NO_STEP
    assert no_index.any() and df["index"].isna().tolist() == no_index.tolist()
    assert df["index"].min() >= 0  # no INT64_MIN left
    assert df["error"].isna().tolist() == (np.asarray(t["error"]) == "").tolist()
    m = run.metrics().to_pandas()
    assert str(m["t"].dtype) == "datetime64[ns, UTC]" and str(m["step"].dtype) == "Int64"
    e = run.entities()
    assert run.entities().to_pandas()["hash"].isna().tolist() == \
        (np.asarray(e["hash"]) == "").tolist()
