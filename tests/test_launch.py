"""The capture pipeline under a real launcher: the venv's mpiexec (MPICH Hydra).

Each test launches ``mpiexec -n N provhpc run -- python tests/programs/emit.py``
in a subprocess and reads the partitions it leaves.  Rank r records metric
"x" = r * 1e6 + i for i < n, so content and exactly-once delivery are checkable.
"""

import glob
import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np

from provhpc.format import records as R
from provhpc.post.reader import Run

HERE = os.path.dirname(os.path.abspath(__file__))
EMIT = os.path.join(HERE, "programs", "emit.py")


def launch(venv_bin, env, tmp_path, nprocs, *args, extra_env=None, timeout=120, wait=True):
    env = {**env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"), **(extra_env or {})}
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", str(nprocs),
           os.path.join(venv_bin, "provhpc"), "run", "--out", str(tmp_path / "out"), "--",
           os.path.join(venv_bin, "python"), EMIT, *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_dir(tmp_path) -> str:
    runs = [d for d in glob.glob(str(tmp_path / "out" / "*")) if not d.endswith("latest")]
    assert len(runs) == 1, runs
    return runs[0]


def wait_complete(path, timeout=60.0):
    """Partitions whose aggregator outlives the job (a killed rank) close on their own
    (within seconds; an aggregator that saw no end waits out its 30 s linger first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = glob.glob(os.path.join(path, "*.h5"))
        try:
            if files and all(_complete(f) for f in files):
                return files
        except OSError:
            pass
        time.sleep(0.1)
    logs = {os.path.basename(p): open(p).read()[-2000:]
            for p in glob.glob(os.path.join(path, "*.aggregator.log"))}
    segments = [n for n in os.listdir("/dev/shm") if os.path.basename(path) in n] \
        if os.path.isdir("/dev/shm") else []
    raise AssertionError(f"partitions in {path} not complete after {timeout}s; "
                         f"aggregator logs {logs}; segments left {segments}")


def _complete(path):
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        return bool(f.attrs["complete"])


def metric_values(run, rank):
    vals = []
    for p in run.partitions:
        recs = p.records()
        strings = p.strings
        sel = (recs["kind"] == R.METRIC) & (recs["rank"] == rank)
        names = strings[recs["name"][sel]]
        vals.append(recs["fval"][sel][names == "x"])
    return np.sort(np.concatenate(vals))


def test_every_record_of_every_rank_arrives_exactly_once(venv_bin, clean_env, tmp_path):
    n = 3000
    code, out = launch(venv_bin, clean_env, tmp_path, 4, "--n", n)
    assert code == 0, out
    with Run(run_dir(tmp_path)) as run:
        ranks = run.ranks()
        assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
        for r in ranks:
            assert r["status"] == "ok"
            assert r["records"] == r["reported"] > n  # what the rank wrote = what is stored
            np.testing.assert_array_equal(metric_values(run, r["rank"]),
                                          r["rank"] * 1e6 + np.arange(n))
        assert all(p.complete for p in run.partitions)
        assert run.drops() == []
        # content intact: the tasks, the entity and its derivation
        p = run.partitions[0]
        recs, strings = p.records(), p.strings
        starts = recs[recs["kind"] == R.ACTIVITY_START]
        assert (strings[starts["sval"]] == "task").sum() == 4 * (n // 100)
        ents = recs[recs["kind"] == R.ENTITY]
        assert set(strings[ents["name"]]) >= {f"input/rank{i}.bin" for i in range(4)}
        rel = recs[recs["kind"] == R.RELATION]
        assert (strings[rel["name"]] == "wasDerivedFrom").sum() == 8  # model <- raw, hp per rank
        with open(os.path.join(run.path, "manifest.json")) as fh:
            manifest = json.load(fh)
        assert manifest["status"] == "ok" and manifest["meta"]["world_size"] == 4


def test_simulated_nodes_each_get_an_aggregator_and_partition(venv_bin, clean_env, tmp_path):
    code, out = launch(venv_bin, clean_env, tmp_path, 4, "--n", 200,
                       extra_env={"PROVHPC_SIMULATE_NODES": "2"})
    assert code == 0, out
    with Run(run_dir(tmp_path)) as run:
        assert len(run.partitions) == 2
        by_node = {}
        for r in run.ranks():
            by_node.setdefault(r["node"], []).append((r["rank"], r["local_rank"]))
        assert sorted(by_node.values()) == [[(0, 0), (1, 1)], [(2, 0), (3, 1)]]
        for p in run.partitions:  # each partition holds only its own node's ranks
            assert set(np.unique(p.column("rank"))) == {r for r, _ in by_node[p.node]}


def test_rank_sigkilled_after_n_records_keeps_all_n(venv_bin, clean_env, tmp_path):
    progress = tmp_path / "progress"
    code, out = launch(venv_bin, clean_env, tmp_path, 2, "--n", 5000, "--kill-rank", 1,
                       "--kill-after", 1234, "--progress", progress)
    assert code != 0, out  # the launcher reports the killed rank
    returned = int(progress.read_text())
    path = run_dir(tmp_path)
    wait_complete(path)
    with Run(path) as run:
        vals = metric_values(run, 1)
        np.testing.assert_array_equal(vals, 1e6 + np.arange(returned))
        status = {r["rank"]: r["status"] for r in run.ranks()}
        assert status[1] == "killed"


def test_sigterm_to_the_job_leaves_complete_partitions(venv_bin, clean_env, tmp_path):
    progress = tmp_path / "ready"
    proc = launch(venv_bin, clean_env, tmp_path, 2, "--n", 500, "--hang", "--progress", progress,
                  wait=False)
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{progress}.{r}") for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    path = run_dir(tmp_path)
    files = wait_complete(path, timeout=10)
    assert len(files) == 1
    with Run(path) as run:
        for r in run.ranks():
            assert r["status"] == "terminated"
            np.testing.assert_array_equal(metric_values(run, r["rank"]),
                                          r["rank"] * 1e6 + np.arange(500))


def test_exception_in_one_rank_aborts_the_job_with_its_records(venv_bin, clean_env, tmp_path):
    t0 = time.monotonic()
    code, out = launch(venv_bin, clean_env, tmp_path, 4, "--n", 1000, "--fail-rank", 2,
                       timeout=90)
    assert code != 0
    assert "fails on purpose" in out
    assert time.monotonic() - t0 < 90
    path = run_dir(tmp_path)
    wait_complete(path)
    with Run(path) as run:
        ranks = {r["rank"]: r for r in run.ranks()}
        assert ranks[2]["status"] == "error"
        # the job is gone: the run is not 'running', whatever its manifest was left saying
        assert run.status == "error", (run.manifest.get("status"), run.status)
        np.testing.assert_array_equal(metric_values(run, 2), 2e6 + np.arange(501))
        p = run.partitions[0]
        recs, strings = p.records(), p.strings
        ends = recs[(recs["kind"] == R.ACTIVITY_END) & (recs["rank"] == 2)]
        assert "RuntimeError" in set(strings[ends["sval"]])
        assert (ends["ival"] == R.STATUS_ERROR).sum() >= 3  # block task, stage, run


def test_capture_off_creates_no_segment_socket_or_file(venv_bin, clean_env, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("import provhpc\n"
                      "with provhpc.task('t', a=1) as t:\n"
                      "    provhpc.metric('m', 1.0)\n"
                      "    t.generated(provhpc.data('x.bin'), v=2)\n"
                      "@provhpc.task\n"
                      "def f(x):\n    return x\n"
                      "assert f(3) == 3\n")
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_OUT": str(tmp_path / "out")}
    pids = []
    for cmd, extra in (([os.path.join(venv_bin, "python"), str(script)], {}),
                       ([os.path.join(venv_bin, "provhpc"), "run", "--",
                         os.path.join(venv_bin, "python"), str(script)], {"PROVHPC_ENABLED": "0"})):
        proc = subprocess.Popen(cmd, env={**env, **extra}, cwd=tmp_path)
        pids.append(proc.pid)
        assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "rt").exists()
    assert not (tmp_path / "provenance").exists()
    assert not [p for pid in pids for p in glob.glob(f"/dev/shm/provhpc-*-p{pid}")]


def test_sigterm_to_a_rank_blocked_in_mpi_drains_it(venv_bin, clean_env, tmp_path):
    """A time limit usually lands in a collective: the agent drains the rank itself."""
    ready = tmp_path / "ready"
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt")}
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", "2", os.path.join(venv_bin, "provhpc"),
           "run", "--out", str(tmp_path / "out"), "--", os.path.join(venv_bin, "python"),
           os.path.join(HERE, "programs", "stuck.py"), str(ready), "700"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{ready}.{r}") for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(0.3)  # rank 0 is inside MPI_Barrier now
        rank0 = int((tmp_path / "ready.0").read_text())
        t0 = time.monotonic()
        os.kill(rank0, signal.SIGTERM)
        while os.path.exists(f"/proc/{rank0}") and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.communicate()
    assert took < 10, f"rank 0 still alive {took:.1f}s after SIGTERM"
    path = run_dir(tmp_path)
    wait_complete(path)
    with Run(path) as run:
        status = {r["rank"]: r["status"] for r in run.ranks()}
        assert status[0] == "terminated"  # said goodbye itself, not salvaged as killed
        np.testing.assert_array_equal(metric_values(run, 0), np.arange(700))
