"""The modes of a run directory and its files (no h5py here: ranks import it)."""

from __future__ import annotations

import os

__all__ = ["remove_rendezvous_dirs", "run_modes"]


def run_modes(group_readable: bool) -> tuple[int, int]:
    """(file mode, directory mode) of a run directory: owner-only by default, or readable
    by the directory's group (``PROVHPC_GROUP_READABLE=1``, a project's shared ``--out``).
    Rendezvous sockets and shared-memory segments stay owner-only either way."""
    return (0o640, 0o750) if group_readable else (0o600, 0o700)


def remove_rendezvous_dirs(ready: str, run_id: str, node: str) -> None:
    """At a node's end: rmdir its runtime directory ``<run_id>/<node>/`` (where ``ready``
    lies), then the run's once it is empty.  A directory not of that layout, or still holding
    a file (another node still starting or running), is left alone."""
    node_dir = os.path.dirname(ready)
    run_dir = os.path.dirname(node_dir)
    if os.path.basename(node_dir) != node or os.path.basename(run_dir) != run_id:
        return
    for d in (node_dir, run_dir):
        try:
            os.rmdir(d)
        except OSError:
            return
