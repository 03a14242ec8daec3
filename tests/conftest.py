import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")


@pytest.fixture
def venv_bin():
    """The venv's bin dir: always its mpiexec/provhpc, never one from PATH."""
    return VENV_BIN if os.path.isdir(VENV_BIN) else os.path.dirname(sys.executable)


@pytest.fixture
def clean_env():
    """The environment for a launched job: no launcher variables leak in from the test runner."""
    strip = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "MPI_LOCAL", "PROVHPC_")
    return {k: v for k, v in os.environ.items() if not k.startswith(strip)}
