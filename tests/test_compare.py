"""Issue 15 point 2: ``provhpc compare`` shows what differs between runs.

Two runs of one program that differ in one hyperparameter and in the content of one
input file (same path, rewritten between the runs): compare reports exactly those two
differences, marks the file ``changed``, and always shows the stage times and metrics.
"""

from __future__ import annotations

import json
import os

import pytest
from _post_runs import training_rank, write_file

from provhpc.cli import main
from provhpc.post.compare import compare
from provhpc.post.reader import open_path
from provhpc.testing import capture


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    raw = os.path.join(d, "data", "raw.npy")
    for run_id, lr, seed in (("run-1", 0.05, 1), ("run-2", 0.08, 2)):
        write_file(raw, seed)  # the same path, other content in run-2
        for rank, node in enumerate(("node-a", "node-b")):
            with capture(d, rank=rank, node=node, run_id=run_id):
                training_rank(raw, os.path.join(d, "data", run_id), rank, lr)
    return d


def test_compare_shows_exactly_the_differences(two):
    with open_path(str(two)) as coll:
        res = compare(coll.runs)
    assert res["runs"] == ["run-1", "run-2"]
    diff = {(name, row["key"]) for name, rows in res["sections"].items()
            if name not in ("stages", "metrics") for row in rows if row["differs"]}
    assert diff == {("hyperparameters", "lr"), ("inputs", f"raw {two}/data/raw.npy")}, diff
    assert res["differences"] == 2
    (lr,) = res["sections"]["hyperparameters"]
    assert lr["values"] == [0.05, 0.08]
    (raw,) = res["sections"]["inputs"]
    assert raw["vs_first"] == ["", "changed"] and raw["values"][0] != raw["values"][1]
    metrics = {r["key"]: r["values"] for r in res["sections"]["metrics"]}
    assert "val_accuracy final" in metrics and "epoch_loss best (min)" in metrics
    assert {r["key"] for r in res["sections"]["stages"]} >= {"curation (s)", "train (s)"}


def test_compare_all_shows_what_is_the_same(two):
    with open_path(str(two)) as coll:
        res = compare(coll.runs, everything=True)
    batch = [r for r in res["sections"]["hyperparameters"] if r["key"] == "batch"]
    assert batch and batch[0]["values"] == [32, 32] and not batch[0]["differs"]
    assert res["differences"] == 2


def test_compare_cli(two, capsys):
    assert main(["compare", str(two / "run-1"), str(two / "run-2"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["differences"] == 2
    assert main(["compare", str(two)]) == 0
    text = capsys.readouterr().out
    assert "2 difference(s)" in text and "*  lr" in text and "(changed)" in text
    assert main(["compare", str(two / "run-1")]) == 2
    assert "needs two runs or more" in capsys.readouterr().err


def test_an_unhashed_input_is_compared_by_its_fingerprint(tmp_path):
    """No hash asked for: the input is the same while its path, size and mtime are, and
    changed once the file is rewritten."""
    import numpy as np

    import provhpc

    data, other = tmp_path / "in.npy", tmp_path / "kept.npy"
    np.save(other, np.zeros(3))
    for i, run_id in enumerate(("a", "b")):
        np.save(data, np.arange(3 + i))  # rewritten (another size) before run b
        with capture(tmp_path / "prov", run_id=run_id):
            with provhpc.task("read"):
                provhpc.used(provhpc.data(str(data)), provhpc.data(str(other)))
    with open_path(str(tmp_path / "prov")) as coll:
        rows = {r["key"]: r for r in compare(coll.runs, everything=True)["sections"]["inputs"]}
    changed, kept = rows[f"data {data}"], rows[f"data {other}"]
    assert changed["vs_first"] == ["", "changed"] and changed["differs"], changed
    assert kept["vs_first"] == ["", "same"] and not kept["differs"], kept
    assert "size" in kept["values"][0] and "(key only)" not in kept["values"][0]
