"""The post-processing CLI verbs, in-process and on a real mpiexec demo run."""

import json
import os
import subprocess

import pytest
from _post_runs import build_run

from provhpc.cli import main


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    build_run(d, "run-1", lr=0.02, fail_rank=1)
    build_run(d, "run-2", lr=0.08)
    return d


def _json(capsys, argv, rc=0):
    assert main(argv + ["--json"]) == rc
    return json.loads(capsys.readouterr().out)


def test_ls_and_query_tables(out, capsys):
    runs = _json(capsys, ["ls", str(out)])
    assert [r["run_id"] for r in runs] == ["run-1", "run-2"] and runs[0]["records"] > 0
    res = _json(capsys, ["query", str(out / "run-1"), "tasks", "--kind", "epoch", "--rank",
                         "1", "--where", "duration_s>=0"])
    assert res["count"] == 3 and {r["rank"] for r in res["rows"]} == {1}
    ent = _json(capsys, ["query", str(out / "run-1"), "entities", "--where", "lr<0.05"])
    assert {r["kind"] for r in ent["rows"]} == {"hyperparameters"}


def test_query_questions(out, capsys):
    run = str(out / "run-1")
    prod = _json(capsys, ["query", run, "produced", "model-0.02.npy"])
    assert prod["hyperparameters"][0]["values"]["lr"] == 0.02
    der = _json(capsys, ["query", run, "derivation", "model-0.02.npy"])
    assert any(c and c[-1]["to"].endswith("raw.npy") for c in der["chains"])
    assert len(_json(capsys, ["query", run, "epochs", "--metric", "val_accuracy"])) == 6
    best = _json(capsys, ["query", str(out), "best", "--metric", "val_accuracy"])
    assert [b["run"] for b in best] == ["run-2", "run-1"]
    fails = _json(capsys, ["query", run, "failures"])
    assert fails[0]["exception"] == "RuntimeError" and fails[0]["node"] == "node-b"
    assert _json(capsys, ["query", run, "capture"])["records"] > 0
    capsys.readouterr()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A run whose answers are known: rank 1 sleeps 50 ms per epoch and its loss is 0.5 higher."""
    d = tmp_path_factory.mktemp("slow")
    return build_run(d, "run-3", slow_rank=1, lag_rank=1)


def test_query_stages_stragglers_lagging_content(slow, capsys):
    stages = _json(capsys, ["query", slow, "stages"])
    count: dict = {}
    for s in stages:
        count[(s["type"], s["name"])] = count.get((s["type"], s["name"]), 0) + 1
    # curation once and train once per rank, validate and an epoch three times per rank
    assert count == {("stage", "curation"): 2, ("stage", "train"): 2,
                     ("stage", "validate"): 6, ("epoch", "epoch"): 6}
    assert all(s["status"] == "ok" for s in stages)
    train = {s["rank"]: s["duration_s"] for s in stages if s["name"] == "train"}
    # rank 1's train holds its three sleeping epochs: at least 150 ms, and rank 0 none
    assert train[1] >= 0.15 > train[0]
    slowest = _json(capsys, ["query", slow, "stragglers"])
    assert slowest and {(r["rank"], r["node"]) for r in slowest} == {(1, "node-b")}
    assert {r["index"] for r in slowest if r["type"] == "epoch"} == {0, 1, 2}
    # epoch_loss is a loss: the rank with the higher last loss lags, not the better one
    lag = _json(capsys, ["query", slow, "lagging"])
    assert [(r["rank"], r["epoch"]) for r in lag] == [(1, 2)]
    assert lag[0]["value"] == pytest.approx(1 / 3 + 0.5) and lag[0]["worse_by"] > 0.2
    assert _json(capsys, ["query", slow, "lagging", "--mode", "max"])[0]["rank"] == 0


def test_lineage_export_report_merge(out, capsys, tmp_path):
    lin = _json(capsys, ["lineage", str(out), "model-0.08.npy"])
    acts = [n for n in lin["nodes"] if n["type"] == "activity"]
    assert acts and {n["run"] for n in acts} == {"run-2"}
    # the raw file (same path and content in both runs) is one shared entity
    raw = [n for n in lin["nodes"] if n["name"].endswith("raw.npy")]
    assert len(raw) == 1
    assert main(["export", str(out / "run-2"), "--format", "prov-json", "-o",
                 str(tmp_path / "d.json")]) == 0
    with open(tmp_path / "d.json") as fh:
        assert json.load(fh)["activity"]
    assert main(["report", str(out / "run-2"), "-o", str(tmp_path / "rep")]) == 0
    assert os.path.exists(tmp_path / "rep" / "timeline.png")
    capsys.readouterr()
    res = _json(capsys, ["merge", str(out), "--out", str(tmp_path / "m")])
    assert [r["run_id"] for r in res["runs"]] == ["run-1", "run-2"]
    capsys.readouterr()


def test_every_verb_is_documented_the_same_way(capsys):
    """Every option and argument has help text, every verb's --help ends with examples,
    and every option naming what a verb writes is -o/--output."""
    import argparse

    from provhpc.cli import build_parser

    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.epilog and p.epilog.startswith("examples:\n  "), name
        for a in p._actions:
            assert a.help, (name, a.dest)
            if a.dest in ("out", "output"):
                assert {"-o", "--output"} <= set(a.option_strings), (name, a.option_strings)
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0 and "examples:" in capsys.readouterr().out


def test_help_for_every_verb(capsys):
    for verb in ("ls", "query", "lineage", "export", "report", "recover", "merge"):
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_corrupt_partition_exit_status(tmp_path, capsys):
    d = build_run(tmp_path, "run-bad")
    bad = os.path.join(d, "node-b.h5")
    with open(bad, "r+b") as fh:
        fh.truncate(100)
    assert main(["query", d, "tasks", "--json"]) == 1
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["partition_errors"] and bad in res["partition_errors"]
    assert {r["node"] for r in res["rows"]} == {"node-a"}
    assert bad in cap.err


def test_demo_under_mpiexec(tmp_path, venv_bin, clean_env):
    """The real pipeline: 2 ranks of the example, then the CLI questions on its output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", "2", os.path.join(venv_bin, "provhpc"),
           "run", "--out", "prov", "--", os.path.join(venv_bin, "python"),
           os.path.join(root, "examples", "train_mlp.py"), "--epochs", "2", "--files", "2",
           "--traces", "60", "--samples", "128"]
    subprocess.run(cmd, cwd=tmp_path, env=clean_env, check=True, timeout=120,
                   capture_output=True)
    provhpc = os.path.join(venv_bin, "provhpc")

    def q(*args):
        p = subprocess.run([provhpc, *args, "--json"], cwd=tmp_path, env=clean_env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    prod = q("query", "prov", "produced", "checkpoints/mlp.npz")
    assert prod["hyperparameters"][0]["values"]["epochs"] == 2
    assert {d["kind"] for d in prod["data"]} >= {"raw", "dataset", "shard"}
    em = q("query", "prov", "epochs", "--metric", "val_accuracy")
    assert sorted({(r["rank"], r["epoch"]) for r in em}) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert q("query", "prov", "metadata")["launcher"] in ("hydra", "pmi", "mpich")


def test_recover_an_output_directory_recovers_every_run(out, capsys):
    res = _json(capsys, ["recover", str(out)])
    assert [os.path.basename(r["run_dir"]) for r in res] == ["run-1", "run-2"]
    assert all(p["action"] == "ok" for r in res for p in r["partitions"])


def test_error_messages_have_one_prefix(capsys):
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("provhpc run: no command given") and err.count("provhpc run:") == 1
