"""The misuse table: every entry point, run on the C path and on the forced-Python path.

Each row is one call written as a user would write it (``task`` is the activity of
an enclosing ``with provhpc.task("outer") as task`` block).  The table runs in a
subprocess twice, once with the C extension and once with it blocked
(``sys.modules["provhpc.capture._fast"] = None``), and each outcome must be the same
on both paths: the same exception type with a message naming the argument, or, for
values the coercion rules take (docs/reliability.md, "Bad values"), the same
stored records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from provhpc.capture import api

pytestmark = pytest.mark.timeout(120)

# (call, outcome): outcome is the text the ValueError must contain, or None when the
# call is not misuse (the value is stored by a coercion rule, identically on both paths)
TABLE = [
    # metric, module level and on an activity
    ('provhpc.metric("", 1.0)', "metric name"),
    ('provhpc.metric(None, 1.0)', "metric name"),
    ('provhpc.metric(5, 1.0)', "metric name"),
    ('provhpc.metric("m", "n/a")', "'m'"),
    ('provhpc.metric("m", BadFloat())', "'m'"),
    ('provhpc.metric("m", np.ones(3))', "'m'"),
    ('provhpc.metric("m", 1.0, step=2**70)', "'m': step 1180591620717411303424 is outside"),
    ('provhpc.metric("m", 1.0, step=-2**63)', "'m': step -9223372036854775808 is outside"),
    ('provhpc.metric("m", 1.0, step=1.5)', "'m': step float is not an integer"),
    ('provhpc.metric("m", 1.0, step=float("nan"))', "'m': step float is not an integer"),
    ('provhpc.metric("m", 1.0, step=2.0**70)', "'m': step float is not an integer"),
    ('provhpc.metric("m", 1.0, step="3")', "'m': step str is not an integer"),
    ('provhpc.metric("m", 1.0, step=np.int32(3))', None),
    ('task.metric("", 1.0)', "metric name"),
    ('task.metric("m", "n/a")', "'m'"),
    ('task.metric("m", 1.0, step=2**70)', "'m': step 1180591620717411303424 is outside"),
    ('task.metric("m", 1.0, step=-2**63)', "'m': step -9223372036854775808 is outside"),
    ('task.metric("m", 1.0, step=1.5)', "'m': step float is not an integer"),
    ('task.metric("m", 1.0, step="3")', "'m': step str is not an integer"),
    # activities: names, kinds, epoch indexes, parameters
    ('provhpc.task("")', "task name"),
    ('provhpc.task(7)', "task name"),
    ('provhpc.stage("")', "provhpc: stage must be a non-empty string"),
    ('provhpc.stage(3)', "provhpc: stage must be a non-empty string"),
    ('provhpc.epoch(2**70)', "epoch index 1180591620717411303424 is outside int64"),
    ('provhpc.epoch(-2**63)', "epoch index -9223372036854775808 is outside int64"),
    ('provhpc.epoch("3")', "epoch index"),
    ('provhpc.epoch(1.5)', "epoch index"),
    ('provhpc.task("t").end()', "'t' ended without a start"),
    ('provhpc.task("t", lr=2**70).start()', None),
    ('provhpc.task("t", lr=-2**63 - 1).start()', None),
    ('provhpc.task("t", **{"": 1}).start()', "attribute names"),
    ('provhpc.task("t", lr=BadRepr()).start()', None),
    ('provhpc.task("t", used=5).start()', "expected an entity"),
    # attributes and generated values, module level, on an activity, on an entity
    ('provhpc.attribute("", 1)', "attribute names"),
    ('provhpc.attribute(5, 1)', "attribute names"),
    ('provhpc.attribute("big", 2**70)', None),
    ('provhpc.attribute("small", -2**63 - 1)', None),
    ('provhpc.attribute("arr", np.ones((3, 4)))', None),
    ('task.attribute("", 1)', "attribute names"),
    ('task.attributes(big=2**64)', None),
    ('task.generated(big=2**70, neg=-2**63 - 1)', None),
    ('task.generated(**{"": 1})', "attribute names"),
    ('task.generated(5)', "expected an entity"),
    ('task.used("")', "data identity"),
    ('task.used(5)', "expected an entity"),
    ('provhpc.generated(big=2**70)', None),
    ('provhpc.generated(5)', "expected an entity"),
    ('provhpc.used(5)', "expected an entity"),
    ('provhpc.data("x.npy").attribute("", 1)', "attribute names"),
    ('provhpc.data("x.npy", size_limit=2**70)', None),
    # data and hyperparameters
    ('provhpc.data("")', "data identity"),
    ('provhpc.data(None)', "data identity"),
    ('provhpc.data("x", kind="")', "entity kind"),
    ('provhpc.hyperparameters({1: 2})', "got 1"),
    ('provhpc.hyperparameters({"": 2})', "attribute names"),
    ('provhpc.hyperparameters(lr=2**70)', None),
]

PROGRAM = r'''
import json, sys
if sys.argv[2] == "python":
    sys.modules["provhpc.capture._fast"] = None  # what a machine without a compiler runs
import numpy as np
import provhpc
from provhpc.capture import api
from provhpc.testing import capture

class BadFloat:
    def __float__(self):
        raise RuntimeError("float exploded")

class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")

calls = json.loads(sys.argv[3])
out = []
with capture(sys.argv[1], run_id="misuse-" + sys.argv[2], telemetry_interval=0) as cap:
    for i, call in enumerate(calls):
        with provhpc.task("outer", row=i) as task:
            try:
                eval(call)
                out.append(["ok", ""])
            except Exception as exc:
                out.append([type(exc).__name__, str(exc)])
    provhpc.metric("after", 1.0)  # capture goes on after every misuse
print(json.dumps({"c": api._fast is not None, "out": out}))
'''


def _run(tmp_path, path: str):
    prog = tmp_path / "misuse.py"
    prog.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVHPC_")}
    d = tmp_path / path
    d.mkdir()
    res = subprocess.run([sys.executable, str(prog), str(d), path,
                          json.dumps([c for c, _ in TABLE])],
                         capture_output=True, text=True, env=env, timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), d


def _stored(d):
    """Every record of the run but its times, in write order, strings as text."""
    from provhpc.post.reader import Run
    run_dir = d / f"misuse-{d.name}"
    with Run(str(run_dir)) as run:
        part = run.partitions[0]
        strings, recs = part.strings, part.records()
    return [(int(r["kind"]), int(r["vtype"]), int(r["flags"]), int(r["id"]), int(r["ref"]),
             strings[r["name"]], strings[r["sval"]], int(r["step"]), int(r["ival"]),
             float(r["fval"])) for r in recs]


def _went_on(stored) -> bool:
    """The metric written after the last misuse call is stored."""
    return any(r[0] == 7 and r[5] == "after" for r in stored)


@pytest.mark.skipif(api._fast is None, reason="the C extension is not built here: "
                    "there is only the Python path to compare (test_fast_path says so too)")
def test_misuse_table_same_on_c_and_python(tmp_path):
    c, c_dir = _run(tmp_path, "c")
    py, py_dir = _run(tmp_path, "python")
    assert c["c"] and not py["c"], "the two runs did not take the two paths"
    for (call, want), got_c, got_py in zip(TABLE, c["out"], py["out"]):
        assert got_c == got_py, f"{call}: C {got_c} but Python {got_py}"
        if want is None:
            assert got_c == ["ok", ""], f"{call}: not misuse, yet {got_c}"
        else:
            assert got_c[0] == "ValueError", f"{call}: {got_c}"
            assert want in got_c[1], f"{call}: {got_c[1]!r} does not name {want!r}"
    stored = _stored(c_dir)
    assert stored == _stored(py_dir), "the coerced values differ between C and Python"
    assert _went_on(stored), "capture did not go on after the misuse calls"


def test_misuse_table_python_path(tmp_path):
    """Where the C extension is not built, the Python path still meets the table."""
    py, py_dir = _run(tmp_path, "python")
    assert _went_on(_stored(py_dir)), "capture did not go on after the misuse calls"
    for (call, want), got in zip(TABLE, py["out"]):
        if want is None:
            assert got == ["ok", ""], f"{call}: not misuse, yet {got}"
        else:
            assert got[0] == "ValueError" and want in got[1], f"{call}: {got}"
