"""Multi-user safety (contract 7): owner-only files, per-user/per-job names, no network
listener, validated run ids, no environment secrets in the output."""

from __future__ import annotations

import glob
import os
import stat
import subprocess

import pytest

from provhpc.format.segment import Segment, segment_name, shm_dir
from provhpc.launch import session
from provhpc.launch.config import load
from provhpc.node.aggregator import Aggregator

pytestmark = pytest.mark.timeout(90)

PROG = '''
import os, time, provhpc
provhpc.metric("m", 1.0)
rank = os.environ.get("PMI_RANK", "0")
open(os.path.join(os.environ["SNAP"], f"pid.{rank}"), "w").write(str(os.getpid()))
while not os.path.exists(os.path.join(os.environ["SNAP"], "go")):
    time.sleep(0.02)
'''

SECRET = "s3cr3t-value-that-must-not-leak"


def _listening_inodes() -> set:
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(f) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if f.endswith(("tcp", "tcp6")) and cols[3] != "0A":
                continue
            out.add(cols[9])
    return out


def _socket_inodes(pid: int) -> set:
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_live_job_is_owner_only_and_listens_on_no_port(tmp_path, venv_bin, clean_env):
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    snap = tmp_path / "snap"
    snap.mkdir()
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), "SNAP": str(snap),
           "PROVHPC_TELEMETRY_INTERVAL": "0", "AWS_SECRET_ACCESS_KEY": SECRET,
           "MY_API_TOKEN": SECRET, "DB_PASSWORD": SECRET}
    out = tmp_path / "prov"
    proc = subprocess.Popen([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                             os.path.join(venv_bin, "provhpc"), "run", "--out", str(out), "--",
                             os.path.join(venv_bin, "python"), str(prog)], env=env,
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for r in range(2):
            for _ in range(1500):
                if (snap / f"pid.{r}").exists():
                    break
                subprocess.run(["sleep", "0.02"])
        pids = [int((snap / f"pid.{r}").read_text()) for r in range(2)]
        run_dir = [d for d in out.iterdir() if not d.is_symlink()][0]
        run_id = run_dir.name
        # segments: owner-only, named per user, job (run), node, rank and pid
        segs = sorted(glob.glob(os.path.join(shm_dir(), f"provhpc-{os.getuid()}-{run_id}-*")))
        assert len(segs) == 2
        for p in segs:
            assert _mode(p) == 0o600 and os.stat(p).st_uid == os.getuid()
        # run directory, partition, rendezvous directory and socket
        assert _mode(run_dir) == 0o700
        for h5 in run_dir.glob("*.h5"):
            assert _mode(h5) == 0o600
        socks = [p for p in glob.glob(str(tmp_path / "rt" / "**" / "*"), recursive=True)
                 if stat.S_ISSOCK(os.stat(p).st_mode)]
        socks += [p for p in glob.glob(f"/tmp/provhpc-{os.getuid()}/*.sock")]
        assert socks
        for p in socks:
            assert _mode(p) & 0o077 == 0, p
            assert _mode(os.path.dirname(p)) == 0o700
        # nothing of ours listens on a network port
        agg = [int(x) for x in subprocess.run(
            ["pgrep", "-f", f"provhpc aggregate --run-id {run_id}"], capture_output=True,
            text=True).stdout.split()]
        listening = _listening_inodes()
        assert agg and pids
        # the ranks are MPICH processes whose own TCP listeners are MPI's, not ours: the
        # aggregator (no MPI) must have none
        for pid in agg:
            assert not (_socket_inodes(pid) & listening), f"pid {pid} listens on a port"
            # the run's metadata (training argv, cwd, git, packages) is not on its command
            # line, which every user can read in /proc
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().decode()
            assert "prog.py" not in cmdline and '"cwd"' not in cmdline, cmdline
    finally:
        (snap / "go").write_text("")
        proc.wait(60)
    # every file the run left is owner-only, the aggregator's log included; the metadata
    # hand-over file is gone and so is the run's runtime directory
    files = list(run_dir.iterdir())
    assert any(p.name.endswith(".aggregator.log") for p in files)
    for p in files:
        assert _mode(p) & 0o077 == 0, (p, oct(_mode(p)))
    assert not glob.glob(str(tmp_path / "rt" / "**" / "meta.json"), recursive=True)
    assert not os.path.exists(tmp_path / "rt" / f"provhpc-{os.getuid()}" / run_id)
    # no secret from the environment in any output file
    for path in glob.glob(str(run_dir / "*")):
        with open(path, "rb") as fh:
            assert SECRET.encode() not in fh.read(), f"{path} holds an environment secret"


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", ".hidden", "a" * 200, "x\x00y",
                                 "/abs"])
def test_run_ids_validated(bad, tmp_path):
    with pytest.raises(ValueError):
        session.validate_run_id(bad)


def test_traversal_run_id_rejected_by_provhpc_run(tmp_path, venv_bin, clean_env):
    env = {**clean_env, "PROVHPC_RUN_ID": "../../escape", "PROVHPC_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", str(tmp_path / "o"),
                        "--", os.path.join(venv_bin, "python"), "-c", "pass"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "invalid run id" in r.stderr
    assert not os.path.exists(tmp_path / "escape")


def test_segment_of_other_mode_or_outside_shm_is_not_mapped(tmp_path):
    cfg = load(run_id="sec-test", runtime_dir=str(tmp_path))
    agg = Aggregator(cfg, "sec-test", "n", str(tmp_path), "ipc://unused", str(tmp_path / "r"))
    name = segment_name("sec-test", "n", 0, os.getpid())
    path = os.path.join(shm_dir(), name)
    seg = Segment.create(path, 0, 2, 16, 256)
    try:
        os.chmod(path, 0o644)  # readable by others: refused
        with pytest.raises(PermissionError):
            agg._attach(path, 0, os.getpid())
        os.chmod(path, 0o600)
        assert agg._attach(path, 0, os.getpid()).rank == 0
        with pytest.raises(ValueError):  # right header, wrong name for this job
            agg._attach(path, 1, os.getpid())
        link = os.path.join(shm_dir(), segment_name("sec-test", "n", 0, 1))
        os.symlink("/etc/passwd", link)
        try:
            with pytest.raises(ValueError):
                agg._attach(link, 0, 1)
        finally:
            os.unlink(link)
    finally:
        seg.close(unlink=True)


@pytest.mark.parametrize("group, fmode, dmode", [("0", 0o600, 0o700), ("1", 0o640, 0o750)])
def test_run_directory_follows_one_documented_mode(group, fmode, dmode, tmp_path, venv_bin,
                                                   clean_env):
    """Every file of a finished run (manifest, partition, aggregator log) has one mode:
    owner-only by default, group-readable with PROVHPC_GROUP_READABLE=1."""
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_GROUP_READABLE": group, "PROVHPC_RUN_ID": f"mode-{group}"}
    out = tmp_path / "prov"
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", str(out), "--",
                        os.path.join(venv_bin, "python"), "-c",
                        "import provhpc; provhpc.metric('m', 1.0)"],
                       env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    run_dir = out / f"mode-{group}"
    assert _mode(run_dir) == dmode
    names = sorted(p.name for p in run_dir.iterdir())
    assert "manifest.json" in names and any(n.endswith(".h5") for n in names) \
        and any(n.endswith(".aggregator.log") for n in names), names
    for p in run_dir.iterdir():
        assert _mode(p) == fmode, (p.name, oct(_mode(p)))
