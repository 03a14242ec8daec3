"""Issue 15 point 1 (part): a file links across runs by its path and fingerprint.

The natural program -- ``provhpc.data("curated.npy")`` in the curation run and the same
call in the training run, no hash asked for -- gives one entity: the lineage of the
training run's model reaches the curation run's raw file.  A file rewritten between
runs is a new version, linked to the earlier one as a revision, never merged with it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import provhpc
from provhpc.post.lineage import graph, lineage
from provhpc.post.reader import open_path
from provhpc.testing import capture


def _curate(out, run_id, d, seed):
    with capture(out, run_id=run_id):
        raw = provhpc.data(os.path.join(d, f"raw{seed}.npy"), kind="raw")
        with provhpc.stage("curation", used=[raw]) as st:
            np.save(os.path.join(d, "curated.npy"), np.arange(8) * seed)
            cur = provhpc.data(os.path.join(d, "curated.npy"), kind="dataset",
                               derived_from=[raw])
            st.generated(cur)


def _train(out, run_id, d):
    with capture(out, run_id=run_id):
        cur = provhpc.data(os.path.join(d, "curated.npy"), kind="dataset")
        with provhpc.stage("train", used=[cur]) as st:
            np.save(os.path.join(d, f"model-{run_id}.npy"), np.zeros(3))
            model = provhpc.data(os.path.join(d, f"model-{run_id}.npy"), kind="model",
                                 derived_from=[cur])
            st.generated(model)


@pytest.fixture
def runs(tmp_path):
    d = str(tmp_path / "data")
    os.makedirs(d)
    for seed in (1, 2):
        np.save(os.path.join(d, f"raw{seed}.npy"), np.ones(4) * seed)
    out = tmp_path / "prov"
    _curate(out, "a-curate", d, 1)
    _train(out, "b-train", d)
    _curate(out, "c-curate", d, 2)  # rewrites curated.npy: a new version
    _train(out, "d-train", d)
    return out, d


def test_the_natural_program_links_across_runs(runs):
    out, d = runs
    with open_path(str(out)) as coll:
        lin = lineage(coll, os.path.join(d, "model-b-train.npy"))
        names = {(n["run"], os.path.basename(n["name"])) for n in lin.nodes.to_dicts()}
        assert ("a-curate", "raw1.npy") in names, names  # across runs, no hash option
        assert ("a-curate", "curation") in {(n["run"], n["name"]) for n in
                                             lin.nodes.to_dicts()}
        assert not any(os.path.basename(n["name"]) == "raw2.npy"
                       for n in lin.nodes.to_dicts())


def test_a_rewritten_file_is_a_revision_not_the_same_entity(runs):
    out, d = runs
    with open_path(str(out)) as coll:
        g = graph(coll)
        nodes = g.nodes.to_dicts()
        curated = [n for n in nodes if os.path.basename(str(n["name"])) == "curated.npy"]
        assert len(curated) == 2, curated  # two versions of one path
        assert {c["run"] for c in curated} == {"a-curate", "c-curate"}
        edges = g.edges.to_dicts()
        (rev,) = [e for e in edges if e["relation"] == "wasRevisionOf"]
        newer = next(c for c in curated if c["run"] == "c-curate")
        older = next(c for c in curated if c["run"] == "a-curate")
        assert (rev["src"], rev["dst"]) == (newer["node"], older["node"])
        # the second training run used the new version: its lineage reaches raw2
        lin = lineage(coll, os.path.join(d, "model-d-train.npy"))
        names = {os.path.basename(str(n["name"])) for n in lin.nodes.to_dicts()}
        assert "raw2.npy" in names


def test_the_multi_workflow_example_links_without_hashes(tmp_path, venv_bin, clean_env):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([os.path.join(venv_bin, "python"),
                    os.path.join(root, "examples", "multi_workflow.py"), "--out", "mw"],
                   cwd=tmp_path, env=clean_env, check=True, capture_output=True, timeout=120)
    with open_path(str(tmp_path / "mw")) as coll:
        assert len(coll.runs) == 3
        assert all((np.asarray(r.entities())["hash"] == "").all() for r in coll.runs)
        lin = lineage(coll, "predictions/predictions.npy")
        nodes = lin.nodes.to_dicts()
        runs = {n["run"] for n in nodes if n["type"] == "activity"}
        assert len(runs) == 3, runs  # inference <- training <- curation
        assert {os.path.basename(str(n["name"])) for n in nodes} >= {
            "raw_0.npy", "curated.npy", "logreg.npy"}


def test_lineage_explain_says_why_records_of_two_runs_are_one(runs, capsys):
    import json

    from provhpc.cli import main

    out, d = runs
    assert main(["lineage", str(out), os.path.join(d, "model-b-train.npy"), "--explain",
                 "--json"]) == 0
    joins = json.loads(capsys.readouterr().out)["joins"]
    (cur,) = [j for j in joins if j["name"].endswith("curated.npy")]
    assert cur["runs"] == ["a-curate", "b-train"]
    assert cur["rule"].startswith("the same path, size and modification time")


def test_a_file_declared_before_it_is_written_is_fingerprinted_when_done(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "curated.npy")
    out = tmp_path / "prov"
    with capture(out, run_id="a-curate"):
        cur = provhpc.data(path, kind="dataset")  # no file yet: no fingerprint
        with provhpc.stage("curation") as st:
            st.generated(cur)
            np.save(path, np.arange(5))  # written after it was declared
    with capture(out, run_id="b-train"):
        used = provhpc.data(path, kind="dataset")
        with provhpc.stage("train", used=[used]):
            pass
    with open_path(str(out)) as coll:
        g = graph(coll)
        curated = [n for n in g.nodes.to_dicts() if str(n["name"]).endswith("curated.npy")]
        assert len(curated) == 1, curated  # the declared output and the later input: one
        assert g.explain(curated[0]["node"])["runs"] == ["a-curate", "b-train"]
