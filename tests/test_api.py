"""The capture API through a real agent and aggregator (provhpc.testing.capture)."""

import sys
import threading

import numpy as np
import pytest

import provhpc
from provhpc.capture import api
from provhpc.format import records as R
from provhpc.testing import capture


def by_kind(cap, kind):
    return cap.records(kind)


def names(cap, recs, col="name"):
    return cap.strings(recs[col])


def attrs_of(cap, owner, role=None):
    a = cap.records("attribute")
    a = a[a["id"] == owner]
    if role is not None:
        a = a[a["ref"] == role]
    out = {}
    for r, key in zip(a, cap.strings(a["name"])):
        v = {R.V_INT: int(r["ival"]), R.V_FLOAT: float(r["fval"]), R.V_BOOL: bool(r["ival"]),
             R.V_STR: cap.strings([r["sval"]])[0], R.V_NONE: None}[r["vtype"]]
        out[key] = v
    return out


def test_api_is_a_noop_without_an_agent():
    assert api.get_agent(start_child=False) is None
    with provhpc.task("t", x=1) as t:
        provhpc.metric("m", 1.0)
        t.generated(provhpc.data("x"), y=2)
    assert t.id == 0

    @provhpc.task
    def f(a, b=2):
        return a + b

    assert f(1) == 3


def test_task_three_spellings_nest_and_carry_parameters(tmp_path):
    with capture(tmp_path) as cap:
        @provhpc.task
        def add(a, b=2):
            return {"sum": a + b}

        @provhpc.task("named")
        def twice(x):
            return 2 * x

        with provhpc.task("outer", used=[provhpc.data("in.csv")], lr=0.1) as outer:
            assert add(1, b=5) == {"sum": 6}
            assert twice(4) == 8
            t = provhpc.task("explicit", k="v")
            t.start()
            provhpc.metric("loss", 0.5, step=3)
            t.end()
    starts = by_kind(cap, "activity_start")
    by_name = dict(zip(names(cap, starts), starts))
    assert set(by_name) >= {"outer", "test_task_three_spellings_nest_and_carry_parameters."
                            "<locals>.add", "named", "explicit"}
    add_rec = by_name["test_task_three_spellings_nest_and_carry_parameters.<locals>.add"]
    assert add_rec["ref"] == outer.id  # parent = enclosing task
    assert by_name["explicit"]["ref"] == outer.id
    assert attrs_of(cap, add_rec["id"], api.ROLE_PARAMETER) == {"a": 1, "b": 5}
    assert attrs_of(cap, add_rec["id"], api.ROLE_GENERATED) == {"sum": 6}
    assert attrs_of(cap, by_name["named"]["id"], api.ROLE_GENERATED) == {"return": 8}
    assert attrs_of(cap, outer.id, api.ROLE_PARAMETER) == {"lr": 0.1}
    m = by_kind(cap, "metric")
    m = m[np.array(names(cap, m)) == "loss"]
    assert m["id"].tolist() == [by_name["explicit"]["id"]] and m["step"].tolist() == [3]
    rel = by_kind(cap, "relation")
    used = rel[np.array(names(cap, rel)) == "used"]
    assert outer.id in used["id"]
    ids = np.concatenate([starts["id"], by_kind(cap, "entity")["id"]])
    assert len(np.unique(ids)) == len(ids)  # identifiers are unique


def test_error_status_records_exception_type_and_propagates(tmp_path):
    with capture(tmp_path) as cap:
        with pytest.raises(KeyError):
            with provhpc.task("fails") as t:
                raise KeyError("missing")
    ends = by_kind(cap, "activity_end")
    end = ends[ends["id"] == t.id][0]
    assert end["ival"] == R.STATUS_ERROR
    assert cap.strings([end["sval"]]) == ["KeyError"]
    assert attrs_of(cap, t.id)["exception"] == "'missing'"


