"""examples/train_ddp.py launched for real: mpiexec -n 2 and torchrun (CPU, gloo)."""

import os
import subprocess

import pytest

import provhpc
from provhpc.format import records as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")
ARGS = ["--epochs", "2", "--samples", "512", "--batch", "32"]
EPOCHS, STEPS_PER_EPOCH = 2, (512 - 512 // 8) // 2 // 32  # 7 per rank


def _launch(cmd, cwd, env, timeout=180):
    env = {**env, "OMP_NUM_THREADS": "1", "PROVHPC_TELEMETRY_INTERVAL": "1"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _check_run(out_dir, launcher):
    with provhpc.open(str(out_dir)) as run:
        assert run.manifest["status"] == "ok"
        assert run.manifest["meta"]["environment"]["packages"]["torch"].startswith("2.")
        assert {r["rank"] for r in run.ranks() if r["role"] == "rank"} == {0, 1}
        assert all(r["status"] == "ok" and r["dropped"] == 0 for r in run.ranks())
        (part,) = run.partitions
        recs, s = part.records(), part.strings
        name, sval = s[recs["name"]], s[recs["sval"]]
        by_id = {}
        for rank in (0, 1):
            mine = recs["rank"] == rank
            epochs = mine & (recs["kind"] == R.ACTIVITY_START) & (sval == "epoch")
            assert sorted(recs["step"][epochs]) == list(range(EPOCHS))
            loss = mine & (recs["kind"] == R.METRIC) & (name == "loss")
            assert sorted(recs["step"][loss]) == list(range(EPOCHS * STEPS_PER_EPOCH))
            assert (recs["fval"][loss] > 0).all()
            ents = mine & (recs["kind"] == R.ENTITY)
            kinds = set(sval[ents])
            assert {"model", "distributed", "dataset", "hyperparameters", "shard"} <= kinds
            attrs = {s[r["name"]]: r for r in recs[mine & (recs["kind"] == R.ATTRIBUTE)]}
            assert attrs["backend"]["sval"] and s[attrs["backend"]["sval"]] == "gloo"
            assert int(attrs["world_size"]["ival"]) == 2
            assert int(attrs["rank"]["ival"]) == rank
            by_id[rank] = {s_: int(i) for s_, i in zip(sval[ents], recs["id"][ents])}
            tele = mine & (recs["kind"] == R.METRIC) & (name == "telemetry.cpu_seconds")
            assert tele.any() and (recs["fval"][tele] > 0).all()
        # the checkpoint (rank 0 saves it): derived from the data, hyperparameters, model
        ck = (recs["kind"] == R.ENTITY) & (sval == "checkpoint")
        assert list(recs["rank"][ck]) == [0]
        ck_id = int(recs["id"][ck][0])
        derived = {int(r["ref"]) for r in recs[(recs["kind"] == R.RELATION)
                                               & (name == R.WAS_DERIVED_FROM)
                                               & (recs["id"] == ck_id) & (recs["rank"] == 0)]}
        ids = by_id[0]
        assert {ids["dataset"], ids["hyperparameters"], ids["model"], ids["shard"]} <= derived
        hashes = recs[(recs["kind"] == R.ATTRIBUTE) & (recs["id"] == ck_id) & (name == "hash")]
        assert s[hashes["sval"][0]].startswith("blake2b:")
        assert run.manifest["identity"]["launcher"] == launcher


@pytest.mark.timeout(240)
def test_mpiexec_two_ranks(tmp_path, venv_bin, clean_env):
    cmd = [os.path.join(venv_bin, "mpiexec"), "-n", "2", os.path.join(venv_bin, "provhpc"),
           "run", "--out", str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"),
           EXAMPLE, *ARGS]
    p = _launch(cmd, tmp_path, clean_env)
    assert "ddp: 2 ranks (gloo)" in p.stdout
    _check_run(tmp_path / "prov", "hydra")


@pytest.mark.timeout(240)
def test_torchrun_two_workers(tmp_path, venv_bin, clean_env):
    env = {k: v for k, v in clean_env.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [os.path.join(venv_bin, "torchrun"), "--standalone", "--nproc-per-node", "2",
           "--no-python", os.path.join(venv_bin, "provhpc"), "run", "--out",
           str(tmp_path / "prov"), "--", os.path.join(venv_bin, "python"), EXAMPLE, *ARGS]
    p = _launch(cmd, tmp_path, env)
    assert "ddp: 2 ranks (gloo)" in p.stdout
    _check_run(tmp_path / "prov", "torchrun")
