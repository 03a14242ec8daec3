"""Issue 13 point 6: the code and environment are part of the provenance.

A real ``mpiexec -n 2 provhpc run`` of a script committed in a git repository: the
commit, branch, dirty state, Python and package versions and the command are shown by
``summary``, ``query metadata``, ``lineage`` (a code node that the activities used), the
PROV export (a ``prov:Plan`` each activity's association names) and the API
(``.code()``, ``.environment()``, ``.hyperparameters()``).  Then the script is edited
without a commit and the next run is marked dirty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import provhpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t",
                           *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(os.path.join(ROOT, "examples", "train_mlp.py"), repo / "train.py")
    _git(repo, "init", "-q", "-b", "science")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "the model")
    return repo


def _run(venv_bin, env, repo, out="prov"):
    subprocess.run([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                    os.path.join(venv_bin, "provhpc"), "run", "--out", out, "--",
                    os.path.join(venv_bin, "python"), "train.py", "--epochs", "1", "--files",
                    "2", "--traces", "40", "--samples", "64"],
                   cwd=repo, env=env, check=True, timeout=120, capture_output=True)
    return os.path.realpath(repo / out / "latest")


def _cli(venv_bin, env, *args):
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (args, p.stderr)
    return p.stdout


def test_code_and_environment_in_every_view(venv_bin, clean_env, repo):
    commit = _git(repo, "rev-parse", "HEAD")
    run = _run(venv_bin, clean_env, repo)

    with provhpc.open(run) as r:
        code, env = r.code(), r.environment()
        assert code["git"] == {"commit": commit, "branch": "science", "dirty": False,
                               "root": str(repo)}
        assert code["script"].endswith("train.py") and "--epochs" in code["command"]
        assert env["packages"]["numpy"] and env["python"]["version"]
        hp = r.hyperparameters()
        assert hp and hp[0]["values"]["epochs"] == 1 and hp[0]["ranks"] == [0, 1]

    text = _cli(venv_bin, clean_env, "summary", run)
    assert f"code train.py @ {commit[:12]} on science" in text and "(dirty)" not in text
    summ = json.loads(_cli(venv_bin, clean_env, "summary", run, "--json"))
    assert summ["code"]["git"]["commit"] == commit

    meta = json.loads(_cli(venv_bin, clean_env, "query", run, "metadata", "--json"))
    assert meta["code"]["git"]["commit"] == commit
    assert meta["environment"]["packages"]["numpy"] == env["packages"]["numpy"]

    lin = json.loads(_cli(venv_bin, clean_env, "lineage", run, "checkpoints/mlp.npz",
                          "--json"))
    codes = [n for n in lin["nodes"] if n["kind"] == "code"]
    assert [n["name"] for n in codes] == [f"train.py @ {commit[:12]}"]
    assert any(e["relation"] == "used" and e["dst"] == codes[0]["node"]
               for e in lin["edges"])

    doc = json.loads(_cli(venv_bin, clean_env, "export", run, "--format", "prov-json"))
    plans = {k: v for k, v in doc["entity"].items()
             if any(t == "prov:Plan" or (isinstance(t, dict) and t.get("$") == "prov:Plan")
                    for t in (v["prov:type"] if isinstance(v["prov:type"], list)
                              else [v["prov:type"]]))}
    assert len(plans) == 1
    (plan_id, plan), = plans.items()
    assert plan["provhpc:git_commit"] == commit
    assert any(a.get("prov:plan") == plan_id for a in doc["wasAssociatedWith"].values())

    rep = repo / "rep"
    _cli(venv_bin, clean_env, "report", run, "-o", str(rep))
    page = (rep / "index.html").read_text()
    card = page[:page.index("<h2>Inputs and outputs</h2>")]
    assert commit in card and "on branch science" in card and "uncommitted" not in card
    svg = page[page.index("<h2>Lineage</h2>"):page.index("<h2>Metrics</h2>")]
    assert ">code<" in svg and f"train.py @ {commit[:12]}" in svg

    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# an edit\n")
    dirty = _run(venv_bin, clean_env, repo)
    assert dirty != run
    with provhpc.open(dirty) as r:
        assert r.code()["git"]["dirty"] is True and r.code()["git"]["changed"] == ["train.py"]
    assert f"code train.py @ {commit[:12]} (dirty) on science" in _cli(venv_bin, clean_env,
                                                                        "summary", dirty)