def test_stage_epoch_hyperparameters_and_data_lineage(tmp_path):
    with capture(tmp_path) as cap:
        raw = provhpc.data("raw/a.csv", source="sensor")
        hp = provhpc.hyperparameters({"lr": 0.01, "opt": {"name": "adam", "beta": 0.9}})
        with provhpc.stage("train", used=[raw]) as st:
            for e in range(2):
                with provhpc.epoch(e):
                    provhpc.metric("loss", 1.0 / (e + 1))
            model = provhpc.data("model.pt", kind="checkpoint", derived_from=[raw, hp])
            st.generated(model, acc=0.9)
    starts = by_kind(cap, "activity_start")
    kinds = names(cap, starts, "sval")
    assert kinds.count("stage") == 1 and kinds.count("epoch") == 2
    epochs = starts[np.array(kinds) == "epoch"]
    assert epochs["step"].tolist() == [0, 1] and set(epochs["ref"]) == {st.id}
    assert attrs_of(cap, hp.id) == {"lr": 0.01, "opt.name": "adam", "opt.beta": 0.9}
    assert attrs_of(cap, raw.id) == {"source": "sensor"}
    rel = by_kind(cap, "relation")
    triples = set(zip(rel["id"].tolist(), names(cap, rel), rel["ref"].tolist()))
    assert (model.id, "wasDerivedFrom", raw.id) in triples
    assert (model.id, "wasDerivedFrom", hp.id) in triples
    assert (model.id, "wasGeneratedBy", st.id) in triples
    assert (st.id, "used", raw.id) in triples
    ents = by_kind(cap, "entity")
    assert dict(zip(names(cap, ents), names(cap, ents, "sval")))["model.pt"] == "checkpoint"


def test_misuse_raises_value_error_where_written(tmp_path):
    with capture(tmp_path):
        with pytest.raises(ValueError):
            provhpc.metric("", 1.0)
        with pytest.raises(ValueError):
            provhpc.task("")
        with pytest.raises(ValueError):
            provhpc.task("t").end()
        t = provhpc.task("twice").start()
        with pytest.raises(ValueError):
            t.start()
        t.end()
        with pytest.raises(ValueError):
            provhpc.epoch("three")


def test_threads_and_activities_left_open_are_closed_at_shutdown(tmp_path):
    n = 5000
    with capture(tmp_path) as cap:
        def worker(k):
            for i in range(n):
                provhpc.metric(f"w{k}", float(i), step=i)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        worker(3)
        for t in threads:
            t.join()
        left_open = provhpc.task("left-open").start()
        assert left_open.id in cap.agent.open_activities
    ends = by_kind(cap, "activity_end")
    end = ends[ends["id"] == left_open.id]
    assert len(end) == 1 and end["ival"][0] == R.STATUS_ERROR
    assert cap.strings(end["sval"]) == ["unfinished"]
    m = by_kind(cap, "metric")
    keys = np.array(names(cap, m))
    for k in range(4):
        sel = m[keys == f"w{k}"]
        assert sorted(sel["step"].tolist()) == list(range(n))
        assert (sel["fval"] == sel["step"]).all()


def test_values_follow_the_documented_coercion_rules(tmp_path):
    class BadRepr:
        def __repr__(self):
            raise RuntimeError("no")

    with capture(tmp_path, max_string=64) as cap:
        with provhpc.task("values") as t:
            t.attributes(nan=float("nan"), big=2**70, raw=b"\xff\x00ab", np_int=np.int32(7),
                         arr=np.zeros((2, 3), np.float32), none=None, flag=True,
                         long="x" * 1000, bad=BadRepr())
    a = attrs_of(cap, t.id)
    assert np.isnan(a["nan"])
    assert a["big"] == str(2**70)
    assert a["raw"] == "\\xff\x00ab"  # undecodable bytes escaped, valid UTF-8 kept
    assert a["np_int"] == 7 and a["flag"] is True and a["none"] is None
    assert a["arr"] == "ndarray(shape=(2, 3), dtype=float32)"
    assert a["long"] == "x" * 64
    assert a["bad"] == "<BadRepr>"
    p = cap.run.partitions[0]
    assert p.truncated_strings[list(p.strings).index("x" * 64)]


