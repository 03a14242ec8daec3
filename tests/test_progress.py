"""Issue 13 point 8: long post-processing verbs show progress on a terminal, never in a
log or a pipe."""

from __future__ import annotations

import os
import pty
import select
import subprocess

import pytest
from _post_runs import build_run


def _stderr_on_a_terminal(cmd, env) -> tuple[int, bytes]:
    master, slave = pty.openpty()
    try:
        p = subprocess.run(cmd, stderr=slave, stdout=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(slave)
    data = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end is closed
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return p.returncode, data


@pytest.mark.parametrize("verb", ["index", "merge", "recover", "export", "report"])
def test_progress_on_a_terminal_only(tmp_path, venv_bin, clean_env, verb):
    pytest.importorskip("rich")
    if verb == "report":
        pytest.importorskip("matplotlib")
    run = build_run(tmp_path, "run-p")
    args = {"index": [run], "merge": [run, "-o", str(tmp_path / "m")], "recover": [run],
            "export": [run, "--format", "parquet", "-o", str(tmp_path / "pq")],
            "report": [run, "-o", str(tmp_path / "rep")]}[verb]
    cmd = [os.path.join(venv_bin, "provhpc"), verb, *args]
    rc, tty_err = _stderr_on_a_terminal(cmd, clean_env)
    assert rc == 0, tty_err
    assert f"{verb} ".encode() in tty_err and b"100%" in tty_err, tty_err[:300]
    def again():
        for d in ("m", "pq", "rep"):
            subprocess.run(["rm", "-rf", str(tmp_path / d)], check=True)
        if verb == "index":
            os.unlink(os.path.join(run, "index.hdf5"))

    again()  # a pipe (a batch job's log): no bar
    p = subprocess.run(cmd, capture_output=True, env=clean_env, timeout=120)
    assert p.returncode == 0 and b"\x1b[" not in p.stderr and b"%" not in p.stderr, p.stderr
    again()  # a terminal with PROVHPC_PROGRESS=0: no bar either
    rc, off = _stderr_on_a_terminal(cmd, {**clean_env, "PROVHPC_PROGRESS": "0"})
    assert rc == 0 and b"100%" not in off, off[:300]
