"""The modes of a run directory and its files (no h5py here: ranks import it)."""

from __future__ import annotations

__all__ = ["run_modes"]


def run_modes(group_readable: bool) -> tuple[int, int]:
    """(file mode, directory mode) of a run directory: owner-only by default, or readable
    by the directory's group (``PROVHPC_GROUP_READABLE=1``, a project's shared ``--out``).
    Rendezvous sockets and shared-memory segments stay owner-only either way."""
    return (0o640, 0o750) if group_readable else (0o600, 0o700)
