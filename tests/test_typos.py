"""Issue 13 point 4: a typo is an error, never an answer of "no rows".

Each case runs the real CLI on a real run and asserts exit 2, one line on stderr
that names the mistake and lists what exists, and nothing on stdout.  The
well-formed neighbour of each typo still answers, so the check is not a blanket
refusal.
"""

from __future__ import annotations

import pytest
from _post_runs import build_run

from provhpc.cli import main
from provhpc.post import questions as Q
from provhpc.post.query import parse_term
from provhpc.post.reader import open_path


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("typos")
    build_run(d, "run-1", lr=0.02)
    return d


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "", cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("provhpc query: "), cap.err
    return lines[0]


@pytest.mark.parametrize("argv,says", [
    (["tasks", "--where", "value>>0.8"], "the value '>0.8' starts with an operator"),
    (["tasks", "--where", "lr=>0.01"], "starts with an operator"),
    (["tasks", "--where", "duration_s>"], "no value after '>'"),
    (["tasks", "--where", "nosuch>1"], "'nosuch': no column of tasks and no attribute"),
    (["metrics", "--columns", "rank,valeu"], "no column 'valeu' in metrics; its columns:"),
    (["epochs", "--metric", "nosuch"], "unknown metric 'nosuch'; the metrics of this run:"),
    (["best", "--metric", "nosuch"], "unknown metric 'nosuch'"),
    (["lagging", "--metric", "nosuch"], "unknown metric 'nosuch'"),
    (["tasks", "--rank", "abc"], "bad --rank 'abc': expected ranks such as 0,2,4-7"),
    (["tasks", "--rank", "3-1"], "bad --rank '3-1'"),
    (["tasks", "--since", "yesterday"], "bad time 'yesterday'"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_typo_is_one_line_that_lists_what_exists(out, capsys, argv, says):
    run = str(out / "run-1") if argv[0] != "best" else str(out)
    line = _error(capsys, ["query", run, *argv])
    assert says in line, line
    if "columns:" in says:
        assert "value" in line and "step" in line  # the table's real columns are listed
    if "unknown metric" in says:
        assert "val_accuracy" in line  # the run's metrics are listed
    if "no attribute" in says:
        assert "lr" in line  # and its attribute keys


@pytest.mark.parametrize("argv", [
    ["tasks", "--where", "lr>=0.01"], ["tasks", "--where", "duration_s>=0"],
    ["metrics", "--columns", "rank,value"], ["epochs", "--metric", "val_accuracy"],
    ["tasks", "--rank", "0-1"], ["tasks", "--since", "0"],
])
def test_the_well_formed_neighbours_still_answer(out, capsys, argv):
    assert main(["query", str(out / "run-1"), *argv]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out


def test_the_api_refuses_the_same_typos(out):
    with pytest.raises(ValueError, match="starts with an operator"):
        parse_term("value>>0.8")
    with open_path(str(out / "run-1")) as run:
        with pytest.raises(ValueError, match="unknown metric 'nosuch'.*val_accuracy"):
            Q.epoch_metrics(run, ["nosuch"])
        with pytest.raises(ValueError, match="bad mode 'maxx'"):
            Q.best(run, "val_accuracy", "maxx")
        assert len(Q.epoch_metrics(run, ["val_accuracy"])) > 0
