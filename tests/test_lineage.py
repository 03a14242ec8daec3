"""Lineage closures in a run and across the runs of a directory."""

import os

import numpy as np
import pytest
from _post_runs import build_run, write_file

import provhpc
from provhpc.post.lineage import graph, lineage
from provhpc.testing import capture


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return provhpc.open(build_run(tmp_path_factory.mktemp("l"), "run-l"))


def _names(lin):
    return set(lin.nodes["name"].tolist())


def test_backward_forward_and_depth(run):
    ckpt = run.entities()[run.entities()["kind"] == "checkpoint"]["key"][0]
    back = lineage(run, ckpt)
    assert {"save_checkpoint", "hyperparameters", "curated/rank0", "curation"} <= _names(back)
    assert any(n.endswith("raw.npy") for n in _names(back))
    assert "curated/rank1" not in _names(back) and back.ranks == [0]
    one = lineage(run, ckpt, depth=1)
    assert _names(one) == {ckpt, "save_checkpoint", "hyperparameters", "curated/rank0"}
    raw = [n for n in _names(back) if n.endswith("raw.npy")][0]
    fwd = lineage(run, raw, "forward")
    # the raw file is one entity for both ranks (same path and hash)
    assert {"curated/rank0", "curated/rank1", ckpt} <= _names(fwd)
    assert set(fwd.activities()["rank"]) == {0, 1}


def test_resolve_by_id_path_and_name(run):
    e = run.entities()
    ck = e[e["kind"] == "checkpoint"][0]
    g = graph(run)
    by_id = g.resolve(f"{ck['rank']}:{ck['id']}")
    assert g.resolve(ck["key"]).tolist() == by_id.tolist()
    assert g.resolve(os.path.basename(ck["key"])).tolist() == by_id.tolist()
    assert set(g.nodes["name"][g.resolve("save_checkpoint")]) == {"save_checkpoint"}
    with pytest.raises(ValueError, match="no entity"):
        g.resolve("no/such/thing")


def test_path_chain(run):
    e = run.entities()
    ckpt = e[e["kind"] == "checkpoint"]["key"][0]
    raw = e[e["kind"] == "raw"]["key"][0]
    chain = lineage(run, ckpt).path(raw)
    g = graph(run)
    assert [rel for _, rel, _ in chain] == ["wasDerivedFrom", "wasDerivedFrom"]
    assert g.nodes["name"][chain[0][0]] == ckpt and g.nodes["name"][chain[-1][2]] == raw


def test_cross_run_lineage(tmp_path):
    """curation -> training -> inference in one directory: one lineage graph."""
    raw = write_file(str(tmp_path / "data" / "raw.npy"), 1)
    curated = str(tmp_path / "data" / "curated.npy")
    with capture(tmp_path, run_id="1-curation", node="n"):
        with provhpc.stage("curation") as s:
            r = provhpc.data(raw, kind="raw", hash=True)
            s.used(r)
            write_file(curated, 2)
            s.generated(provhpc.data(curated, kind="dataset", hash=True, derived_from=[r]))
    with capture(tmp_path, run_id="2-training", node="n"):
        with provhpc.stage("train") as s:
            c = provhpc.data(curated, kind="dataset", hash=True)
            s.used(c)
            model = write_file(str(tmp_path / "model.npy"), 3)
            s.generated(provhpc.data(model, kind="model", hash=True, derived_from=[c]))
            provhpc.data("split/validation", kind="split")
    with capture(tmp_path, run_id="3-inference", node="n"):
        with provhpc.stage("inference") as s:
            m = provhpc.data(model, kind="model", hash=True)
            s.used(m)
            s.generated(provhpc.data("predictions/out", kind="predictions", derived_from=[m]))
            provhpc.data("split/validation", kind="split")
    coll = provhpc.open(tmp_path)
    back = lineage(coll, "predictions/out")
    assert set(back.nodes["run"]) == {"1-curation", "2-training", "3-inference"}
    assert raw in _names(back) and {"curation", "train", "inference"} <= _names(back)
    chain = back.path(raw)
    assert [rel for _, rel, _ in chain] == ["wasDerivedFrom"] * 3
    fwd = lineage(coll, raw, "forward")
    assert "predictions/out" in _names(fwd)
    # a key without hash or URI is run-local: the two split/validation stay apart
    g = graph(coll)
    assert (np.asarray(g.nodes["name"]) == "split/validation").sum() == 2
    # a changed file (same path, other content) is another entity
    write_file(curated, 5)
    with capture(tmp_path, run_id="4-retrain", node="n"):
        with provhpc.stage("train") as s:
            s.used(provhpc.data(curated, kind="dataset", hash=True))
    g2 = graph(provhpc.open(tmp_path))
    assert (np.asarray(g2.nodes["name"]) == curated).sum() == 2
