"""Issue 15 point 4: a run (or a directory of runs) exports as a Process Run RO-Crate,
built with ``rocrate``; the crate loads back with ``rocrate`` and holds the profile's
entities."""

from __future__ import annotations

import os

import pytest
from _post_runs import build_run

from provhpc.cli import main
from provhpc.post.rocrate import PROFILE

rocrate = pytest.importorskip("rocrate.rocrate")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("crate")
    build_run(d, "run-1", lr=0.05, fail_rank=1)  # a task of rank 1 fails (and is caught)
    build_run(d, "run-2", lr=0.08)  # the same raw file: one File entity links the runs
    return d


def _ids(v):
    return [x.id for x in (v if isinstance(v, list) else [v])]


def test_a_directory_of_runs_is_one_crate(two, tmp_path):
    out = tmp_path / "crate"
    assert main(["export", str(two), "--format", "ro-crate", "-o", str(out)]) == 0
    crate = rocrate.ROCrate(str(out))  # loads back
    assert PROFILE in _ids(crate.root_dataset["conformsTo"])
    actions = {e.id: e for e in crate.get_entities() if e.type == "CreateAction"}
    runs = {i: a for i, a in actions.items() if i.startswith("#run-")}
    assert set(runs) == {"#run-run-1", "#run-run-2"}
    def ref(v):  # rocrate gives an unresolved @id back as a string
        return v["@id"] if isinstance(v, dict) else getattr(v, "id", v)

    status = {i: ref(a["actionStatus"]) for i, a in runs.items()}
    # run-1's rank 1 had a failed task, caught: both runs ended completed
    assert status == {"#run-run-1": "http://schema.org/CompletedActionStatus",
                      "#run-run-2": "http://schema.org/CompletedActionStatus"}
    for a in runs.values():
        assert a["startTime"] and a["endTime"]
        assert a["instrument"].type == "SoftwareApplication"
        assert a["agent"].type == "Person" and a["participant"].type == "Organization"
    stages = [a for i, a in actions.items() if i.startswith("#stage-run-2-")]
    assert {a["name"].split()[1] for a in stages} >= {"curation", "train", "validate"}
    assert all(a["isPartOf"].id == "#run-run-2" for a in stages)
    # the raw file both runs used is one File entity, with its content hash
    raw = [e for e in crate.get_entities() if e.type == "File" and "raw.npy" in e.id]
    assert len(raw) == 1 and raw[0]["blake2b"]
    for a in runs.values():
        assert raw[0].id in _ids(a["object"])
    hp = {(a.id, e["name"]): e["value"] for a in runs.values() for e in a["object"]
          if e.type == "PropertyValue"}
    assert hp[("#run-run-1", "lr")] == 0.05 and hp[("#run-run-2", "lr")] == 0.08
    models = {e.id for a in runs.values() for e in (a.get("result") or [])}
    assert any("model-0.05" in m for m in models) and any("model-0.08" in m for m in models)
    assert not os.path.exists(out / "data")  # files stay where they are by default


def test_with_files_copies_them_into_the_crate(two, tmp_path):
    out = tmp_path / "crate"
    assert main(["export", str(two / "run-2"), "--format", "ro-crate", "-o", str(out),
                 "--with-files"]) == 0
    crate = rocrate.ROCrate(str(out))
    copied = [e for e in crate.get_entities() if e.type == "File" and not
              e.id.startswith("file://")]
    assert copied and all(os.path.isfile(out / e.id) for e in copied)
