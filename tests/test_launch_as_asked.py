"""Issue 12 point 6: ``provhpc run`` launches what the user asked for.

``provhpc run -- INTERPRETER script.py`` runs exactly that interpreter; capture reaches
every Python process started below it through the environment (a shell wrapper's
``python train.py``, ``python -m``, an interpreter of another venv with provhpc); an
interpreter that cannot import provhpc says so on stderr before its program runs while
the run-level record is kept; and the recorded program (path, argv, -c/-m mode) is what
ran.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

import pytest

import provhpc
from provhpc.launch.run import is_this_interpreter, split_python

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = """
import os, sys, provhpc
with provhpc.task("train_step", lr=0.1):
    provhpc.metric("loss", 0.5, step=1)
print("EXE", sys.executable, flush=True)
"""


def _run(venv_bin, env, cwd, *cmd):
    return subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out",
                           str(cwd / "prov"), "--", *cmd], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=150)


def _the_run(cwd):
    (run_dir,) = [p for p in (cwd / "prov").iterdir() if p.name != "latest"]
    return provhpc.open(str(run_dir))


def _run_activity(run) -> dict:
    tasks = run.tasks()
    (row,) = [t for t in tasks if t["type"] == "run"]
    attrs = run.attributes()
    mine = attrs[(attrs["owner"] == row["id"]) & (attrs["rank"] == row["rank"])]
    return {"name": row["name"], "status": row["status"], "id": int(row["id"]),
            **{a["key"]: a["value"] for a in mine}}


@pytest.fixture
def env(clean_env):
    return {**clean_env, "PROVHPC_TELEMETRY_INTERVAL": "0"}


def test_a_shell_wrapper_s_python_child_joins_the_run(venv_bin, env, tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(f"#!/bin/sh\nset -e\n{os.path.join(venv_bin, 'python')} train.py\n"
                       "exit 4\n")
    wrapper.chmod(0o755)
    r = _run(venv_bin, env, tmp_path, "./train.sh")
    assert r.returncode == 4, r.stderr  # the wrapper's own exit code
    assert "cannot import provhpc" not in r.stderr, r.stderr
    with _the_run(tmp_path) as run:
        act = _run_activity(run)
        assert act["name"] == "train.sh" and act["mode"] == "command"
        assert act["program"] == str(wrapper) and act["status"] == "error"
        tasks = run.tasks()
        (step,) = [t for t in tasks if t["name"] == "train_step"]
        assert int(step["parent"]) == act["id"]  # under the rank's run activity
        metrics = run.metrics()
        assert [(m["name"], m["step"], m["value"]) for m in metrics] == [("loss", 1, 0.5)]
        roles = sorted(r["role"] for r in run.ranks())
        assert roles == ["child", "rank"], roles
        assert run.manifest["meta"]["argv"] == ["./train.sh"]


def test_another_interpreter_runs_as_asked_and_says_it_cannot_capture(venv_bin, env,
                                                                     tmp_path):
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None or is_this_interpreter(system):
        pytest.skip("needs a system python3 other than the test's interpreter")
    probe = subprocess.run([system, "-c", "import provhpc"], capture_output=True)
    assert probe.returncode != 0, "the system python can import provhpc: nothing to show"
    script = tmp_path / "x.py"
    script.write_text("import sys\nprint('EXE', sys.executable, flush=True)\n")
    r = _run(venv_bin, env, tmp_path, system, str(script))
    assert r.returncode == 0, r.stderr
    assert f"EXE {system}" in r.stdout  # that interpreter, not provhpc's
    warn = [ln for ln in r.stderr.splitlines() if "cannot import provhpc" in ln]
    assert len(warn) == 1 and system in warn[0], r.stderr
    with _the_run(tmp_path) as run:
        act = _run_activity(run)
        assert act["mode"] == "command" and act["program"] == system
        assert act["status"] == "ok"
        assert run.manifest["meta"]["argv"] == [system, str(script)]


def test_an_interpreter_of_another_venv_with_provhpc_is_captured(venv_bin, env, tmp_path):
    other = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    # provhpc "installed" there: its own site-packages points at this checkout and its deps
    (purelib,) = (other / "lib").glob("python*/site-packages")
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (purelib / "provhpc-dev.pth").write_text("\n".join([ROOT, *deps]) + "\n")
    py = str(other / "bin" / "python")
    assert not is_this_interpreter(py)
    (tmp_path / "train.py").write_text(TRAIN)
    r = _run(venv_bin, env, tmp_path, py, "train.py")
    assert r.returncode == 0, r.stderr
    assert f"EXE {py}" in r.stdout, r.stdout
    with _the_run(tmp_path) as run:
        assert [(m["name"], m["value"]) for m in run.metrics()] == [("loss", 0.5)]
        act = _run_activity(run)
        assert act["mode"] == "command" and act["program"] == py


@pytest.mark.parametrize("how", ["module", "code", "python3-name"])
def test_the_recorded_program_is_what_ran(venv_bin, env, tmp_path, how):
    (tmp_path / "trainmod.py").write_text(TRAIN)
    py = os.path.join(venv_bin, "python")
    if how == "module":
        cmd, name, mode, program = [py, "-m", "trainmod"], "trainmod", "module", "trainmod"
    elif how == "code":
        code = "import runpy; runpy.run_path('trainmod.py')"
        cmd, name, mode, program = [py, "-c", code], "python -c", "code", "-c"
    else:  # this interpreter by a name on PATH
        env = {**env, "PATH": venv_bin + os.pathsep + env.get("PATH", "")}
        cmd, name, mode, program = (["python", "trainmod.py"], "trainmod.py", "script",
                                    str(tmp_path / "trainmod.py"))
    r = _run(venv_bin, env, tmp_path, *cmd)
    assert r.returncode == 0, r.stderr
    with _the_run(tmp_path) as run:
        act = _run_activity(run)
        assert (act["name"], act["mode"], act["program"]) == (name, mode, program)
        assert os.path.samefile(act["interpreter"], py)
        assert run.manifest["meta"]["argv"] == cmd
        assert [(m["name"], m["value"]) for m in run.metrics()] == [("loss", 0.5)]
        assert [r["role"] for r in run.ranks()] == ["rank"]  # ran in the rank itself


def test_which_commands_run_in_this_process():
    here = sys.executable
    assert split_python(["x.py", "a"]) == ("path", "x.py", ["x.py", "a"])
    assert split_python([here, "-u", "x.py"]) == ("path", "x.py", ["x.py"])
    assert split_python([here, "-m", "pkg", "a"]) == ("module", "pkg", ["pkg", "a"])
    assert split_python([here, "-c", "pass", "a"]) == ("code", "pass", ["-c", "a"])
    assert split_python([here, "-X", "dev", "x.py"]) is None  # the interpreter's own flag
    assert split_python(["./train.sh"]) is None
    assert split_python(["/no/such/python3", "x.py"]) is None
    with pytest.raises(ValueError, match="no command"):
        split_python([])


def test_a_missing_command_is_named_and_exits_127(venv_bin, env, tmp_path):
    r = _run(venv_bin, env, tmp_path, "./no-such-wrapper.sh")
    assert r.returncode == 127
    assert "provhpc run: cannot run ./no-such-wrapper.sh" in r.stderr, r.stderr
    with _the_run(tmp_path) as run:
        act = _run_activity(run)
        assert act["status"] == "error" and act["program"] == "./no-such-wrapper.sh"


def test_under_mpiexec_the_wrapper_s_child_is_the_mpi_process(venv_bin, env, tmp_path):
    """``mpiexec -n 2 provhpc run -- ./train.sh``: the wrapper never starts MPI (the
    launcher's PMI descriptor goes to the child), so the Python child is the MPI rank; the
    run id comes from the launcher's job, and the child's records are its rank's."""
    (tmp_path / "mpitrain.py").write_text(
        "from mpi4py import MPI\nimport provhpc\nc = MPI.COMM_WORLD\n"
        "provhpc.metric('r', float(c.Get_rank()), step=0)\n"
        "import os\n"  # one write per line: the ranks' lines may interleave otherwise
        "os.write(1, f'size {c.Get_size()} sum {c.allreduce(c.Get_rank())}\\n'.encode())\n")
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(f"#!/bin/sh\nexec {os.path.join(venv_bin, 'python')} mpitrain.py\n")
    wrapper.chmod(0o755)
    r = subprocess.run([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                        os.path.join(venv_bin, "provhpc"), "run", "--out",
                        str(tmp_path / "prov"), "--", "./train.sh"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("size 2 sum 1") == 2, r.stdout + r.stderr
    with _the_run(tmp_path) as run:
        assert sorted((int(m["rank"]), m["value"]) for m in run.metrics()
                      if m["name"] == "r") == [(0, 0.0), (1, 1.0)]
        assert sorted((int(x["rank"]), x["role"]) for x in run.ranks()) == [
            (0, "child"), (0, "rank"), (1, "child"), (1, "rank")]
