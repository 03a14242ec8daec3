"""Fixtures of the SLURM tests: a scratch dir the local SLURM's jobs can use."""

import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, ".venv", "bin")


@pytest.fixture
def slurm_env(clean_env):
    """The environment of a job submission: no launcher variables, SLURM_CONF kept."""
    if not os.environ.get("SLURM_CONF") or shutil.which("srun") is None:
        pytest.skip("SLURM not available: run through tests/slurm.sh (starts jobs/local-slurm.sh)")
    env = dict(clean_env)
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return env


@pytest.fixture
def jobdir(tmp_path):
    """A work dir readable by the job (the local SLURM runs jobs as this user)."""
    d = tmp_path / "job"
    d.mkdir()
    return d


def run(cmd, env, cwd, timeout=120):
    return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)


def wait(pred, timeout, step=0.5):
    """True once ``pred()`` holds, polled every ``step`` s; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False
