"""provhpc report: one self-contained HTML page that shows the provenance of a run."""

import re

import matplotlib.image as mpimg
import numpy as np
from _post_runs import build_run

import provhpc
from provhpc.format import records as R
from provhpc.post.report import io_entities, report, x_axis


def test_report_is_one_self_contained_page_with_the_provenance(tmp_path):
    run = provhpc.open(build_run(tmp_path, "run-r", fail_rank=1))
    res = report(run, str(tmp_path / "rep"))
    with open(res["html"]) as fh:
        page = fh.read()
    # readable offline, sent as one file: no reference to anything beside it or online
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "an external reference"
    assert page.count("src='data:image/png;base64,") == len(res["images"]) >= 3
    for p in res["images"]:  # the PNGs written beside it are real plots
        img = mpimg.imread(p)
        assert img.shape[0] > 150 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # the run card: who, how it ended, the code, the hyperparameters
    for field in ("who", "when", "job", "nodes", "ranks", "how it ended", "command",
                  "code version"):
        assert f"<th>{field}</th>" in page, field
    assert "<th>lr</th>" in page and "<td>0.05</td>" in page
    # inputs and outputs with their identities, the model's lineage drawn as a graph
    inputs, outputs = io_entities(run)
    raw = [i for i in inputs if i["key"].endswith("raw.npy")]
    assert raw and raw[0]["hash"] and raw[0]["hash"] in page
    assert [o["key"] for o in outputs if o["kind"] == "checkpoint"] == [
        k for k in (o["key"] for o in outputs) if k.endswith(".npy") and "model" in k]
    svg = page[page.index("<h2>Lineage</h2>"):page.index("<h2>Metrics</h2>")]
    assert svg.count("<svg") >= 1 and "model-0.05.npy" in svg and "raw.npy" in svg
    # a run captured in-process (provhpc.testing) knows no program: the card says so
    assert "no code version" in page  # (test_code_provenance: the code of a real job)
    # ML metrics first, then telemetry per node, the timeline, failures, stragglers, drops
    order = [page.index(h) for h in ("<h2>Metrics</h2>", "<h2>Telemetry per node</h2>",
                                     "<h2>Timeline</h2>", "<h2>Failures</h2>",
                                     "<h2>Stragglers</h2>",
                                     "<h2>Capture statistics and drops</h2>")]
    assert order == sorted(order)
    fails = page[order[3]:order[4]]
    assert "export_onnx" in fails and "RuntimeError" in fails
    assert "<b>no drops</b>" in page


def test_outputs_are_what_the_run_made(tmp_path):
    run = provhpc.open(build_run(tmp_path, "run-o"))
    inputs, outputs = io_entities(run)
    assert {i["kind"] for i in inputs} >= {"raw", "hyperparameters"}
    assert not {o["key"] for o in outputs} & {i["key"] for i in inputs}
    assert "checkpoint" in {o["kind"] for o in outputs}


def test_metric_x_axis_is_step_or_time():
    stepped = np.array([0, 1, 2])
    assert x_axis("loss", stepped) == "step"
    assert x_axis("loss", np.array([0, R.NO_STEP])) == "t"  # a point without a step
    # telemetry's step is the aggregator's sample number: plotted against time
    assert x_axis("telemetry.cpu_percent", stepped) == "t"
    assert x_axis("loss", np.zeros(0, np.int64)) == "t"


def test_report_of_a_directory_is_one_page_across_its_runs(tmp_path, capsys):
    """Issue 15 point 3: the metric curves of all runs overlaid, the best metric against
    each varying hyperparameter, and the run table, in one self-contained page."""
    from provhpc.cli import main

    for i, lr in enumerate((0.02, 0.08, 0.05)):
        build_run(tmp_path, f"run-{i}", lr=lr, nodes=("n0",))
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "rep")]) == 0
    assert "of 3 runs in" in capsys.readouterr().out
    page = (tmp_path / "rep" / "index.html").read_text()
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)
    assert page.count("src='data:image/png;base64,") == 2
    table = page[:page.index("<h2>Metrics of every run</h2>")]
    # best first: lr 0.08 (run-1), 0.05 (run-2), 0.02 (run-0); lr is the varying column
    assert [table.index(r) for r in ("run-1", "run-2", "run-0")] == sorted(
        table.index(r) for r in ("run-1", "run-2", "run-0"))
    assert "<th>lr</th>" in table and "<td>0.08</td>" in table and "<th>batch</th>" not in table
    for png in ("runs-metrics.png", "runs-best.png"):
        img = mpimg.imread(tmp_path / "rep" / png)
        assert img[..., :3].std() > 0.05


def test_report_of_a_run_of_a_directory(tmp_path, capsys):
    from provhpc.cli import main

    build_run(tmp_path, "run-1")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "rep")]) == 0
    assert "of run run-1" in capsys.readouterr().out  # one run: its own page
