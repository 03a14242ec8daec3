"""Bad values at the API (contract 1 and 6): each has one documented outcome.

Outcomes (docs/reliability.md, "Bad values"): *kept* as given, *coerced* by a
stated rule (flag F_COERCED), *truncated* (F_TRUNCATED), *rejected* keeping
only the type name (F_REJECTED), *dropped* and counted as ``bad_value`` (a
metric point that is not a number), or *misuse* raising ValueError that names
the key where the call is written.  Nothing else may escape into the training loop.
"""

from __future__ import annotations

import math
import os
import subprocess

import numpy as np
import pytest

import provhpc
from provhpc.format import records as R
from provhpc.post.reader import Run
from provhpc.testing import capture

pytestmark = pytest.mark.timeout(60)


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")


class BadFloat:
    def __float__(self):
        raise RuntimeError("float exploded")


def _deep(n):
    d = leaf = {}
    for _ in range(n):
        leaf["k"] = {}
        leaf = leaf["k"]
    leaf["leaf"] = 1
    return d


def _attrs(cap):
    """key -> (vtype, ival, fval, text, flags) of every ATTRIBUTE record."""
    recs = cap.records("attribute")
    strings = cap.run.partitions[0].strings
    return {strings[r["name"]]: (int(r["vtype"]), int(r["ival"]), float(r["fval"]),
                                 strings[r["sval"]], int(r["flags"])) for r in recs}


def _metrics(cap, name):
    recs = cap.records("metric")
    strings = cap.run.partitions[0].strings
    return [(int(r["step"]), float(r["fval"])) for r in recs if strings[r["name"]] == name]


def test_attribute_values_coerced_by_rule(tmp_path):
    big = "v" * (1 << 20)
    with capture(tmp_path) as cap:
        provhpc.attribute("nan", float("nan"))
        provhpc.attribute("inf", float("-inf"))
        provhpc.attribute("huge_int", 2**100)
        provhpc.attribute("bytes", b"\xff\x00ok")
        provhpc.attribute("surrogate", "a\udcffb")
        provhpc.attribute("np_scalar", np.float32(1.5))
        provhpc.attribute("np_int", np.int64(7))
        provhpc.attribute("array", np.zeros((3, 4), np.float32))
        provhpc.attribute("bad_repr", BadRepr())
        provhpc.attribute("one_mb", big)
        provhpc.attribute("none", None)
        provhpc.attribute("flag", True)
    a = _attrs(cap)
    assert a["nan"][0] == R.V_FLOAT and math.isnan(a["nan"][2])
    assert a["inf"][2] == float("-inf")
    assert a["huge_int"][0] == R.V_STR and a["huge_int"][3] == str(2**100)
    assert a["huge_int"][4] & R.F_COERCED
    assert a["bytes"][3] == "\\xff\x00ok" and a["bytes"][4] & R.F_COERCED
    assert a["surrogate"][0] == R.V_STR and a["surrogate"][3].startswith("a")
    assert a["np_scalar"][:3] == (R.V_FLOAT, 0, 1.5)
    assert a["np_int"][:2] == (R.V_INT, 7)
    assert a["array"][3] == "ndarray(shape=(3, 4), dtype=float32)"
    assert a["bad_repr"][3] == "<BadRepr>" and a["bad_repr"][4] & R.F_REJECTED
    assert len(a["one_mb"][3].encode()) == 4096  # max_string, flagged in the string table
    part = cap.run.partitions[0]
    sid = [i for i, s in enumerate(part.strings) if s == a["one_mb"][3]][0]
    assert part.truncated_strings[sid]
    assert a["none"][0] == R.V_NONE
    assert a["flag"][:2] == (R.V_BOOL, 1)
    assert not cap.run.partitions[0].drops().size


def test_tensor_values(tmp_path):
    torch = pytest.importorskip("torch")
    with capture(tmp_path) as cap:
        provhpc.attribute("t", torch.zeros(2, 3))
        provhpc.metric("loss", torch.tensor(0.25), step=torch.tensor(3))
    assert _attrs(cap)["t"][3] == "Tensor(shape=(2, 3), dtype=torch.float32)"
    assert _metrics(cap, "loss") == [(3, 0.25)]


def test_metric_values(tmp_path):
    with capture(tmp_path) as cap:
        provhpc.metric("m", float("nan"), step=0)
        provhpc.metric("m", float("inf"), step=1)
        provhpc.metric("m", 10**400, step=2)  # beyond float: its signed infinity
        provhpc.metric("m", np.float16(0.5), step=np.int32(3))
        provhpc.metric("m", True, step=4)
        provhpc.metric("n" * (1 << 20), 1.0)  # a 1 MB name: truncated and flagged
        provhpc.metric("bad\udcffname", 1.0)
    got = dict(_metrics(cap, "m"))
    assert math.isnan(got[0]) and got[1] == math.inf and got[2] == math.inf
    assert got[3] == 0.5 and got[4] == 1.0
    strings = list(cap.run.partitions[0].strings)
    assert "n" * 4096 in strings
    assert any(s.startswith("bad") and s.endswith("name") for s in strings)


def test_deep_and_recursive_mappings(tmp_path):
    loop: dict = {"a": 1}
    loop["self"] = loop
    with capture(tmp_path) as cap:
        provhpc.hyperparameters(_deep(50), name="deep")
        provhpc.hyperparameters({"loop": loop}, name="loop")
        provhpc.hyperparameters({"very": _deep(100000)}, name="deeper")
    keys = list(_attrs(cap))
    deep = [k for k in keys if k.startswith("k.")]
    assert deep and max(k.count(".") for k in deep) <= 9  # flattened 8 levels, rest repr()
    assert "loop.self.self.self.self.self.self.self.a" in keys
    assert not cap.run.partitions[0].drops().size


def test_end_twice_and_out_of_order(tmp_path):
    with capture(tmp_path) as cap:
        outer = provhpc.task("outer").start()
        inner = provhpc.task("inner").start()
        outer.end()  # out of order: allowed, both recorded
        inner.end()
        with pytest.raises(ValueError, match="ended without a start"):
            inner.end()
    assert len(cap.records("activity_end")) == 2


OPEN_TASK = '''
import provhpc
t = provhpc.task("left-open").start()
provhpc.epoch(0).start()
provhpc.metric("m", 1.0)
'''


def test_task_left_open_at_exit_is_closed_as_unfinished(tmp_path, venv_bin, clean_env):
    prog = tmp_path / "prog.py"
    prog.write_text(OPEN_TASK)
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_TELEMETRY_INTERVAL": "0"}
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", str(tmp_path / "p"),
                        "--", os.path.join(venv_bin, "python"), str(prog)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rdir = [d for d in (tmp_path / "p").iterdir() if not d.is_symlink()][0]
    with Run(str(rdir)) as run:
        p = run.partitions[0]
        recs = p.records()
        ends = recs[recs["kind"] == R.ACTIVITY_END]
        unfinished = [e for e in ends if p.strings[e["sval"]] == "unfinished"]
        assert len(unfinished) == 2
        assert all(e["ival"] == R.STATUS_ERROR for e in unfinished)
