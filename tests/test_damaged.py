"""Issue 13 point 1: every verb is honest about what it could not read.

A run of two partitions, one of them damaged in each of the ways a file goes bad
(truncated, random bytes, a foreign HDF5 file, an unknown schema version, a wrong record
dtype, string ids beyond the string table, a string table beyond its heap).  Every
reading verb (and ``recover``, which checks every partition's contents) names the damaged
partition on stderr, exits non-zero, prints no traceback, and ``export`` writes no
document that silently lacks the node.

A hypothesis test mutates the bytes of one partition at random (and cuts it short):
the reader never hangs, never raises anything but a recorded ``PartitionError`` for
that file, and the other partition still answers.  It found that HDF5's SWMR reader
retries a bad checksum 100 times with a doubling sleep (``open_partition`` bounds it
to about 1 s).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import h5py
import numpy as np
import pytest
from _post_runs import build_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provhpc.cli import main
from provhpc.post.reader import open_path, summary


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    build_run(d, "run-1")
    return d / "run-1"


def _rewrite(path, name, data):
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data, maxshape=(None,))


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 3)
    elif how == "random-bytes":
        with open(path, "wb") as fh:
            fh.write(np.random.default_rng(0).bytes(4096))
    elif how == "foreign-h5":
        os.unlink(path)
        with h5py.File(path, "w") as f:
            f["data"] = np.arange(10)
    elif how == "schema-99":
        with h5py.File(path, "r+") as f:
            f.attrs["schema_version"] = 99
    elif how == "record-dtype":
        with h5py.File(path, "r") as f:
            recs = f["records"][:]
        narrow = np.zeros(len(recs), [(n, recs.dtype[n]) for n in recs.dtype.names
                                      if n != "fval"])
        for n in narrow.dtype.names:
            narrow[n] = recs[n]
        _rewrite(path, "records", narrow)
    elif how == "string-ids":
        with h5py.File(path, "r+") as f:
            recs = f["records"][:]
            recs["name"][len(recs) // 2] = 10**6
            f["records"][:] = recs
    elif how == "string-heap":
        with h5py.File(path, "r+") as f:
            idx = f["strings"][:]
            idx["offset"][-1] = 10**9
            f["strings"][:] = idx
    else:
        raise AssertionError(how)


DAMAGE = ["truncated", "random-bytes", "foreign-h5", "schema-99", "record-dtype",
          "string-ids", "string-heap"]
VERBS = {
    "summary": ["summary", "{run}"],
    "ls": ["ls", "{out}"],
    "query-tasks": ["query", "{run}", "tasks"],
    "query-metrics": ["query", "{run}", "metrics"],
    "query-failures": ["query", "{run}", "failures"],
    "query-epochs": ["query", "{run}", "epochs"],
    "lineage": ["lineage", "{run}", "checkpoints/model-0.05.npy"],
    "export": ["export", "{run}", "--format", "prov-json", "-o", "{out}/x.prov.json"],
    "report": ["report", "{run}", "-o", "{out}/report"],
    "index": ["index", "{run}"],
    "recover": ["recover", "{run}"],
}


# ls only opens each partition (file, schema, dtypes); summary and the others read it
CASES = [(how, verb) for how in DAMAGE for verb in VERBS
         if not (verb == "ls" and how.startswith("string-"))]


@pytest.mark.parametrize("how,verb", CASES)
def test_every_verb_names_a_damaged_partition_and_fails(pristine, tmp_path, capsys, how,
                                                        verb):
    run = tmp_path / "run-1"
    shutil.copytree(pristine, run)
    bad = run / "node-b.h5"
    _damage(str(bad), how)
    argv = [a.format(run=run, out=tmp_path) for a in VERBS[verb]]
    if verb == "report":
        pytest.importorskip("matplotlib")
    if verb == "export":
        pytest.importorskip("prov")
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc != 0, (argv, cap.out, cap.err)
    assert str(bad) in cap.err, cap.err
    assert "Traceback" not in cap.err + cap.out
    assert not (tmp_path / "x.prov.json").exists(), "export wrote a document lacking a node"
    if verb == "recover":  # a file that opens is left in place, one that does not set aside
        assert os.path.exists(bad) or os.path.exists(str(bad) + ".corrupt")
        assert ": ok" not in [ln for ln in cap.out.splitlines() if str(bad) in ln][0]
    if verb == "summary":  # the table itself says it lacks a node, not only stderr
        assert f"unreadable: 1 partition(s) ({bad})" in cap.out, cap.out


@pytest.mark.parametrize("how", DAMAGE)
def test_the_api_raises_partition_error_naming_the_file(pristine, tmp_path, how):
    run = tmp_path / "run-1"
    shutil.copytree(pristine, run)
    bad = run / "node-b.h5"
    _damage(str(bad), how)
    with open_path(str(run)) as r:
        r.tasks()
        assert str(bad) in r.errors and len(r.errors) == 1, r.errors
        assert set(r.tasks()["node"].tolist()) == {"node-a"}  # the good one still answers


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_partition_is_an_error_never_a_crash_or_a_hang(pristine, tmp_path, data):
    size = os.path.getsize(pristine / "node-b.h5")
    where = st.one_of(st.integers(0, 4095), st.integers(0, size - 1))  # metadata, anywhere
    edits = data.draw(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1,
                               max_size=16), label="edits")
    cut = data.draw(st.one_of(st.none(), st.integers(0, size)), label="cut")
    d = tempfile.mkdtemp(dir=tmp_path)
    try:
        run = os.path.join(d, "run-1")
        shutil.copytree(pristine, run)
        bad = os.path.join(run, "node-b.h5")
        with open(bad, "r+b") as fh:
            for pos, byte in edits:
                fh.seek(pos)
                fh.write(bytes([byte]))
            if cut is not None:
                fh.truncate(cut)
        with open_path(run) as r:
            for name in ("tasks", "entities", "metrics", "attributes", "relations"):
                r.table(name)
            r.time_range()
            s = summary(r)
            assert set(r.errors) <= {bad}, r.errors  # only the mutated file, by name
            assert "node-a" in set(r.tasks()["node"].tolist())
            assert "node-a" in s["nodes"], s["nodes"]
    finally:
        shutil.rmtree(d)


PARTIAL = {
    "summary": ["summary", "{run}", "--partial", "--json"],
    "query-tasks": ["query", "{run}", "tasks", "--partial", "--json"],
    "query-capture": ["query", "{run}", "capture", "--partial", "--json"],
    "lineage": ["lineage", "{run}", "checkpoints/model-0.05.npy", "--partial", "--json"],
    "export": ["export", "{run}", "--format", "prov-json", "-o", "{out}/x.prov.json",
               "--partial"],
    "report": ["report", "{run}", "-o", "{out}/report", "--partial"],
}


@pytest.mark.parametrize("verb", PARTIAL)
def test_partial_answers_are_marked_with_the_missing_partition(pristine, tmp_path, capsys,
                                                               verb):
    """--partial goes on with the readable node, exits 0, still names the damaged file on
    stderr, and marks the answer: partial and missing_partitions in the JSON, the bundle
    attributes of the PROV document, the report page."""
    if verb == "report":
        pytest.importorskip("matplotlib")
    if verb == "export":
        pytest.importorskip("prov")
    run = tmp_path / "run-1"
    shutil.copytree(pristine, run)
    bad = run / "node-b.h5"
    _damage(str(bad), "truncated")
    rc = main([a.format(run=run, out=tmp_path) for a in PARTIAL[verb]])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert str(bad) in cap.err
    if verb == "export":
        doc = (tmp_path / "x.prov.json").read_text()
        assert "provhpc:missing_partitions" in doc and str(bad) in doc
    elif verb == "report":
        page = (tmp_path / "report" / "index.html").read_text()
        assert "Partial report" in page and str(bad) in page
    else:
        res = json.loads(cap.out)
        assert res["partial"] is True and res["missing_partitions"] == [str(bad)], res
