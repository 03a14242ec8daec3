"""Issue 12 point 3: another user cannot stop our runs by taking the default runtime
directory first.  The squatter is a real second user (``nobody``, through setpriv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

import h5py
import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                                 reason="needs root and setpriv to act as a second user")]

PROG = 'import provhpc; provhpc.metric("m", 2.5, step=7)'


@pytest.fixture
def shared_tmp():
    """A sticky world-writable dir like /tmp, reachable by the second user (pytest's own
    tmp_path sits under a 0700 directory)."""
    d = tempfile.mkdtemp(prefix="provhpc-test-shared-", dir="/tmp")
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                   check=True)


@pytest.mark.parametrize("squat", ["dir", "open-dir", "symlink"])
def test_taken_runtime_dir_falls_back_and_runs(squat, shared_tmp, tmp_path, venv_bin,
                                                clean_env):
    from pathlib import Path

    tmp = Path(shared_tmp)
    taken = tmp / f"provhpc-{os.getuid()}"
    if squat == "dir":
        _as_nobody("mkdir", "-m", "0755", str(taken))
    elif squat == "open-dir":
        _as_nobody("mkdir", "-m", "0777", str(taken))
    else:
        _as_nobody("ln", "-s", "/", str(taken))
    env = {k: v for k, v in clean_env.items() if k != "XDG_RUNTIME_DIR"}
    env.update(TMPDIR=str(tmp), PROVHPC_RUN_ID=f"rt-{squat}", PROVHPC_TELEMETRY_INTERVAL="0")
    out = tmp_path / "prov"
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", str(out), "--",
                        os.path.join(venv_bin, "python"), "-c", PROG], env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    fallback = f"{taken}.1"
    warnings = [ln for ln in r.stderr.splitlines() if "not yours or not private" in ln]
    assert len(warnings) == 1 and fallback in warnings[0], r.stderr
    st = os.lstat(fallback)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    # the squatter's directory is untouched and got nothing of ours
    assert os.lstat(taken).st_uid == 65534
    if squat != "symlink":
        assert os.listdir(taken) == []
    (part,) = (out / f"rt-{squat}").glob("*.h5")
    with h5py.File(part, "r") as f:
        assert f.attrs["complete"]
        assert len(f["records"]) > 0


def test_explicit_runtime_dir_that_is_not_private_is_refused(shared_tmp, tmp_path, venv_bin,
                                                              clean_env):
    rt = shared_tmp
    _as_nobody("mkdir", "-m", "0755", os.path.join(rt, f"provhpc-{os.getuid()}"))
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(rt), "PROVHPC_RUN_ID": "rt-explicit"}
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out",
                        str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"), "-c",
                        PROG], env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert "must be owned by you" in r.stderr
