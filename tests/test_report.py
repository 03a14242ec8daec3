"""provhpc report: an HTML page with real PNG plots."""

import os

import matplotlib.image as mpimg
import numpy as np
from _post_runs import build_run

import provhpc
from provhpc.format import records as R
from provhpc.post.report import report, x_axis


def test_report_writes_html_and_plots(tmp_path):
    run = provhpc.open(build_run(tmp_path, "run-r", fail_rank=1))
    res = report(run, str(tmp_path / "rep"))
    with open(res["html"]) as fh:
        html = fh.read()
    names = sorted(os.path.basename(p) for p in res["images"])
    assert names == ["metrics.png", "records.png", "timeline.png"]
    for p in res["images"]:
        assert f"src='{os.path.basename(p)}'" in html
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05  # not a blank canvas
    assert "export_onnx" in html and "RuntimeError" in html  # the failure table


def test_metric_x_axis_is_step_or_time():
    stepped = np.array([0, 1, 2])
    assert x_axis("loss", stepped) == "step"
    assert x_axis("loss", np.array([0, R.NO_STEP])) == "t"  # a point without a step
    # telemetry's step is the aggregator's sample number: plotted against time
    assert x_axis("telemetry.cpu_percent", stepped) == "t"
    assert x_axis("loss", np.zeros(0, np.int64)) == "t"
