"""Fault injection with real processes and real signals (contract points 1-5).

Each test launches a real job (``mpiexec -n N provhpc run -- python prog``)
whose record i is ``metric("x", i, step=i)``; the rank stores i in a mapped
progress file after the call returned, so "no returned record lost" is checked
exactly: steps 0..i of each rank are in the partition exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time

import pytest
from test_faults_lib import (
    aggregator_pid,
    check_no_loss,
    check_rank_counts,
    job_env,
    kill_tree,
    leftover_segments,
    metric_steps,
    output,
    partitions_complete,
    progress,
    rank_pids,
    remove_segments,
    run_dir,
    start_job,
    wait_for,
    witnesses,
    write_program,
)

from provhpc.format.partition import open_partition
from provhpc.node.recover import recover
from provhpc.post.reader import Run, summary

pytestmark = pytest.mark.timeout(120)

KILL_SEEDS = [11, 22, 33, 44, 55, 66]
NRANKS = 4


def _log_figures(**fig) -> None:
    """Append the figures of a run to $PROVHPC_FAULT_LOG (for the report), if set."""
    path = os.environ.get("PROVHPC_FAULT_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(fig) + "\n")


@contextlib.contextmanager
def _job(venv_bin, tmp_path, env, nranks, n, mode="run", **kw):
    proc = start_job(venv_bin, tmp_path, env, nranks, n, mode, **kw)
    try:
        yield proc
    finally:
        kill_tree(proc)
        agg = aggregator_pid(tmp_path)
        if agg:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agg, signal.SIGKILL)
        for d in (tmp_path / "prov").glob("*") if (tmp_path / "prov").exists() else []:
            remove_segments(d.name)


# ---------------------------------------------------------------------- contract 3
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_rank_sigkill_loses_no_returned_record(seed, tmp_path, venv_bin, clean_env):
    """SIGKILL of random ranks at a random moment: every returned call is stored once."""
    rng = random.Random(seed)
    env = job_env(clean_env, tmp_path, PROVHPC_SLOT_RECORDS=rng.choice([256, 512, 2048]),
                  PROVHPC_BACKPRESSURE_TIMEOUT=10)
    with _job(venv_bin, tmp_path, env, NRANKS, 10**9) as proc:
        pids = wait_for(lambda: rank_pids(tmp_path, NRANKS), 60, "rank pids", proc)
        wait_for(lambda: all(progress(tmp_path, r) >= 0 for r in range(NRANKS)), 60,
                 "first records", proc)
        # ranks do not wait for the aggregator; kill once it serves, so that the kill
        # lands among acknowledged, in-flight and filling slots alike
        wait_for(lambda: aggregator_pid(tmp_path), 60, "the aggregator", proc)
        time.sleep(rng.uniform(0.05, 1.5))
        victims = rng.sample(range(NRANKS), rng.randint(1, NRANKS))
        for v in victims:
            # the launcher may already have taken this rank down after the first kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[v], signal.SIGKILL)
        proc.wait(60)  # the launcher takes the other ranks down
        rdir = run_dir(str(tmp_path / "prov"))
        wait_for(lambda: partitions_complete(rdir), 60, "the aggregator to close the partition")
        returned = {r: progress(tmp_path, r) for r in range(NRANKS)}
        try:
            n = check_no_loss(rdir, returned)
        except AssertionError as e:  # say what the job and its ranks were (a rare failure)
            ranks = summary(Run(rdir)).get("ranks")
            raise AssertionError(f"{e}\nrank pids {pids}, victims {victims}\nranks {ranks}\n"
                                 f"witnesses {witnesses(tmp_path, NRANKS)}\n"
                                 f"job output:\n{output(proc)}") from None
        assert not leftover_segments(os.path.basename(rdir)), "salvaged segments not removed"
    _log_figures(test="rank_sigkill", seed=seed, victims=victims, returned_records=n, lost=0)


def test_rank_without_goodbye_is_salvaged(tmp_path, venv_bin, clean_env):
    """A rank that ends with os._exit (no atexit, no goodbye): its records are salvaged."""
    env = job_env(clean_env, tmp_path)
    with _job(venv_bin, tmp_path, env, 2, 5000, "vanish") as proc:
        rc = proc.wait(60)
        # MPICH's Hydra SIGKILLs the ranks still alive once one exits without MPI_Finalize
        # (measured: the rank whose os._exit comes second may be reported "EXIT CODE: 9");
        # either way both ranks end without a goodbye, which is what this test is about
        assert rc in (0, 9), output(proc)
        rdir = run_dir(str(tmp_path / "prov"))
        wait_for(lambda: partitions_complete(rdir), 30, "the partition to close")
        check_no_loss(rdir, {r: progress(tmp_path, r) for r in range(2)})
        with Run(rdir) as run:
            statuses = {r["rank"]: r["status"] for r in run.ranks()}
        assert statuses == {0: "killed", 1: "killed"}


# ---------------------------------------------------------------------- contract 4
@pytest.mark.parametrize("seed", [7, 8])
def test_aggregator_sigkill_then_recover(seed, tmp_path, venv_bin, clean_env):
    """Aggregator SIGKILLed mid-write: partition opens; recover adds the segments, once each."""
    rng = random.Random(seed)
    n = 20000
    # room for every record in the segments after the kill, so no drop is needed
    env = job_env(clean_env, tmp_path, PROVHPC_SLOT_RECORDS=1024, PROVHPC_SLOTS=32,
                  PROVHPC_SHUTDOWN_TIMEOUT=1, FAULT_PACE=100)
    with _job(venv_bin, tmp_path, env, NRANKS, n) as proc:
        wait_for(lambda: rank_pids(tmp_path, NRANKS), 60, "rank pids", proc)
        threshold = rng.randint(500, 8000)
        wait_for(lambda: min(progress(tmp_path, r) for r in range(NRANKS)) >= threshold, 60,
                 "progress", proc)
        # ranks do not wait for the aggregator to start: wait until it has acknowledged some
        agg = wait_for(lambda: aggregator_pid(tmp_path), 60, "the aggregator", proc)
        wait_for(lambda: _stored(tmp_path) >= 1000, 60, "acknowledged records", proc)
        os.kill(agg, signal.SIGKILL)
        assert proc.wait(90) == 0, output(proc)  # the training is unaffected
        rdir = run_dir(str(tmp_path / "prov"))
        # the killed writer's file opens as it is (SWMR), with what it had acknowledged
        with open_partition(os.path.join(rdir, "vm.h5")) as f:
            before = f["records"].shape[0]
            assert not f.attrs["complete"]
        assert leftover_segments(os.path.basename(rdir))
        rep = recover(rdir)
        assert [p["action"] for p in rep["partitions"]] == ["rebuilt"], rep
        assert rep["partitions"][0]["records_before"] == before
        returned = {r: progress(tmp_path, r) for r in range(NRANKS)}
        assert all(v == n - 1 for v in returned.values())
        total = check_no_loss(rdir, returned)
        assert partitions_complete(rdir)
        # the streams the killed aggregator never closed: counted from the file, not 0
        assert {s for _, s in check_rank_counts(rdir).values()} == {"salvaged"}
        assert not leftover_segments(os.path.basename(rdir))
        # running it again changes nothing
        rep2 = recover(rdir)
        assert [p["action"] for p in rep2["partitions"]] == ["ok"]
        check_no_loss(rdir, returned)
    _log_figures(test="aggregator_sigkill", seed=seed, returned_records=total,
                 acked_before_kill=before, lost=0)


def _stored(tmp_path) -> int:
    try:
        with open_partition(os.path.join(run_dir(str(tmp_path / "prov")), "vm.h5")) as f:
            return f["records"].shape[0]
    except (OSError, AssertionError):
        return 0


# ---------------------------------------------------------------------- contract 5
def test_sigterm_to_whole_job_drains_within_5s(tmp_path, venv_bin, clean_env):
    """SLURM time limit: SIGTERM to every rank and the aggregator; closed within 5 s.

    As under SLURM, every rank has its time to end (slurmstepd waits KillWait): Hydra's
    auto-cleanup would SIGKILL the other ranks as soon as the first exits 143, and on 2
    loaded cores a rank that had not sent its goodbye yet would read ``killed``."""
    env = job_env(clean_env, tmp_path, PROVHPC_SHUTDOWN_TIMEOUT=10)
    with _job(venv_bin, tmp_path, env, NRANKS, 10**9,
              launcher_args=("-disable-auto-cleanup",)) as proc:
        pids = wait_for(lambda: rank_pids(tmp_path, NRANKS), 60, "rank pids", proc)
        wait_for(lambda: min(progress(tmp_path, r) for r in range(NRANKS)) > 2000, 60,
                 "progress", proc)
        agg = wait_for(lambda: aggregator_pid(tmp_path), 60, "the aggregator", proc)
        t0 = time.monotonic()
        for pid in [*pids.values(), agg]:
            os.kill(pid, signal.SIGTERM)
        rdir = run_dir(str(tmp_path / "prov"))
        proc.wait(30)
        wait_for(lambda: partitions_complete(rdir) and not os.path.exists(f"/proc/{agg}"),
                 30, "drain")
        elapsed = time.monotonic() - t0
        assert elapsed < 5.0, f"drain took {elapsed:.2f} s"
        check_no_loss(rdir, {r: progress(tmp_path, r) for r in range(NRANKS)})
        with Run(rdir) as run:
            assert {r["status"] for r in run.ranks()} == {"terminated"}
            assert not summary(run)["dropped_total"]
    _log_figures(test="sigterm", drain_s=round(elapsed, 3))


# ---------------------------------------------------------------------- no aggregator
@pytest.mark.parametrize("n", [3000, 9000])
def test_no_aggregator_ranks_do_not_hang(n, tmp_path, venv_bin, clean_env):
    """No aggregator ever starts: ranks finish; records wait in the segments (up to their
    capacity, the rest counted as no_aggregator drops); recover turns them into a partition."""
    env = job_env(clean_env, tmp_path, PROVHPC_EXTERNAL_AGGREGATOR=1,
                  PROVHPC_STARTUP_TIMEOUT=1, PROVHPC_SLOT_RECORDS=512, PROVHPC_SLOTS=8)
    with _job(venv_bin, tmp_path, env, 2, n) as proc:
        assert proc.wait(60) == 0, output(proc)
        rdir = run_dir(str(tmp_path / "prov"))
        assert len(leftover_segments(os.path.basename(rdir))) == 2
        rep = recover(rdir)
        assert [p["action"] for p in rep["partitions"]] == ["created"]
        check_rank_counts(rdir)
        steps = metric_steps(rdir)
        with Run(rdir) as run:
            s = summary(run)
        capacity = 8 * 512
        for r in range(2):
            got = steps[r]
            assert (got == range(len(got))).all()  # a prefix, each once
            if n < capacity - 50:
                assert len(got) == n
            else:
                assert len(got) < n
        if n >= capacity:
            assert s["dropped_by_reason"].get("no_aggregator", 0) >= 2 * (n - capacity)
        else:
            assert not s["dropped_total"]


# ---------------------------------------------------------------------- DataLoader-style fork
FORK_PROGRAM = r'''
import os, sys
import provhpc
for i in range(100):
    provhpc.metric("x", float(i), step=i)
pid = os.fork()
if pid == 0:                       # a worker that logs, then ends like a DataLoader worker
    for i in range(500):
        provhpc.metric("y", float(i), step=i)
    os._exit(0)
os.waitpid(pid, 0)
with open(f"{sys.argv[1]}/child.{os.environ['PMI_RANK']}", "w") as fh:
    fh.write(str(pid))
'''


def test_forked_worker_records_are_kept(tmp_path, venv_bin, clean_env):
    env = job_env(clean_env, tmp_path)
    prog = write_program(tmp_path, FORK_PROGRAM)
    with _job(venv_bin, tmp_path, env, 2, 0, program=prog) as proc:
        assert proc.wait(60) == 0, output(proc)
        rdir = run_dir(str(tmp_path / "prov"))
        wait_for(lambda: partitions_complete(rdir), 30, "the partition to close")
        ys = metric_steps(rdir, "y")
        for r in range(2):
            assert list(ys[r]) == list(range(500))
        with Run(rdir) as run:
            roles = sorted((r["rank"], r["role"]) for r in run.ranks())
        assert roles == [(0, "rank"), (0, "worker"), (1, "rank"), (1, "worker")]


# ---------------------------------------------------------------------- output file system
@contextlib.contextmanager
def _mount(path, opts: str):
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_training_continues_loss_counted(tmp_path, venv_bin, clean_env):
    """ENOSPC: the program finishes, the partition stays consistent and complete, and
    every record is either stored (once) or counted as dropped."""
    n = 40000
    env = job_env(clean_env, tmp_path, PROVHPC_SLOT_RECORDS=1024, FAULT_PACE=100)
    with _mount(tmp_path / "full", "size=3m,mode=0700") as out, \
            _job(venv_bin, tmp_path, env, 2, n, out=str(out)) as proc:
        assert proc.wait(90) == 0, output(proc)
        rdir = run_dir(str(out))
        wait_for(lambda: partitions_complete(rdir), 30, "the partition to close")
        assert all(progress(tmp_path, r) == n - 1 for r in range(2))
        steps = metric_steps(rdir)
        with Run(rdir) as run:
            s = summary(run)
            reported = sum(r["reported"] for r in run.ranks())
        for got in steps.values():
            assert len(set(got.tolist())) == len(got)
        assert s["dropped_total"] > 0 and s["records_total"] > 0
        assert s["dropped_by_reason"].get("aggregator_write", 0) == s["dropped_total"]
        assert s["records_total"] + s["dropped_total"] == reported


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unusable_output_is_refused_before_the_program_starts(fault, tmp_path, venv_bin,
                                                              clean_env):
    """A read-only or full --out: every rank refuses with one line naming the directory
    and exits 2 before the program runs; no segment, no runtime directory, no run
    directory is left behind."""
    run_id = f"refuse-{fault}-{os.getpid()}-{random.randrange(1 << 30)}"
    rt = tmp_path / "rt"
    env = {**clean_env, "PROVHPC_RUN_ID": run_id, "PROVHPC_RUNTIME_DIR": str(rt)}
    prog = tmp_path / "prog.py"
    marker = tmp_path / "started"
    prog.write_text(f"open({str(marker)!r} + __import__('os').environ.get('PMI_RANK', '0'),"
                    " 'w').close()\n")
    opts = "size=1m,ro" if fault == "read-only" else "size=2m,mode=0700"
    with _mount(tmp_path / "out", opts) as out:
        if fault == "full":
            (out / "ballast").write_bytes(b"x" * (1536 << 10))
        r = subprocess.run([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                            os.path.join(venv_bin, "provhpc"), "run", "--out", str(out), "--",
                            os.path.join(venv_bin, "python"), str(prog)],
                           env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 2, r.stderr
        # one line per rank (the launcher may join the ranks' lines), nothing else of ours
        lines = [ln for ln in r.stderr.split("provhpc run:")[1:] if ln.strip()]
        assert len(lines) == 2 and "provhpc:" not in r.stderr, r.stderr
        why = "cannot write" if fault == "read-only" else "is full"
        assert all(why in ln and str(out / run_id) in ln for ln in lines), r.stderr
        assert not list(tmp_path.glob("started*")), "the program ran"
        assert sorted(os.listdir(out)) == ([] if fault == "read-only" else ["ballast"])
    assert leftover_segments(run_id) == []
    assert not (rt / f"provhpc-{os.getuid()}" / run_id).exists()


def test_documented_drop_reasons_are_the_counted_ones():
    """The drop-reason tables of docs/format.md and docs/reliability.md list exactly the
    reasons of provhpc/format/drops.py, in index order.  (That each is counted is shown
    where it happens: backpressure in test_contract, no_aggregator and aggregator_write
    here and in test_disk_full, bad_value in test_api and test_misuse.)"""
    from provhpc.format import drops as D

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def table(doc: str, header: str) -> list:
        """The `reason` column of the markdown table whose header row starts ``header``."""
        with open(os.path.join(root, "docs", doc)) as fh:
            lines = fh.read().splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
        cols = [c.strip() for c in lines[start].split("|")]
        col = cols.index("reason")
        rows = []
        for ln in lines[start + 2:]:
            if not ln.startswith("|"):
                break
            rows.append(ln.split("|")[col].strip().strip("`"))
        return rows

    assert table("format.md", "| index | reason |") == list(D.DROP_REASONS)
    assert table("reliability.md", "| reason | counted by |") == list(D.DROP_REASONS)
    assert [D.REASONS[i] for i in (D.BACKPRESSURE, D.NO_AGGREGATOR, D.AGGREGATOR_WRITE,
                                   D.BAD_VALUE)] == list(D.DROP_REASONS)
