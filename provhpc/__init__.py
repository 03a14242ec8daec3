"""provhpc: MPI-native W3C PROV provenance for scientific machine learning on HPC.

Importing provhpc and calling its API without an agent is a cheap no-op; run
your program under ``provhpc run -- python script.py`` (with mpiexec or srun)
to capture.
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    Activity,
    Entity,
    attribute,
    data,
    epoch,
    generated,
    hyperparameters,
    metric,
    stage,
    task,
    used,
)
from .session import init, shutdown  # noqa: E402


def flush(timeout=None) -> bool:
    """Hand every record captured so far to the aggregator and wait until it is on disk."""
    from . import api

    agent = api._agent
    return True if agent is None else agent.flush(timeout)


def open(path):  # noqa: A001 - the documented entry point, like h5py.File / io.open
    """Open a run directory (or a directory of runs) for queries."""
    from .reader import open_path

    return open_path(path)


__all__ = [
    "Activity", "Entity", "attribute", "data", "epoch", "flush", "generated",
    "hyperparameters", "init", "metric", "open", "shutdown", "stage", "task", "used",
    "__version__",
]
