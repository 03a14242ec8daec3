"""Issue 12 point 2: a run id is one job's.  A second job given the same run id is
refused before its program starts (one line per rank, exit 2), whether the first job
has finished or is still running, on the same --out or another; its records are never
merged in and the first job's manifest is never replaced.  The aggregator itself
refuses a rank of another job (launcher, job id and the per-job secret in the hello)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import h5py
import pytest

from provhpc.capture.agent import Agent
from provhpc.format.segment import segment_name, shm_dir
from provhpc.launch import config, identity, session
from provhpc.node.aggregator import Aggregator

pytestmark = pytest.mark.timeout(180)

# Records rank and step, leaves a marker that it ran, and takes `sys.argv[2]` seconds.
PROG = """
import os, sys, time, provhpc
open(os.path.join(sys.argv[1], f"ran-{os.getpid()}"), "w").close()
rank = int(os.environ.get("PMI_RANK", 0))
for i in range(20):
    provhpc.metric("m", float(rank), step=i)
    time.sleep(float(sys.argv[2]) / 20)
"""


def _job(venv_bin, env, out, marks, seconds=0.0, n=2):
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", str(n), os.path.join(venv_bin, "provhpc"),
           "run", "--out", str(out), "--", os.path.join(venv_bin, "python"), "-c", PROG,
           str(marks), str(seconds)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _ranks_and_steps(run_dir):
    """(ranks connected, metric points, points whose (rank, step) is not unique)."""
    with h5py.File(run_dir / "vm.h5" if (run_dir / "vm.h5").exists()
                   else next(run_dir.glob("*.h5")), "r") as f:
        ranks = sorted(int(r) for r in f["ranks"]["rank"])
        rec = f["records"][:]
        metrics = rec[rec["kind"] == 7]
        points = list(zip(metrics["rank"].tolist(), metrics["step"].tolist()))
        return ranks, len(points), len(points) - len(set(points))


def _refusal_lines(stderr):
    """One line per rank (the launcher may join the ranks' lines)."""
    return [ln for ln in stderr.split("provhpc run:")[1:] if ln.strip()]


@pytest.fixture
def env(clean_env, tmp_path):
    return {**clean_env, "PROVHPC_RUN_ID": "samerun", "PROVHPC_TELEMETRY_INTERVAL": "0",
            "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt")}


def test_second_job_into_a_finished_run_is_refused_before_its_program(venv_bin, env,
                                                                       tmp_path):
    out, marks = tmp_path / "prov", tmp_path / "marks"
    marks.mkdir()
    first = _job(venv_bin, env, out, marks)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    run_dir = out / "samerun"
    manifest = (run_dir / "manifest.json").read_bytes()
    assert json.loads(manifest)["status"] == "ok"
    ran = sorted(os.listdir(marks))
    assert len(ran) == 2

    second = _job(venv_bin, env, out, marks)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    lines = _refusal_lines(err)
    assert len(lines) == 2, err
    assert all("run id 'samerun' is taken by another job" in ln and "status ok" in ln
               and str(run_dir) in ln for ln in lines), err
    assert sorted(os.listdir(marks)) == ran, "the second job's program ran"
    assert (run_dir / "manifest.json").read_bytes() == manifest, "the manifest was replaced"
    assert _ranks_and_steps(run_dir) == ([0, 1], 40, 0)
    assert sorted(p.name for p in run_dir.glob("*.h5")) == ["vm.h5"]


@pytest.mark.parametrize("same_out", [True, False], ids=["same-out", "other-out"])
def test_two_jobs_at_once_with_one_run_id_are_never_merged(venv_bin, env, tmp_path, same_out):
    out_a = tmp_path / "a"
    out_b = out_a if same_out else tmp_path / "b"
    marks_a, marks_b = tmp_path / "marks-a", tmp_path / "marks-b"
    marks_a.mkdir()
    marks_b.mkdir()
    first = _job(venv_bin, env, out_a, marks_a, seconds=4.0)
    deadline = time.monotonic() + 60
    while len(os.listdir(marks_a)) < 2:  # job A's program runs on both ranks
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = _job(venv_bin, env, out_b, marks_b)
    _, err_b = second.communicate(timeout=120)
    _, err_a = first.communicate(timeout=120)
    assert first.returncode == 0, err_a
    assert second.returncode == 2, err_b
    lines = _refusal_lines(err_b)
    assert len(lines) == 2, err_b
    # the same node's runtime directory is seen first; the run directory would refuse too
    assert all("run id 'samerun' is in use on node" in ln and "another job" in ln
               for ln in lines), err_b
    assert os.listdir(marks_b) == [], "the second job's program ran"
    run_dir = out_a / "samerun"
    assert _ranks_and_steps(run_dir) == ([0, 1], 40, 0)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "ok"
    if not same_out:
        assert not (out_b / "samerun").exists(), "the refused job left a run directory"
    # nothing of either job stays in the runtime directory
    assert not (tmp_path / "rt" / f"provhpc-{os.getuid()}" / "samerun").exists()


