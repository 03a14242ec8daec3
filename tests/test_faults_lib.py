"""Helpers of the fault-injection tests: a counting rank program, job launch, checks.

The rank program makes record i ``metric("x", i, step=i)`` and, after the call
returned, stores i in a small memory-mapped progress file; a SIGKILL cannot
undo a store to a shared mapping, so the file says which calls had returned.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np

from provhpc.format import records as R
from provhpc.format.partition import open_partition
from provhpc.format.segment import shm_dir

PROGRAM = r'''
import mmap, os, struct, sys, time
import provhpc

out, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rank = int(os.environ.get("PMI_RANK", "0"))
fd = os.open(f"{out}/progress.{rank}", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 8)
mm = mmap.mmap(fd, 8)
struct.pack_into("<q", mm, 0, -1)
with open(f"{out}/pid.{rank}.tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(f"{out}/pid.{rank}.tmp", f"{out}/pid.{rank}")
check = os.open(f"{out}/checkpoint.{rank}", os.O_WRONLY | os.O_CREAT, 0o600)
pace = int(os.environ.get("FAULT_PACE", "200"))
for i in range(n):
    provhpc.metric("x", float(i), step=i)
    struct.pack_into("<q", mm, 0, i)
    if i % pace == 0:
        os.pwrite(check, struct.pack("<q", i), 0)  # a second witness, by write(2)
        time.sleep(0.001)
if mode == "vanish":      # a rank that never says goodbye (once every rank has started)
    size = int(os.environ.get("PMI_SIZE", "1"))
    while not all(os.path.exists(f"{out}/pid.{r}") for r in range(size)):
        time.sleep(0.01)
    os._exit(0)
if mode == "hang":        # keep running until killed from outside
    while True:
        time.sleep(0.05)
'''

FAST = {"PROVHPC_FLUSH_INTERVAL": "0.2", "PROVHPC_HEARTBEAT": "0.1",
        "PROVHPC_SHUTDOWN_TIMEOUT": "3", "PROVHPC_STARTUP_TIMEOUT": "10",
        "PROVHPC_TELEMETRY_INTERVAL": "0"}


def job_env(clean_env, tmp_path, **extra) -> dict:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700, exist_ok=True)
    env = {**clean_env, **FAST, "PROVHPC_RUNTIME_DIR": str(rt), "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_program(tmp_path, text: str = PROGRAM) -> str:
    path = tmp_path / "rankprog.py"
    path.write_text(text)
    return str(path)


def start_job(venv_bin, tmp_path, env, nranks: int, n: int, mode: str = "run",
              program: str | None = None, out: str | None = None,
              launcher_args: tuple = ()) -> subprocess.Popen:
    prog = program or write_program(tmp_path)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out = out or str(tmp_path / "prov")
    cmd = [os.path.join(venv_bin, "mpiexec"), *launcher_args, "-n", str(nranks),
           os.path.join(venv_bin, "provhpc"),
           "run", "--out", out, "--", os.path.join(venv_bin, "python"), prog, str(work), str(n),
           mode]
    return subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            v = cond()
            if v:
                return v
            raise AssertionError(f"job ended before {what}: {output(proc)}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def output(proc) -> str:
    try:
        out, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return "<running>"
    return (out or b"").decode(errors="replace")[-4000:]


def rank_pids(tmp_path, nranks: int) -> dict:
    pids = {}
    for r in range(nranks):
        p = tmp_path / "work" / f"pid.{r}"
        if not p.exists():
            return {}
        pids[r] = int(p.read_text())
    return pids


def progress(tmp_path, rank: int) -> int:
    data = (tmp_path / "work" / f"progress.{rank}").read_bytes()
    return struct.unpack("<q", data[:8])[0] if len(data) >= 8 else -1


def witnesses(tmp_path, nranks: int) -> dict:
    """Per rank, for a failure's message: the last call PROGRAM saw return by its mmap'd
    progress file, the same by its every-``pace`` write(2) checkpoint (a lower bound), and
    the progress file's size and mtime."""
    out = {}
    for r in range(nranks):
        path, check = tmp_path / "work" / f"progress.{r}", tmp_path / "work" / f"checkpoint.{r}"
        data = check.read_bytes() if check.exists() else b""
        st = path.stat() if path.exists() else None
        out[r] = {"progress": progress(tmp_path, r) if st else None,
                  "checkpoint": struct.unpack("<q", data[:8])[0] if len(data) >= 8 else None,
                  "progress_file": (st.st_size, st.st_mtime_ns) if st else None}
    return out


def run_dir(out: str) -> str:
    runs = [d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(d)
            and not os.path.islink(d)]
    assert len(runs) == 1, runs
    return runs[0]


def aggregator_pid(tmp_path) -> int | None:
    for p in glob.glob(str(tmp_path / "rt" / "provhpc-*" / "*" / "*" / "ready")):
        try:
            with open(p) as fh:
                return int(json.load(fh)["pid"])
        except (OSError, ValueError, KeyError):
            return None
    return None


def partitions_complete(rdir: str) -> bool:
    paths = glob.glob(os.path.join(rdir, "*.h5"))
    if not paths:
        return False
    for p in paths:
        try:
            with open_partition(p) as f:
                if not bool(f.attrs.get("complete", False)):
                    return False
        except OSError:
            return False
    return True


