"""Environment provenance: versions, git state, command line, SLURM, redaction."""

import json
import os
import subprocess
import sys

import numpy as np

from provhpc.launch import config as C
from provhpc.launch import environment as E
from provhpc.launch import identity, session


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_versions_and_python():
    doc = E.collect(["x.py"], environ={})
    assert doc["python"]["version"] == sys.version.split()[0]
    assert doc["packages"]["numpy"] == np.__version__
    assert "provhpc" in doc["packages"]
    assert "not-a-package" not in E.package_versions(("not-a-package",))
    json.dumps(doc)  # it goes into JSON metadata


def test_git_commit_and_dirty_state(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    script = repo / "train.py"
    script.write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    _git(repo, "remote", "add", "origin", "https://alice:s3cr3t@git.example.org/x.git")
    head = _git(repo, "rev-parse", "HEAD")
    doc = E.collect([sys.executable, str(script)], environ={})
    assert doc["git"]["commit"] == head
    assert doc["git"]["dirty"] is False
    assert doc["git"]["remote"] == "https://<redacted>@git.example.org/x.git"
    assert doc["script"] == str(script)
    script.write_text("print(2)\n")
    assert E.collect([str(script)], environ={})["git"]["dirty"] is True


def test_outside_a_repository_no_git(tmp_path):
    script = tmp_path / "lone.py"
    script.write_text("")
    assert E.git_info(str(script)) == {}
    assert "git" not in E.collect([str(script)], environ={})


def test_command_line_redaction():
    argv = ["train.py", "--token", "abc", "--api-key=xyz", "password=hunter2", "--lr", "0.1",
            "--data", "s3://bob:pw@bucket/x", "--Auth-Header", "Bearer q"]
    out = E.redact_argv(argv)
    assert out == ["train.py", "--token", "<redacted>", "--api-key=<redacted>",
                   "password=<redacted>", "--lr", "0.1", "--data",
                   "s3://<redacted>@bucket/x", "--Auth-Header", "<redacted>"]
    joined = " ".join(out)
    for secret in ("abc", "xyz", "hunter2", "bob:pw", "Bearer"):
        assert secret not in joined


def test_environment_allow_list_and_secret_names():
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "ddp", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_CLUSTER_NAME": "c", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "4",
           "HOME": "/home/a", "AWS_SECRET_ACCESS_KEY": "abc", "WANDB_API_KEY": "k",
           "GITHUB_TOKEN": "t", "SLURM_JOB_TOKEN": "jt", "NCCL_SOCKET_IFNAME": "ib0",
           "NCCL_IB_AUTH_COOKIE": "c0", "MASTER_ADDR": "https://u:p@h", "PATH": "/bin"}
    doc = E.collect(["t.py"], environ=env)
    copied = doc["env"]
    assert copied["SLURM_JOB_ID"] == "42" and copied["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert copied["OMP_NUM_THREADS"] == "4" and copied["NCCL_SOCKET_IFNAME"] == "ib0"
    # not on the allow-list: absent altogether
    for name in ("HOME", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "GITHUB_TOKEN", "PATH"):
        assert name not in copied
    # on the allow-list but secret by name: kept as a name only
    assert copied["SLURM_JOB_TOKEN"] == "<redacted>"
    assert copied["NCCL_IB_AUTH_COOKIE"] == "<redacted>"
    assert copied["MASTER_ADDR"] == "https://<redacted>@h"
    assert doc["slurm"] == {"job_id": "42", "job_name": "ddp", "nodelist": "n[1-2]",
                            "cluster": "c"}
    text = json.dumps(doc)
    for secret in ('"abc"', '"k"', '"t"', '"jt"', '"c0"', "u:p"):
        assert secret not in text


def test_run_meta_carries_environment(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("MY_PASSWORD", "pw")
    ident = identity.Identity(rank=0, node="n", host="n")
    meta = session.run_meta(ident, C.load(environ={}), ["train.py", "--secret", "s"])
    assert meta["argv"] == ["train.py", "--secret", "<redacted>"]
    env = meta["environment"]
    assert env["slurm"]["job_id"] == "77" and "MY_PASSWORD" not in env["env"]
    assert "pw" not in json.dumps(meta)
    # a rank that writes no metadata does not pay for it
    other = identity.Identity(rank=3, local_rank=1, node="n", host="n")
    assert session.run_meta(other, C.load(environ={}), ["t.py"])["environment"] == {}
