"""Is a process still the one a run recorded?  Its pid, checked against when it was seen.

Pids are reused: ``kernel.pid_max`` is 32768 on many systems, and a busy node (or a test
suite) wraps it within minutes, so a pid alone can name a later, unrelated process.  A
process known to run at ``seen_ns`` (its hello, its segment's or ready file's time) is
that process only if the live one with its pid started by then.
"""

from __future__ import annotations

import os
import time

__all__ = ["pid_alive"]

_SLACK_NS = 1_000_000_000  # /proc/uptime and the start time are in 10 ms ticks


def pid_alive(pid: int, seen_ns: int = 0) -> bool:
    """Is ``pid`` alive (not a zombie)?  With ``seen_ns`` (a ``time.time_ns()`` at which
    the process was known to run): and did the live process start by then?  Another
    user's process, or one whose start cannot be read, counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":  # a zombie is gone
            return False
        if not seen_ns:
            return True
        with open("/proc/uptime", "rb") as fh:
            up_s = float(fh.read().split()[0])
        age_ns = int((up_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")) * 1e9)
        return time.time_ns() - age_ns <= seen_ns + _SLACK_NS
    except (OSError, IndexError, ValueError):
        return True
