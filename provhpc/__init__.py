"""provhpc: MPI-native W3C PROV provenance for scientific machine learning on HPC.

Importing provhpc and calling its API without an agent is a cheap no-op; run
your program under ``provhpc run -- python script.py`` (with mpiexec or srun)
to capture.
"""

from ._version import __version__
from .capture.api import (
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
from .launch.session import init, shutdown


def flush(timeout=None) -> bool:
    """Hand every record captured so far to the aggregator and wait until it is on disk."""
    from .capture import api

    agent = api.get_agent(start_child=False)
    if agent is None:
        return True
    api.fingerprint_pending(agent)  # files of activities the C path ended since
    return agent.flush(timeout)


def open(path):  # noqa: A001 - the documented entry point, like h5py.File / io.open
    """Open a run directory (or a directory of runs) for queries."""
    from .post.reader import open_path

    return open_path(path)


__all__ = [
    "Activity", "Entity", "attribute", "data", "epoch", "flush", "generated",
    "hyperparameters", "init", "metric", "open", "shutdown", "stage", "task", "used",
    "__version__",
]