def test_bad_points_are_dropped_counted_and_capture_goes_on(tmp_path):
    """Data never raises (docs/format.md, "Values"): a step beyond int64, on the owner's fast
    path and on the locked path, or a value that is not a number, is one bad_value drop."""
    with capture(tmp_path) as cap:
        provhpc.metric("m", 1.0, step=1)  # "m" interned: the next call takes the fast path
        provhpc.metric("m", 1.0, step=2**70)
        provhpc.metric("fresh", 1.0, step=-(2**70))  # a new name: the locked path
        provhpc.metric("m", "n/a", step=3)
        assert cap.agent.busy is False
        assert cap.agent.dropped == {"bad_value": 3}
        provhpc.metric("m", 2.0, step=2)
    m = cap.records("metric")
    points = [(n, s) for n, s in zip(names(cap, m), m["step"].tolist()) if n in ("m", "fresh")]
    assert sorted(points) == [("m", 1), ("m", 2)]
    drops = cap.run.drops()
    assert [(d["reason"], d["count"]) for d in drops] == [("bad_value", 3)]




def test_threads_racing_the_owner_lose_and_corrupt_nothing(tmp_path):
    """Other threads write through the C path too (the GIL makes each C write atomic) and
    back off while the owner is inside its Python fast path (``busy``): the owner here
    keeps entering it (list values need the coercion rules), the others write metrics,
    attributes and tasks in C and in Python.  Every record arrives, none overwritten."""
    n = 10000
    sys_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows
    try:
        with capture(tmp_path, slot_records=256, slots=512) as cap:  # no backpressure
            def worker(k):
                for i in range(n):
                    provhpc.metric(f"w{k}", float(i), step=i)  # C
                    if i % 4 == 0:
                        provhpc.metric(f"w{k}", i, step=-i - 1)  # coerced: Python, locked
                    if i % 16 == 0:
                        with provhpc.task(f"t{k}", i=i):  # C start and end
                            provhpc.attribute("a", [i])  # coerced: Python, locked

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for i in range(n):  # the owner: its Python fast path (busy: a list value is
                provhpc.attribute("own", [1])  # coerced to an interned string) and C
                provhpc.metric("own", float(i), step=i)
            for t in threads:
                t.join()
            provhpc.flush(10)
            assert sum(cap.agent.dropped.values()) == 0
    finally:
        sys.setswitchinterval(sys_interval)
    m = by_kind(cap, "metric")
    keys = np.array(names(cap, m))
    for k in range(3):
        sel = m[keys == f"w{k}"]
        c = sel[sel["step"] >= 0]
        assert sorted(c["step"].tolist()) == list(range(n))
        assert (c["fval"] == c["step"]).all()
        py = sel[sel["step"] < 0]
        assert sorted((-py["step"] - 1).tolist()) == list(range(0, n, 4))
        assert (py["fval"] == -py["step"] - 1).all()
    own = m[keys == "own"]
    assert sorted(own["step"].tolist()) == list(range(n)) and (own["fval"] == own["step"]).all()
    starts, ends = by_kind(cap, "activity_start"), by_kind(cap, "activity_end")
    task_ids = set(starts["id"][np.isin(np.array(names(cap, starts)),
                                        ["t0", "t1", "t2"])].tolist())
    assert len(task_ids) == 3 * n // 16 and task_ids <= set(ends["id"].tolist())
    attrs = by_kind(cap, "attribute")
    assert (np.array(names(cap, attrs)) == "own").sum() == n
    assert (np.array(names(cap, attrs)) == "a").sum() == 3 * n // 16