def _node_runtime_dir(tmp_path):
    """This node's runtime directory of run 'samerun' under tmp_path/rt, owner-only."""
    node = identity.detect().node
    d = tmp_path / "rt" / f"provhpc-{os.getuid()}" / "samerun" / node
    d.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "rt" / f"provhpc-{os.getuid()}", 0o700)
    os.chmod(d.parent, 0o700)
    return d


@pytest.mark.parametrize("claimant", ["dead", "pid reused"])
def test_a_stale_runtime_claim_of_a_dead_job_is_taken_over(venv_bin, env, tmp_path, claimant):
    """A job killed with SIGKILL leaves its node's claim behind; the next job with that run
    id (into a fresh --out) runs.  Pids are reused: a claim whose pid a later, unrelated
    process now has (started after the claim was made) is stale as well."""
    if claimant == "dead":
        proc = subprocess.Popen(["true"])
        proc.wait()
        claim = {"pid": proc.pid}
    else:
        proc = subprocess.Popen(["sleep", "120"])
        claim = {"pid": proc.pid, "start": time.time_ns() - 3600 * 10**9}  # an hour before
    try:
        d = _node_runtime_dir(tmp_path)
        (d / "job").write_text(json.dumps({"job": "0" * 32, "host": identity.detect().host,
                                           **claim}))
        marks = tmp_path / "marks"
        marks.mkdir()
        job = _job(venv_bin, env, tmp_path / "prov", marks)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert _ranks_and_steps(tmp_path / "prov" / "samerun") == ([0, 1], 40, 0)
        assert not d.exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_live_claim_of_another_job_is_not_taken_over(venv_bin, env, tmp_path):
    d = _node_runtime_dir(tmp_path)
    (d / "job").write_text(json.dumps({"job": "0" * 32, "host": identity.detect().host,
                                       "pid": os.getpid(), "launcher": "srun",
                                       "job_id": "77"}))
    marks = tmp_path / "marks"
    marks.mkdir()
    job = _job(venv_bin, env, tmp_path / "prov", marks)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2, err
    assert all("launcher srun, job 77" in ln for ln in _refusal_lines(err)), err
    assert os.listdir(marks) == []
    assert not (tmp_path / "prov" / "samerun").exists()


def _serve(tmp_path, job, meta):
    cfg = config.load(out=str(tmp_path), run_id="r1", runtime_dir=str(tmp_path),
                      flush_interval=0.2)
    agg = Aggregator(cfg, "r1", "n0", str(tmp_path), f"ipc://{tmp_path}/s.sock",
                     str(tmp_path / "ready"), expect=0, linger=1.0, meta=meta, job=job)
    thread = agg.start_thread()
    assert agg.ready.wait(10)
    return cfg, agg, thread


@pytest.mark.parametrize("theirs,welcomed", [
    (("hydra", "", "a" * 32), True),
    (("hydra", "", "b" * 32), False),   # the same launcher and job id, another secret
    (("srun", "", "a" * 32), False),    # another launcher
    (("hydra", "12", "a" * 32), False),  # another job id
], ids=["same-job", "other-secret", "other-launcher", "other-job-id"])
def test_aggregator_refuses_a_rank_of_another_job(tmp_path, theirs, welcomed):
    cfg, agg, thread = _serve(tmp_path, "a" * 32, {"launcher": "hydra", "job_id": ""})
    launcher, job_id, job = theirs
    ident = identity.Identity(rank=0, node="n0", host="n0", launcher=launcher, job_id=job_id)
    seg = os.path.join(shm_dir(), segment_name("r1", "n0", 0, os.getpid()))
    agent = Agent(cfg, ident, "r1", agg.endpoint, seg, job=job)
    try:
        agent.wait_ready(10)
        assert (agent.mode not in ("pending", "detached", "failed")) == welcomed, agent.mode
    finally:
        agent.shutdown()
        agg.stop()
        thread.join(15)
        if os.path.exists(seg):  # a refused rank keeps its records in its segment
            os.unlink(seg)
    with h5py.File(tmp_path / "r1" / "n0.h5", "r") as f:
        counters = dict(zip((n.decode() for n in f["counters"]["name"]),
                            f["counters"]["value"].tolist()))
        assert counters["refused_hellos"] == (0 if welcomed else 1)
        assert [int(r) for r in f["ranks"]["rank"]] == ([0] if welcomed else [])


def test_a_requeued_or_restarted_job_gets_its_own_run_id(monkeypatch):
    cfg = config.load()
    slurm = identity.Identity(rank=0, size=2, launcher="srun", job_id="7", step_id="0")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = session.agree_run(cfg, slurm, None)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = session.agree_run(cfg, slurm, None)
    assert first[0] == "slurm-7.0" and again[0] == "slurm-7.0.r1"
    assert first[1] != again[1] and session.job_digest(first[1]) != session.job_digest(again[1])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp")
    torch = identity.Identity(rank=0, size=2, launcher="torchrun", job_id="exp")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert session.agree_run(cfg, torch, None)[0] == "torchrun-exp.r2"
    # one process: a fresh secret per run, even under one given run id
    single = identity.Identity()
    assert session.agree_run(cfg, single, None)[1] != session.agree_run(cfg, single, None)[1]
