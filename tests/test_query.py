"""Filters and the questions of docs/queries.md, on small captured runs."""

import numpy as np
import pytest
from _post_runs import build_run

import provhpc
from provhpc.post import questions as Q
from provhpc.post.query import parse_term, select


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = build_run(tmp_path_factory.mktemp("q"), "run-q", slow_rank=1, fail_rank=0, lag_rank=1)
    return provhpc.open(d)


def test_filters(run):
    ep = select(run, "tasks", kind="epoch", rank=[1])
    assert len(ep) == 3 and set(ep["rank"]) == {1} and set(ep["type"]) == {"epoch"}
    assert set(select(run, "tasks", name="curate_*")["name"]) == {"curate_file"}
    assert set(select(run, "tasks", node="node-b")["rank"]) == {1}
    assert select(run, "tasks", where=["duration_s>0.04"], kind="epoch")["rank"].tolist() \
        == [1, 1, 1]
    # attribute comparisons: the owner's attribute, typed
    assert set(select(run, "tasks", where=["max_abs=20"])["name"]) == {"curate_file"}
    assert len(select(run, "tasks", where=["max_abs>20"])) == 0
    assert set(select(run, "entities", where=["lr>=0.05"])["kind"]) == {"hyperparameters"}
    assert set(select(run, "entities", where=["optimizer.name=sgd"])["kind"]) == \
        {"hyperparameters"}
    assert set(select(run, "entities", where=["hash~blake2b:*"])["kind"]) == \
        {"raw", "checkpoint"}
    m = select(run, "metrics", name="val_*", where=["value>=0.5"])
    assert len(m) and (m["value"] >= 0.5).all()


def test_time_window(run):
    t = np.asarray(run.tasks())
    t0 = run.time_range()[0]
    cut = (np.sort(t["start"])[len(t) // 2] - t0) / 1e9
    late = select(run, "tasks", since=cut)
    early = select(run, "tasks", until=cut)
    assert len(late) and len(early) and len(late) < len(t) and len(early) < len(t)
    assert ((late["end"] - t0) / 1e9 >= cut - 1e-9).all()
    assert ((early["start"] - t0) / 1e9 <= cut + 1e-9).all()


def test_parse_term():
    assert parse_term("lr>=0.01") == ("lr", ">=", 0.01)
    assert parse_term("status = error") == ("status", "==", "error")
    with pytest.raises(ValueError):
        parse_term("no operator")


def test_produced(run):
    ckpt = select(run, "entities", kind="checkpoint")["key"][0]
    res = Q.produced(run, ckpt)
    assert res["hyperparameters"][0]["values"] == {"lr": 0.05, "batch": 32,
                                                   "optimizer.name": "sgd"}
    assert {d["kind"] for d in res["data"]} == {"dataset", "raw"}
    assert res["ranks"] == [0] and res["nodes"] == ["node-a"]
    assert {a["name"] for a in res["activities"]} == {"save_checkpoint", "curation"}


def test_derivation_chain(run):
    ckpt = select(run, "entities", kind="checkpoint")["key"][0]
    res = Q.derivation(run, ckpt)
    chain = next(c for c in res["chains"] if c[-1]["to"].startswith("raw "))
    assert [s["relation"] for s in chain] == ["wasDerivedFrom", "wasDerivedFrom"]
    assert chain[0]["from"].startswith("checkpoint ")


def test_epoch_metrics_and_lagging(run):
    em = Q.epoch_metrics(run, ["epoch_loss", "val_accuracy"])
    assert len(em) == 2 * 2 * 3
    r1 = em[(em["rank"] == 1) & (em["name"] == "epoch_loss")]
    assert r1["epoch"].tolist() == [0, 1, 2] and np.allclose(r1["last"], [1.5, 1.0, 1 / 3 + .5])
    lag = Q.lagging_ranks(run, "epoch_loss")
    assert [x["rank"] for x in lag] == [1]


def test_best_across_runs(tmp_path):
    for i, lr in enumerate((0.02, 0.08, 0.05)):
        build_run(tmp_path, f"run-{i}", lr=lr, nodes=("n0",))
    rows = Q.best(provhpc.open(tmp_path), "val_accuracy")
    assert [r["hyperparameters"]["lr"] for r in rows] == [0.08, 0.05, 0.02]
    assert rows[0]["value"] == pytest.approx(0.8) and rows[0]["step"] == 2
    # the inter-training table: the run first, its epoch, the settings that differ
    assert [r["run"] for r in rows] == ["run-1", "run-2", "run-0"]
    assert [r["varying"] for r in rows] == [{"lr": 0.08}, {"lr": 0.05}, {"lr": 0.02}]
    assert rows[0]["epoch"] == 2


def test_best_text_table_has_every_run_and_the_differing_settings(tmp_path, capsys):
    from provhpc.cli import main

    for i, lr in enumerate((0.02, 0.08, 0.05)):
        build_run(tmp_path, f"run-{i}", lr=lr, nodes=("n0",))
    assert main(["query", str(tmp_path), "best", "--metric", "val_accuracy", "--max"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "val_accuracy", "epoch", "step", "rank", "lr"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["run-1", "run-2", "run-0"]
    assert [ln.split()[-1] for ln in lines[1:4]] == ["0.08", "0.05", "0.02"]


def test_stage_times_and_stragglers(run):
    st = Q.stage_times(run)
    assert {"curation", "train", "validate", "epoch"} <= set(st["name"])
    slow = Q.stragglers(run, threshold=0.5)
    assert slow and {s["rank"] for s in slow if s["type"] == "epoch"} == {1}
    assert all(s["duration_s"] > 1.5 * s["median_s"] for s in slow)


def test_failures(run):
    f = Q.failures(run)
    assert len(f) == 1
    assert f[0]["rank"] == 0 and f[0]["node"] == "node-a" and f[0]["exception"] == "RuntimeError"
    assert f[0]["message"] == "simulated failure"
    assert f[0]["last_inputs"] == [{"key": "curated/rank0", "kind": "dataset"}]


def test_capture_stats(run):
    s = Q.capture_stats(run)
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    assert all(r["records"] > 0 and r["records_per_s"] > 0 for r in s["ranks"])
    assert s["records"] == sum(p["records"] for p in s["partitions"])
    # every stored record was sent by a process of the rank table or sampled by the aggregator
    assert s["records"] == sum(r["records"] for r in s["ranks"]) + sum(
        p["telemetry_records"] for p in s["partitions"])
    assert s["file_bytes_per_record"] > 64 and s["dropped_total"] == 0
