"""The C hot path (provhpc/capture/_fast.c) writes exactly what the pure-Python path writes.

The same program runs twice in fresh interpreters: once with the extension, once
with it blocked (``sys.modules["provhpc.capture._fast"] = None``: what a machine without a
compiler gets).  Every record must match field by field, times aside.  The program
walks the fast cases and every case the C code hands back to Python: first use of a
string, values that need coercion, ``used=``, an exception in the block, nesting,
another thread, a full slot, capture off.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import provhpc
from provhpc.capture import api
from provhpc.post.reader import Run

PROGRAM = r'''
import json, os, sys, threading
import numpy as np
if sys.argv[2] == "python":
    sys.modules["provhpc.capture._fast"] = None
import provhpc
from provhpc.capture import api
from provhpc.testing import capture

ENTS = []  # what data() returned: compared between the two paths

def walk():
    raw = provhpc.data("data/raw.npy", kind="raw")
    for i in range(3):  # the first round interns the strings (Python), the others not (C)
        with provhpc.task("preprocess", a=1, b=2.0, c="x", flag=True) as t:
            t.generated(y=2, z=2.0, label="x", ok=False)
        with provhpc.task("preprocess", used=[raw], a=i) as t:
            t.generated(raw, y=i)
        with provhpc.stage("train"):
            with provhpc.epoch(i):
                with provhpc.task("step", lr=0.1) as t:
                    t.generated(loss=1.0 / (i + 1), big=2**70, arr=[1, 2], none=None)
                    # metric: the first use of a name (Python), then C; and every case C
                    # hands back: an int or a string value, a float or a huge step, keywords
                    provhpc.metric("loss", 1.0 / (i + 1), i)
                    provhpc.metric("loss", 0.5)
                    provhpc.metric("loss", 0.25, None)
                    provhpc.metric("acc", i)
                    provhpc.metric("acc", "n/a")
                    provhpc.metric("loss", 0.1, step=i)
                    provhpc.metric(name="loss", value=0.1)
                    provhpc.metric("loss", 0.2, 1.5)
                    provhpc.metric("loss", 0.3, 2**70)
                    provhpc.metric("loss", 0.3, -2**63)
                    provhpc.metric("loss", float("nan"), True)
            provhpc.metric("loss", 0.7, i)  # in the stage
        with provhpc.stage("validate", used=[raw], split="val"):  # stage and epoch in C,
            with provhpc.epoch(i, lr=0.1):                       # and what C hands back
                pass
            with provhpc.epoch(np.int64(i)):
                pass
            with provhpc.epoch():
                pass
        for bad in (lambda: provhpc.epoch(True), lambda: provhpc.epoch(2**70),
                    lambda: provhpc.epoch(-2**63), lambda: provhpc.stage(""),
                    lambda: provhpc.stage("x", kind="y")):
            try:
                bad()
            except (ValueError, TypeError):
                pass
    provhpc.metric("loss", 0.9, 0)  # in the run
    # data: an existing file (a fixed size and mtime in both runs), a missing one, a
    # domain object, an id; the first use of each string (Python), then C; and every case
    # C hands back: a PathLike, derived_from, hash, attributes, a NUL in the path
    made = os.path.join(sys.argv[1], "made.txt")
    with open(made, "w") as fh:
        fh.write("twelve bytes")
    os.utime(made, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    import pathlib
    with provhpc.task("load") as t:
        for i in range(3):
            for e in (provhpc.data(made), provhpc.data(made, kind="shard"),
                      provhpc.data(made + ".missing"), provhpc.data("cat/dog", kind="domain"),
                      provhpc.data("sample-17", kind="shard"), provhpc.data(pathlib.Path(made)),
                      provhpc.data(made, kind="raw", derived_from=raw),
                      provhpc.data(made, hash=True), provhpc.data("id-" + str(i), fold=i),
                      provhpc.data("nul\0.txt")):
                ENTS.append([e.key.replace(sys.argv[1], "DIR"), e.kind, e.id > 0, e.fp])
            t.used(provhpc.data(made))
            # attribute and Activity.metric: C for plain values, Python for the rest
            for v in (0.5, 3, True, "x", "new-" + str(i), 2**70, None, [1], np.float32(1)):
                provhpc.attribute("lr", v)
                t.metric("loss", v)
            provhpc.attribute(name="lr", value=0.1)
            t.metric("loss", 0.5, i)
            t.metric("loss", 0.5, step=i)
            t.metric("loss", 0.5, 1.5)
            t.metric(name="loss", value=0.5)
            provhpc.task("never started").metric("loss", 0.5)
            # relations (C when the relation is interned) and the hyperparameter set
            provhpc.used(raw)
            provhpc.generated(raw, y=i)
            provhpc.data("derived.txt").derived_from(raw).member(raw)
            provhpc.hyperparameters({"lr": 0.1}, batch=32)
    for bad in (lambda: provhpc.data(""), lambda: provhpc.data(1),
                lambda: provhpc.data("x", kind=""), lambda: provhpc.data("x", "y"),
                lambda: provhpc.attribute("", 1.0), lambda: provhpc.attribute(1, 1.0),
                lambda: provhpc.attribute("lr"),
                lambda: provhpc.task("t").metric("", 1.0)):
        try:
            bad()
        except (ValueError, TypeError) as exc:
            ENTS.append(type(exc).__name__)
    try:
        with provhpc.task("fails", a=1):
            raise KeyError("boom")
    except KeyError:
        pass
    with provhpc.task("named", a=1) as t:
        t.generated()
        t.generated(**{})
    t = provhpc.task(name="by keyword", a=1)
    with t:
        pass
    @provhpc.task
    def decorated(a, b, c=3):
        return {"y": a + b}
    for i in range(3):
        decorated(i, 2)
        decorated(i, b=2.0, c="x")

    class Model:
        @provhpc.task("fit")
        def fit(self, lr):
            return lr * 2

        @classmethod
        @provhpc.task
        def build(cls, width):
            return None

    m = Model()
    for i in range(2):
        m.fit(0.1)
        Model.build(8)

    @provhpc.epoch
    def one_epoch(data):
        return {1: "non-str key", "ignored": True}

    @provhpc.stage
    def evaluate():
        return provhpc.data("report.txt", kind="report")

    for i in range(3):
        one_epoch([1, 2])
        evaluate()

    @provhpc.task
    def broken(a):
        raise ValueError("bad input")

    for i in range(2):
        try:
            broken(i)
        except ValueError:
            pass

    @provhpc.task
    def bad_return():
        return {"": 1}  # an empty key: the recording raises inside the activity

    try:
        bad_return()
    except ValueError:
        pass
    def in_thread():
        with provhpc.task("preprocess", a=1) as t:
            t.generated(y=1)
            provhpc.metric("loss", 0.4, 3)
    th = threading.Thread(target=in_thread)
    th.start(); th.join()
    for i in range(200):  # fills slots: some calls find no room and take the Python path
        with provhpc.task("preprocess", a=i, b=2.0, c="x", flag=True) as t:
            t.generated(y=i, z=2.0, label="x", ok=False)
            provhpc.metric("loss", float(i), i)
    agent = api.set_agent(None)  # capture off: no-ops
    with provhpc.task("off", a=1) as t:
        t.generated(y=1)
        provhpc.metric("loss", 1.0, 1)
        e = provhpc.data(made)
        ENTS.append([e.key.replace(sys.argv[1], "DIR"), e.kind, e.id, e.fp])
    api.set_agent(agent)

with capture(sys.argv[1], run_id="fast-" + sys.argv[2], slot_records=64, slots=64,
             telemetry_interval=0):
    walk()
print(json.dumps({"c": api._fast is not None, "entities": ENTS}))
'''

FIELDS = ("kind", "vtype", "flags", "rank", "id", "ref", "name", "sval", "step", "ival", "fval")


def _run(tmp_path, mode):
    script = tmp_path / "walk.py"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVHPC_")}
    p = subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with Run(str(tmp_path / f"fast-{mode}")) as run:
        recs = np.concatenate([p.records() for p in run.partitions])
        strings = run.partitions[0].strings
    return json.loads(p.stdout.strip().splitlines()[-1]), recs, strings


@pytest.mark.skipif(api._fast is None, reason="the C extension is not built here: "
                    "only the Python path exists, which every other test covers")
def test_c_and_python_paths_write_the_same_records(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "p").mkdir()
    used_c, c, c_strings = _run(tmp_path / "c", "c")
    used_p, p, p_strings = _run(tmp_path / "p", "python")
    assert used_c["c"] is True and used_p["c"] is False
    assert used_c["entities"] == used_p["entities"]  # the same Entity objects returned
    fps = [e[3] for e in used_c["entities"] if isinstance(e, list) and e[0] == "DIR/made.txt"]
    assert [12, 1_700_000_000_123_456_789] in fps and None in fps  # stat-ed; capture off
    assert len(c) == len(p) > 2000
    # one order for both (slots of the two threads may be stored in another order)
    key = ("ival", "vtype", "sval", "name", "ref", "kind", "id", "rank")
    c = c[np.lexsort([c[k] for k in key])]
    p = p[np.lexsort([p[k] for k in key])]
    for f in FIELDS:
        if f in ("name", "sval"):  # string ids may differ: compare the strings
            a, b = c_strings[c[f]], p_strings[p[f]]
            # the two copies of the program differ by their directory only (an exception's
            # 'where' names the file)
            a = [str(x).replace(str(tmp_path / "c"), "DIR") for x in a.tolist()]
            b = [str(x).replace(str(tmp_path / "p"), "DIR") for x in b.tolist()]
            assert a == b, f
        else:
            assert np.array_equal(c[f], p[f], equal_nan=True), f


def test_decorated_function_keeps_its_identity(tmp_path):
    """``@task`` returns a wrapper that looks, binds and pickles like the function."""
    import pickle

    from provhpc.testing import capture

    with capture(tmp_path, telemetry_interval=0) as cap:
        m = _Model()
        assert m.fit(0.5) == 1.0 and _twice(3) == 6
        assert _Model.fit.__name__ == "fit" and _twice.__doc__ == "Twice x."
        assert _twice.__wrapped__(4) == 8 and _twice.__qualname__ == "_twice"
        assert pickle.loads(pickle.dumps(_twice)) is _twice
    starts = cap.records("activity_start")
    assert cap.strings(starts["name"]) == ["_Model.fit", "_twice"]
    params = cap.records("attribute")
    assert sorted(cap.strings(params["name"])) == ["lr", "return", "return", "x"]


class _Model:
    @provhpc.task
    def fit(self, lr):
        return lr * 2


@provhpc.task
def _twice(x):
    """Twice x."""
    return x * 2


@pytest.mark.skipif(api._fast is None, reason="the C extension is not built")
def test_the_segment_map_closes_when_the_agent_ends(tmp_path):
    """C holds the segment's buffer and the cursor while it writes for an agent; the
    agent's close releases them, so its memory map really closes (not kept open by an
    export, which mmap.close() would refuse)."""
    from provhpc.testing import capture

    with capture(tmp_path) as cap:
        provhpc.metric("loss", 0.5, step=1)  # the C path: it now holds the agent's buffers
        agent = cap.agent
        assert not agent.mm.closed
    assert agent.mm.closed


def test_a_later_agent_in_the_process_gets_its_own_string_ids(tmp_path):
    """C remembers the string ids it looked up; the next agent of the process numbers its
    strings afresh, so nothing remembered from the first may name its records."""
    from provhpc.testing import capture

    names = ("preprocess", "lr", "y", "loss")
    with capture(tmp_path / "first", telemetry_interval=0) as first:
        for _ in range(3):  # the first round interns (Python), the others write in C
            with provhpc.task("preprocess", lr=0.1) as t:
                t.generated(y=2.0)
            provhpc.metric("loss", 0.5, 1)
    with capture(tmp_path / "second", telemetry_interval=0) as second:
        for other in ("a", "b", "c", "d", "e", "f"):  # other strings take the first ids
            provhpc.attribute(other, 1)
        for _ in range(3):
            with provhpc.task("preprocess", lr=0.1) as t:
                t.generated(y=2.0)
            provhpc.metric("loss", 0.5, 1)
    for cap in (first, second):
        starts = cap.records("activity_start")
        assert cap.strings(starts["name"]) == ["preprocess"] * 3
        attrs = cap.records("attribute")
        got = [n for n in cap.strings(attrs["name"]) if n in names]
        assert got == ["lr", "y"] * 3
        assert cap.strings(cap.records("metric")["name"]) == ["loss"] * 3