def metric_steps(rdir: str, name: str = "x") -> dict:
    """rank -> sorted array of the steps of metric ``name`` over all partitions."""
    out: dict = {}
    for p in sorted(glob.glob(os.path.join(rdir, "*.h5"))):
        with open_partition(p) as f:
            recs = f["records"][:]
            idx = f["strings"][:]
            heap = f["string_heap"][:].tobytes()
        names = [heap[o:o + n] for o, n, _ in idx]
        try:
            sid = names.index(name.encode())
        except ValueError:
            continue
        sel = recs[(recs["kind"] == R.METRIC) & (recs["name"] == sid)]
        for rank in np.unique(sel["rank"]):
            steps = sel["step"][sel["rank"] == rank]
            out[int(rank)] = np.sort(np.concatenate([out.get(int(rank), []), steps])).astype(int)
    return out


def check_no_loss(rdir: str, returned: dict) -> int:
    """Every step 0..returned[r] of every rank is stored exactly once; returns the count."""
    steps = metric_steps(rdir)
    total = 0
    for rank, last in returned.items():
        got = steps.get(rank, np.zeros(0, int))
        uniq, counts = np.unique(got, return_counts=True)
        assert (counts == 1).all(), f"rank {rank}: duplicated steps {uniq[counts > 1][:10]}"
        need = np.arange(last + 1)
        missing = np.setdiff1d(need, uniq)
        assert not len(missing), (f"rank {rank}: {len(missing)} returned records lost, "
                                  f"first {missing[:10]} (returned up to {last})")
        # at most the one call that was in flight when the rank died may be there too
        assert not len(uniq) or uniq.max() <= last + 1, (rank, uniq.max(), last)
        total += last + 1
    return total


def kill_tree(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def leftover_segments(run_id: str) -> list:
    prefix = f"provhpc-{os.getuid()}-{run_id}-"
    return [os.path.join(shm_dir(), n) for n in os.listdir(shm_dir()) if n.startswith(prefix)]


def remove_segments(run_id: str) -> None:
    for p in leftover_segments(run_id):
        try:
            os.unlink(p)
        except OSError:
            pass


PY = sys.executable


def check_rank_counts(rdir: str) -> dict:
    """Every rank row's ``records`` equals the records of that rank its partition holds."""
    held, rows = {}, {}
    for path in glob.glob(os.path.join(rdir, "*.h5")):
        with open_partition(path) as f:
            ranks, counts = np.unique(f["records"].fields("rank")[:], return_counts=True)
            held.update(zip(ranks.tolist(), counts.tolist()))
            rows.update({int(r["rank"]): (int(r["records"]), r["status"].decode())
                         for r in f["ranks"][:] if r["role"] == b"rank"})
    assert {r: n for r, (n, _) in rows.items()} == held, (rows, held)
    return rows


def start_aggregator(venv_bin, env, tmp_path, run_id: str, node: str, *extra: str):
    """A real ``provhpc aggregate`` of ``run_id`` on ``node`` writing into ``tmp_path/prov``
    (heartbeat 0.05 s, no telemetry; its runtime files in ``tmp_path/rt``), once it is
    ready: ``(process, endpoint)``."""
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700, exist_ok=True)
    endpoint, ready = f"ipc://{rt}/sock", str(rt / "ready")
    env = {**env, "PROVHPC_HEARTBEAT": "0.05", "PROVHPC_TELEMETRY_INTERVAL": "0"}
    proc = subprocess.Popen([os.path.join(venv_bin, "provhpc"), "aggregate", "--run-id", run_id,
                             "--node", node, "--out", str(tmp_path / "prov"), "--endpoint",
                             endpoint, "--ready", ready, *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise AssertionError("the aggregator did not get ready")
        time.sleep(0.02)
    return proc, endpoint


def rank_agent(tmp_path, run_id: str, node: str, rank: int, endpoint: str):
    """A real agent of ``rank`` in this process, sending to ``endpoint``, welcomed."""
    from provhpc.capture.agent import Agent
    from provhpc.format.segment import segment_name
    from provhpc.launch.config import load
    from provhpc.launch.identity import Identity

    cfg = load(out=str(tmp_path / "prov"), run_id=run_id, flush_interval=0.2)
    seg = os.path.join(shm_dir(), segment_name(run_id, node, rank, os.getpid()))
    agent = Agent(cfg, Identity(rank=rank, local_rank=rank, node=node, host=node), run_id,
                  endpoint, seg)
    assert agent.wait_ready(10)
    return agent


def check_rank0_ended_unseen(tmp_path, run_id: str, pid: int) -> None:
    """The run's one partition is complete; rank 0 (``pid``) is listed killed with no
    record, rank 1 ok with its records, and the run ended killed by rank 0."""
    from provhpc.post.reader import Run

    with Run(str(tmp_path / "prov" / run_id)) as run:
        (part,) = run.partitions
        assert part.complete
        rows = {int(r["rank"]): r for r in part.ranks()}
        assert rows[0]["status"].decode() == "killed" and int(rows[0]["pid"]) == pid
        assert int(rows[0]["records"]) == 0
        assert rows[1]["status"].decode() == "ok" and int(rows[1]["records"]) >= 1
        assert run.end()["state"] == "killed" and run.end()["ranks"] == [0], run.end()
