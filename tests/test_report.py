"""provhpc report: an HTML page with real PNG plots."""

import os

import matplotlib.image as mpimg
from _post_runs import build_run

import provhpc
from provhpc.report import report


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
