"""Issue 13 point 3: one meaning of a directory of runs.

Of an output directory, tables and single-run questions answer for the newest run and
say which; ``--all-runs`` answers for every run, each row with its run; times are
seconds from each row's own run start (never negative) or UTC ISO-8601 with
``--absolute``; rows are sorted by run, rank, then time.
"""

from __future__ import annotations

import json
import re

import pytest
from _post_runs import build_run

from provhpc.cli import main


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirs")
    build_run(d, "run-1", lr=0.02)
    build_run(d, "run-2", lr=0.08)  # the newest
    return d


def _run(capsys, argv, rc=0):
    assert main(argv) == rc
    return capsys.readouterr()


def _json(capsys, argv):
    cap = _run(capsys, argv + ["--json"])
    return json.loads(cap.out), cap.err


@pytest.mark.parametrize("table", ["tasks", "metrics", "entities"])
def test_a_directory_means_its_newest_run_and_says_so(out, capsys, table):
    res, err = _json(capsys, ["query", str(out), table])
    assert {r["run"] for r in res["rows"]} == {"run-2"} and res["runs"] == ["run-2"]
    assert "run run-2: the newest of 2 runs in" in err
    alone, _ = _json(capsys, ["query", str(out / "run-2"), table])
    assert res["rows"] == alone["rows"]
    text = _run(capsys, ["query", str(out), table]).out
    assert text.splitlines()[0].startswith("run run-2: the newest of 2 runs")


def test_every_single_run_question_takes_the_same_run(out, capsys):
    for what in ("stages", "epochs", "failures", "timeline", "capture"):
        text = _run(capsys, ["query", str(out), what]).out
        assert text.startswith("run run-2: the newest of 2 runs"), (what, text[:200])
    ep_dir, _ = _json(capsys, ["query", str(out), "epochs"])
    ep_run, _ = _json(capsys, ["query", str(out / "run-2"), "epochs"])
    assert ep_dir == ep_run


def test_all_runs_gives_every_row_its_run_and_times_from_its_own_run(out, capsys):
    res, _ = _json(capsys, ["query", str(out), "tasks", "--all-runs"])
    assert {r["run"] for r in res["rows"]} == {"run-1", "run-2"}
    assert res["runs"] == ["run-1", "run-2"]
    text = _run(capsys, ["query", str(out), "tasks", "--all-runs"]).out.splitlines()
    head = text[0].split()
    assert head[0] == "run"
    col = head.index("start")
    starts = {}
    for line in text[1:-1]:
        cells = line.split()
        starts.setdefault(cells[0], []).append(float(cells[col]))
    assert set(starts) == {"run-1", "run-2"}
    for run, values in starts.items():  # each run's own clock: starts at 0, never negative
        assert 0 <= min(values) < 1.0, (run, values)  # within its first second
    ep, _ = _json(capsys, ["query", str(out), "epochs", "--all-runs"])
    assert {r["run"] for r in ep} == {"run-1", "run-2"}
    assert len(ep) == 2 * len(_json(capsys, ["query", str(out / "run-1"), "epochs"])[0])


def test_absolute_prints_utc_times(out, capsys):
    text = _run(capsys, ["query", str(out / "run-1"), "metrics", "--absolute"]).out
    lines = text.splitlines()
    col = lines[0].split().index("t")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line.split()[col])
               for line in lines[1:-1]), lines[:3]


@pytest.mark.parametrize("table,time", [("tasks", "start"), ("metrics", "t"),
                                        ("attributes", "t")])
def test_rows_are_sorted_by_run_rank_then_time(out, capsys, table, time):
    res, _ = _json(capsys, ["query", str(out), table, "--all-runs"])
    keys = [(r["run"], r["rank"], r[time]) for r in res["rows"]]
    assert keys == sorted(keys) and len({k[1] for k in keys}) == 2


def test_cross_run_questions_read_every_run(out, capsys):
    best, _ = _json(capsys, ["query", str(out), "best", "--metric", "val_accuracy"])
    assert {b["run"] for b in best} == {"run-1", "run-2"}
    cap = _run(capsys, ["query", str(out), "best", "--all-runs"], rc=2)
    assert "already reads every run" in cap.err
