import os
import sys
import time

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


def _mapped_shm() -> set[str]:
    """The /dev/shm files some live process has mapped (any user's we can read)."""
    names: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    if "/dev/shm/" in line:
                        names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return names


@pytest.fixture(scope="session", autouse=True)
def _no_mpich_shm_left_behind():
    """MPICH unlinks its shared-memory file in MPI_Finalize: ranks the tests kill on purpose
    (SIGKILL, a time limit) leave one each, ~4 MiB of RAM in /dev/shm until reboot.  At the
    end of the session, remove those this session's jobs left: created since it began, and
    mapped by no live process (so no running job of anyone's loses its file)."""
    start = time.time() - 1.0
    yield
    if not os.path.isdir("/dev/shm"):
        return
    mapped = _mapped_shm()
    for name in os.listdir("/dev/shm"):
        if not name.startswith("mpich_shm_") or name in mapped:
            continue
        path = os.path.join("/dev/shm", name)
        try:
            st = os.stat(path)
            if st.st_mtime >= start and st.st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass
