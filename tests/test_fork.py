"""Issue 12 point 4: fork-safe and MPI-neutral.

A program that forks (``os.fork``, ``multiprocessing`` fork and spawn, a torch DataLoader
with two fork workers) sees the same exit codes of its children, and ends with the same
exit code, with capture and without it, alone and under a real ``mpiexec -n 2``.  A child
that calls ``sys.exit`` never ends the job, never finalizes MPI and never aborts the
other ranks; a single process under ``provhpc run`` never loads MPI at all.
"""

from __future__ import annotations

import os
import subprocess

import h5py
import pytest

pytestmark = pytest.mark.timeout(240)

# Prints the exit codes its children ended with, then ends with exit code 7 (an exit code
# of the program's own, so that a wrapper that replaces it shows).
PROG = r"""
import os, signal, sys, time, multiprocessing as mp
import provhpc

def work(x):
    provhpc.metric("pool", float(x))
    return x * 2

def child_exit(code):
    provhpc.metric("child", float(code))
    sys.exit(code)

def main():
    codes = []
    pid = os.fork()                      # a bare fork child that calls sys.exit
    if pid == 0:
        provhpc.metric("forked", 1.0)
        sys.exit(3)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    pid = os.fork()                      # one that is stopped with SIGTERM
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        with ctx.Pool(2) as pool:
            codes.append(sum(pool.map(work, range(4))))
        proc = ctx.Process(target=child_exit, args=(5,))
        proc.start()
        proc.join()
        codes.append(proc.exitcode)
    if os.environ.get("WITH_TORCH"):
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        loader = DataLoader(TensorDataset(torch.arange(16.0)), batch_size=4, num_workers=2,
                            multiprocessing_context="fork")
        total = 0.0
        for step, (batch,) in enumerate(loader):
            provhpc.metric("batch_sum", float(batch.sum()), step=step)
            total += float(batch.sum())
        codes.append(total)
    mpi = "mpi" if "mpi4py.MPI" in sys.modules else "no-mpi"
    os.write(1, f"codes {codes} {mpi}\n".encode())  # one write: ranks' lines never mix
    sys.exit(7)

if __name__ == "__main__":
    main()
"""


def _launch(venv_bin, env, tmp_path, capture: bool, ranks: int):
    script = tmp_path / "forks.py"
    script.write_text(PROG)
    cmd = [os.path.join(venv_bin, "python"), str(script)]
    if capture:
        cmd = [os.path.join(venv_bin, "provhpc"), "run", "--out", str(tmp_path / "prov"),
               "--"] + cmd
    if ranks:
        cmd = [os.path.join(venv_bin, "mpiexec"), "-n", str(ranks)] + cmd
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200,
                          cwd=tmp_path)


def _codes(stdout: str) -> list[str]:
    return sorted(ln for ln in stdout.splitlines() if ln.startswith("codes"))


@pytest.mark.parametrize("ranks", [0, 2], ids=["alone", "mpiexec-n2"])
def test_forked_children_and_the_program_keep_their_exit_codes(venv_bin, clean_env, tmp_path,
                                                               ranks):
    pytest.importorskip("torch")  # the optional extra; make test installs it
    env = {**clean_env, "WITH_TORCH": "1", "PROVHPC_TELEMETRY_INTERVAL": "0"}
    off = _launch(venv_bin, env, tmp_path, capture=False, ranks=ranks)
    on = _launch(venv_bin, env, tmp_path, capture=True, ranks=ranks)
    assert off.returncode == 7, off.stderr
    assert on.returncode == off.returncode, on.stderr
    expected = "codes [3, -15, 12, 5, 12, 5, 120.0]"
    assert _codes(off.stdout) == [f"{expected} no-mpi"] * max(ranks, 1), off.stdout
    # under mpiexec provhpc starts MPI for the run-id broadcast (and only the rank
    # finalizes it); alone it never loads MPI
    mpi = "mpi" if ranks else "no-mpi"
    assert _codes(on.stdout) == [f"{expected} {mpi}"] * max(ranks, 1), on.stdout + on.stderr
    assert "aborting the job" not in on.stderr and "MPI_Abort" not in on.stderr, on.stderr

    # what the children recorded is there: every worker's points, forked or spawned
    (run_dir,) = [p for p in (tmp_path / "prov").iterdir() if p.name != "latest"]
    metrics: dict[str, int] = {}
    for part in run_dir.glob("*.h5"):
        with h5py.File(part, "r") as f:
            idx, heap = f["strings"][:], f["string_heap"][:].tobytes()
            strings = [heap[o:o + n].decode() for o, n, _ in idx]
            rec = f["records"][:]
            for r in rec[rec["kind"] == 7]:
                metrics[strings[r["name"]]] = metrics.get(strings[r["name"]], 0) + 1
            roles = sorted(set(f["ranks"]["role"].astype(str).tolist()))
            # forked children are workers, spawned ones joined through the environment
            assert roles == ["child", "rank", "worker"], roles
    n = max(ranks, 1)
    assert metrics == {"forked": n, "pool": 8 * n, "child": 2 * n, "batch_sum": 4 * n}, metrics


def test_a_forked_child_of_a_failing_rank_never_aborts_the_others(venv_bin, clean_env,
                                                                  tmp_path):
    """Rank 1 forks a child that raises; the child's failure is the child's (exit 1 seen by
    its parent), and the job ends normally."""
    script = tmp_path / "raise.py"
    script.write_text(
        "import os, sys, provhpc\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    raise RuntimeError('child failed')\n"
        "code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
        "os.write(1, f'child {code}\\n'.encode())\n")
    r = subprocess.run([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                        os.path.join(venv_bin, "provhpc"), "run", "--out",
                        str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
                        str(script)], env=clean_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("child 1") == 2, r.stdout  # the ranks' lines may interleave
    assert r.stderr.count("RuntimeError: child failed") == 2, r.stderr
    assert "aborting the job" not in r.stderr
