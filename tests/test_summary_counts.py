"""`provhpc summary` counts what each process sent, and says what the aggregator wrote.

A real run under ``provhpc run`` whose program forks a worker that records too, with the
aggregator's telemetry sampling every 0.1 s: each row of the rank table shows the
records by kind of its own process (they add up to the row's records), and the run's
total is the rows' records plus the telemetry samples, which the text names.  A merged
copy of the run (``provhpc merge``) reads the same.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.timeout(120)

PROG = r"""
import os, time, provhpc
with provhpc.task("parent"):
    provhpc.metric("loss", 0.5, step=0)
    pid = os.fork()
    if pid == 0:  # a worker: its own agent, its own row
        for i in range(7):
            provhpc.metric("worker_loss", float(i), step=i)
        provhpc.flush(10)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.6)  # a few telemetry samples of this process
"""


def _summary(venv_bin, env, run):
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "summary", run, "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = subprocess.run([os.path.join(venv_bin, "provhpc"), "summary", run], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    return json.loads(r.stdout), text


def _rows(s):
    return sorted((r["role"], r["records"], r["records_by_kind"]) for r in s["ranks"])


def test_rows_count_their_own_process_and_telemetry_is_named(venv_bin, clean_env, tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(PROG)
    env = {**clean_env, "PROVHPC_RUN_ID": "counts", "PROVHPC_TELEMETRY_INTERVAL": "0.1",
           "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt")}
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", str(tmp_path / "prov"),
                        "--", os.path.join(venv_bin, "python"), str(script)], env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    run = str(tmp_path / "prov" / "counts")
    s, text = _summary(venv_bin, env, run)

    roles = sorted(row["role"] for row in s["ranks"])
    assert "worker" in roles and len(roles) >= 2, s["ranks"]
    for row in s["ranks"]:  # a row's kinds are its own process's records, nothing else
        assert sum(row["records_by_kind"].values()) == row["records"], row
    worker = next(row for row in s["ranks"] if row["role"] == "worker")
    assert worker["records_by_kind"].get("metric") == 7, worker
    samples = s["telemetry_records"]
    assert samples > 0
    assert s["records_total"] == sum(row["records"] for row in s["ranks"]) + samples
    assert sum(s["records_by_kind"].values()) == s["records_total"]  # the samples too
    sent = s["records_total"] - samples
    assert (f"records {s['records_total']} ({sent} from the {len(s['ranks'])} processes "
            f"below + {samples} telemetry samples by the aggregator)") in text, text

    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "query", run, "capture", "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (part,) = json.loads(r.stdout)["partitions"]
    assert part["telemetry_records"] == samples

    merged = tmp_path / "merged"
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "merge", "-o", str(merged), run],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m, _ = _summary(venv_bin, env, str(merged / "counts"))
    assert _rows(m) == _rows(s)
    assert (m["records_total"], m["telemetry_records"]) == (s["records_total"], samples)
