"""Issue 14 point 1: ``provhpc watch`` and ``Run.snapshot()`` follow a running job.

A real ``mpiexec -n 2`` job runs epochs one at a time, each released by the test.
Snapshots taken from another process (``watch --once --json``) and from one ``Run`` kept
open and ``refresh()``-ed show the epochs and steps advance; a ``watch`` left running
ends by itself when the job ends, its last snapshot saying ``ok``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from test_faults_lib import kill_tree, remove_segments

import provhpc

pytestmark = pytest.mark.timeout(180)

PROG = """
import os, sys, time, provhpc
rank = int(os.environ["PMI_RANK"])
marks, go = sys.argv[1], sys.argv[2]
with provhpc.stage("train"):
    for e in range(3):
        with provhpc.epoch(e):
            for i in range(10):
                provhpc.metric("loss", 1.0 / (1 + 10 * e + i), step=10 * e + i)
        provhpc.flush(10)
        open(f"{marks}.{rank}.{e}", "w").close()
        while not os.path.exists(f"{go}.{e}"):
            time.sleep(0.05)
"""


def _wait(paths, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline and proc.poll() is None, paths
        time.sleep(0.05)


def _once(venv_bin, env, run):
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), "watch", run, "--once", "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_watch_follows_a_running_job(venv_bin, clean_env, tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(PROG)
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), "PROVHPC_RUN_ID": "watch",
           "PROVHPC_FLUSH_INTERVAL": "0.2"}
    marks, go = tmp_path / "epoch", tmp_path / "go"
    proc = subprocess.Popen([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                             os.path.join(venv_bin, "provhpc"), "run", "-o",
                             str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
                             str(script), str(marks), str(go)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = str(tmp_path / "prov" / "watch")
    watcher = None
    try:
        _wait([f"{marks}.{r}.0" for r in (0, 1)], proc)
        first = _once(venv_bin, env, str(tmp_path / "prov"))  # a directory: its newest run
        assert first["run"] == "watch" and first["status"] == "running"
        assert isinstance(first["updated"], int)
        ranks = {r["rank"]: r for r in first["ranks"]}
        assert set(ranks) == {0, 1}
        for r in ranks.values():
            assert {"rank", "node", "stage", "epoch", "step", "metrics", "records", "dropped",
                    "idle_s"} <= set(r)
            assert (r["stage"], r["epoch"], r["step"]) == ("train", 0, 9), r
            assert r["metrics"]["loss"] == pytest.approx(1 / 10)
            assert r["records"] > 0 and r["dropped"] == 0 and r["idle_s"] >= 0

        with provhpc.open(run) as live:  # one Run kept open, refreshed
            assert {r["epoch"] for r in live.snapshot()["ranks"]} == {0}
            (go.parent / f"{go.name}.0").touch()
            _wait([f"{marks}.{r}.1" for r in (0, 1)], proc)
            assert live.refresh()
            snap = live.snapshot()
            assert {(r["epoch"], r["step"]) for r in snap["ranks"]} == {(1, 19)}

        second = _once(venv_bin, env, run)
        assert {r["step"] for r in second["ranks"]} == {19}
        assert all(b["records"] > a["records"] for a, b in
                   zip(sorted(first["ranks"], key=lambda r: r["rank"]),
                       sorted(second["ranks"], key=lambda r: r["rank"])))

        watcher = subprocess.Popen([os.path.join(venv_bin, "provhpc"), "watch", run,
                                    "--json", "--interval", "0.3"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        (go.parent / f"{go.name}.1").touch()
        _wait([f"{marks}.{r}.2" for r in (0, 1)], proc)
        (go.parent / f"{go.name}.2").touch()
        assert proc.wait(60) == 0
        out, err = watcher.communicate(timeout=60)  # it ends when the run ends
        assert watcher.returncode == 0, err
        snaps = [json.loads(chunk) for chunk in out.replace("}\n{", "}\0{").split("\0")]
        assert snaps[0]["status"] == "running" and snaps[-1]["status"] == "ok"
        assert {r["step"] for r in snaps[-1]["ranks"]} == {29}
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        kill_tree(proc)
        remove_segments("watch")


def test_watch_refuses_what_is_not_a_run(tmp_path, capsys):
    from provhpc.cli import main

    assert main(["watch", str(tmp_path), "--once"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no runs in this directory" in err


def test_watch_of_a_half_written_partition_says_what_it_lacks(tmp_path, capsys):
    from _post_runs import build_run

    from provhpc.cli import main

    run = build_run(tmp_path, "run-h")
    bad = os.path.join(run, "node-b.h5")
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) // 2)
    assert main(["watch", run, "--once"]) == 1
    cap = capsys.readouterr()
    assert f"unreadable: {bad} (this view lacks it)" in cap.out
    assert bad in cap.err and "Traceback" not in cap.err
    assert "node-a" in cap.out  # the readable node is shown
