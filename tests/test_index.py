"""The run index (``provhpc index``): same answers as the partitions, used only while fresh."""

import json
import logging
import os

import h5py
import numpy as np
import pytest
from _post_runs import build_run

from provhpc import cli
from provhpc.post import questions
from provhpc.post.index import FILENAME, NotIndexable, StoredTable, put_table
from provhpc.post.indexing import build
from provhpc.post.lineage import graph, lineage
from provhpc.post.query import select
from provhpc.post.reader import TABLES, Run, summary


def _same_column(a, b) -> bool:
    if a.dtype.kind == "O":  # type and value: 1, 1.0 and True are not the same value
        return [(type(x).__name__, repr(x)) for x in a.tolist()] == \
            [(type(x).__name__, repr(x)) for x in b.tolist()]
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and len(a) == len(b) and \
        all(_same_column(a[c], b[c]) for c in a.dtype.names)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    d = build_run(tmp_path_factory.mktemp("ix"), "run-ix", fail_rank=1)
    assert build(d) == os.path.join(d, FILENAME)
    return d


def test_tables_equal_the_partitions(indexed):
    with Run(indexed) as fast, Run(indexed, use_index=False) as slow:
        assert fast.index is not None and slow.index is None
        for name in TABLES:
            assert len(slow.table(name)), name
            assert _same(fast.table(name), slow.table(name)), name
        assert fast.time_range() == slow.time_range()
        a = np.asarray(fast.attributes())
        assert {type(v) for v in a["value"].tolist()} >= {int, float, str}


def test_lineage_and_resolve_equal_the_partitions(indexed):
    with Run(indexed) as fast, Run(indexed, use_index=False) as slow:
        e = slow.entities()
        ckpt = e[e["kind"] == "checkpoint"][0]
        raw = e[e["kind"] == "raw"]["key"][0]
        gf, gs = graph(fast), graph(slow)
        assert gf._nodes is None  # read column-wise from the index, not decoded in full
        for spec in (ckpt["key"], f"{ckpt['rank']}:{ckpt['id']}", os.path.basename(raw), raw,
                     "save_checkpoint", "curation"):
            assert gf.resolve(spec).tolist() == gs.resolve(spec).tolist(), spec
        with pytest.raises(ValueError, match="no entity"):
            gf.resolve("no/such/thing")
        for spec, direction in ((ckpt["key"], "backward"), (raw, "forward")):
            lf, ls = lineage(fast, spec, direction), lineage(slow, spec, direction)
            assert _same(lf.nodes, ls.nodes) and _same(lf.edges, ls.edges)
        assert lineage(fast, ckpt["key"]).path(raw) == lineage(slow, ckpt["key"]).path(raw)
        assert gf.label(0) == gs.label(0)
        assert questions.derivation(fast, ckpt["key"]) == questions.derivation(slow, ckpt["key"])
        assert questions.produced(fast, ckpt["key"]) == questions.produced(slow, ckpt["key"])
        assert _same(gf.nodes, gs.nodes) and _same(gf.edges, gs.edges)  # full decode too


def test_queries_equal_the_partitions(indexed):
    with Run(indexed) as fast, Run(indexed, use_index=False) as slow:
        for table, kw in (("tasks", {"kind": "epoch", "where": ["duration_s>0"]}),
                          ("tasks", {"status": "error"}),
                          ("metrics", {"name": "val_*", "rank": [1]}),
                          ("tasks", {"where": ["max_abs>=20"]}),
                          ("entities", {"where": ["lr>=0.01"]}),
                          ("entities", {"where": ["hash~*"], "since": 0})):
            got = select(fast, table, **kw)
            assert len(got) and _same(got, select(slow, table, **kw)), (table, kw)


def test_index_file_is_not_a_partition(indexed):
    with Run(indexed) as run:
        assert not any(p.endswith(FILENAME) for p in run.all_partition_paths)
        s = summary(run)
    assert len(s["partitions"]) == 2 and not s["partition_errors"]


def test_selection_of_partitions_does_not_use_the_index(indexed):
    with Run(indexed, select=lambda paths: paths[:1]) as part:
        assert part.index is None
        assert set(part.tasks()["node"].tolist()) == {"node-a"}


def test_changed_partition_makes_the_index_stale(tmp_path, caplog):
    d = build_run(tmp_path, "run-stale")
    build(d)
    with Run(d) as run:
        assert run.index is not None
    part = os.path.join(d, "node-b.h5")
    with h5py.File(part, "r+") as f:  # a later change: recover, merge, a writer going on
        f.attrs["note"] = "changed"
    with caplog.at_level(logging.WARNING, "provhpc.post.index"), Run(d) as run:
        assert run.index is None
        assert "stale" in caplog.text and FILENAME in caplog.text
        with Run(d, use_index=False) as slow:
            assert _same(run.tasks(), slow.tasks())
    os.unlink(part)  # a partition gone: stale as well
    with Run(d) as run:
        assert run.index is None


def test_corrupt_index_is_ignored(tmp_path, caplog):
    d = build_run(tmp_path, "run-bad")
    with open(os.path.join(d, FILENAME), "wb") as fh:
        fh.write(b"not hdf5" * 100)
    with caplog.at_level(logging.WARNING, "provhpc.post.index"), Run(d) as run:
        assert run.index is None and len(run.tasks())
    assert "cannot open the run index" in caplog.text


def test_incomplete_partition_is_not_indexed(tmp_path):
    d = build_run(tmp_path, "run-open")
    with h5py.File(os.path.join(d, "node-a.h5"), "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(NotIndexable, match="node-a.h5: partition is not complete"):
        build(d)
    assert not os.path.exists(os.path.join(d, FILENAME))
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_mixed_values_round_trip(tmp_path):
    col = np.empty(9, object)
    col[:] = [1, 1.0, True, "1", float("nan"), "é,\"x\"", "", 1, "é,\"x\""]
    arr = np.zeros(9, [("v", "O"), ("n", "<i8")])
    arr["v"], arr["n"] = col, np.arange(9)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        put_table(f.create_group("t"), arr)
        st = StoredTable(f["t"], arr.dtype)
        assert _same(st.full(), arr)
        assert _same(st.rows([8, 2, 4]), arr[[8, 2, 4]])
        assert st.find("v", 1).tolist() == [0] and st.find("v", "é,\"x\"").tolist() == [5]
        assert st.find("v", "").tolist() == [6] and st.find("v", "x").tolist() == []
        assert st.codes("v").tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 5]


def test_cli_index(tmp_path, capsys):
    d = build_run(tmp_path / "out", "run-cli")
    assert cli.main(["index", str(tmp_path / "out"), "--json"]) == 0  # a directory of runs
    res = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in res["runs"]] == ["run-cli"]
    assert res["runs"][0]["path"] == os.path.join(d, FILENAME) and res["runs"][0]["bytes"] > 0
    assert cli.main(["index", str(tmp_path / "nothing")]) == 2
    assert "no such run" in capsys.readouterr().err
