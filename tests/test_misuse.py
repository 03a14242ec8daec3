"""The misuse table: every entry point, with capture on (C path and forced-Python path) and
with capture off.

Each row is one call written as a user would write it (``task`` is the activity of
an enclosing ``with provhpc.task("outer") as task`` block).  The table runs in a
subprocess three times: capture on with the C extension, capture on with it blocked
(``sys.modules["provhpc.capture._fast"] = None``), and capture off.  The rule
(docs/format.md, "Values"): a *programming error* raises ValueError naming the argument,
the same on all three; *data* never raises: it is stored (coerced by the stated rules,
the same records on both capture paths) or, for a metric point whose value is not a
number or whose step is not an integer, dropped and counted as ``bad_value``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from provhpc.capture import api

pytestmark = pytest.mark.timeout(120)

# (call, outcome): outcome is the text the ValueError must contain (misuse), None when the
# value is stored by a coercion rule, or BAD when the point is dropped as bad_value
BAD = "bad_value"
TABLE = [
    # metric, module level and on an activity
    ('provhpc.metric("", 1.0)', "metric name"),
    ('provhpc.metric(None, 1.0)', "metric name"),
    ('provhpc.metric(5, 1.0)', "metric name"),
    ('provhpc.metric("m", "n/a")', BAD),
    ('provhpc.metric("m", BadFloat())', BAD),
    ('provhpc.metric("m", np.ones(3))', BAD),
    ('provhpc.metric("m", 1.0, step=2**70)', BAD),
    ('provhpc.metric("m", 1.0, step=-2**63)', BAD),
    ('provhpc.metric("m", 1.0, step=1.5)', BAD),
    ('provhpc.metric("m", 1.0, step=float("nan"))', BAD),
    ('provhpc.metric("m", 1.0, step=2.0**70)', BAD),
    ('provhpc.metric("m", 1.0, step="3")', BAD),
    ('provhpc.metric("m", 1.0, step=np.int32(3))', None),
    ('provhpc.metric("m", "1.0")', BAD),
    ('provhpc.metric("m", b"1")', BAD),
    ('provhpc.metric("m", None)', BAD),
    ('provhpc.metric("m", 1j)', BAD),
    ('provhpc.metric("m", np.array([0.5]))', None),
    ('provhpc.metric("m", np.array(0.25))', None),
    ('provhpc.metric("m", 1.0, step=True)', BAD),
    ('provhpc.metric("", "n/a")', "metric name"),
    ('task.metric(None, 1.0)', "metric name"),
    ('task.metric("", 1.0)', "metric name"),
    ('task.metric("m", "n/a")', BAD),
    ('task.metric("m", 1.0, step=2**70)', BAD),
    ('task.metric("m", 1.0, step=-2**63)', BAD),
    ('task.metric("m", 1.0, step=1.5)', BAD),
    ('task.metric("m", 1.0, step="3")', BAD),
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
    ('within(provhpc.task("t", used=5))', "expected an entity"),
    ('within(provhpc.task("t", used=[""]))', "data identity"),
    ('within(provhpc.task("t", **{"": 1}))', "attribute names"),
    ('within(provhpc.task("t", lr=0.5))', None),
    ('provhpc.task("t").generated(5)', "expected an entity"),
    ('provhpc.task("t").generated(**{"": 1})', "attribute names"),
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
import contextlib, json, sys
mode = sys.argv[2]
if mode == "python":
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

def within(activity):
    with activity:
        pass

def bad_values(cap):
    return 0 if cap is None else cap.agent.dropped.get("bad_value", 0)

calls = json.loads(sys.argv[3])
out = []
on = capture(sys.argv[1], run_id="misuse-" + mode, telemetry_interval=0)
with (contextlib.nullcontext() if mode == "off" else on) as cap:
    for i, call in enumerate(calls):
        before = bad_values(cap)
        with provhpc.task("outer", row=i) as task:
            try:
                eval(call)
                out.append(["ok", "", bad_values(cap) - before])
            except Exception as exc:
                out.append([type(exc).__name__, str(exc), bad_values(cap) - before])
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
    return json.loads(res.stdout.strip().splitlines()[-1]), d, res.stderr


def _check(call, want, got, on: bool):
    """One row's outcome against the table (``on``: capture was on, so drops are counted)."""
    kind, text, bad = got
    if want is None or want == BAD:
        assert kind == "ok", f"{call}: data must never raise, yet {got}"
        assert bad == (1 if want == BAD and on else 0), f"{call}: bad_value count {bad}"
    else:
        assert kind == "ValueError", f"{call}: misuse must raise ValueError, got {got}"
        assert want in text, f"{call}: {text!r} does not name {want!r}"
        assert bad == 0, f"{call}: misuse counted as a bad value"


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
    (c, c_dir, _), (py, py_dir, _) = _run(tmp_path, "c"), _run(tmp_path, "python")
    assert c["c"] and not py["c"], "the two runs did not take the two paths"
    for (call, want), got_c, got_py in zip(TABLE, c["out"], py["out"]):
        assert got_c == got_py, f"{call}: C {got_c} but Python {got_py}"
        _check(call, want, got_c, on=True)
    stored = _stored(c_dir)
    assert stored == _stored(py_dir), "the coerced values differ between C and Python"
    assert _went_on(stored), "capture did not go on after the misuse calls"


def test_misuse_table_python_path(tmp_path):
    """Where the C extension is not built, the Python path still meets the table."""
    py, py_dir, _ = _run(tmp_path, "python")
    assert _went_on(_stored(py_dir)), "capture did not go on after the misuse calls"
    for (call, want), got in zip(TABLE, py["out"]):
        _check(call, want, got, on=True)


def test_misuse_table_same_with_capture_off(tmp_path):
    """The same program behaves the same with capture off: misuse raises the same error,
    data raises nothing (a script tested without provhpc run does not die under it)."""
    off, _d, _err = _run(tmp_path, "off")
    on, _d2, _err2 = _run(tmp_path, "python")
    for (call, want), got_off, got_on in zip(TABLE, off["out"], on["out"]):
        _check(call, want, got_off, on=False)
        assert got_off[:2] == got_on[:2], f"{call}: capture off {got_off}, on {got_on}"


def test_bad_values_warn_once_per_metric_name(tmp_path):
    _res, _d, err = _run(tmp_path, "python")
    warned = [ln for ln in err.splitlines() if "counted as bad_value" in ln]
    assert len(warned) == 1 and "metric 'm'" in warned[0], warned  # every bad row is 'm'
