"""Is a process still the one a run recorded?  Its pid, checked against when it was seen.

Pids are reused: ``kernel.pid_max`` is 32768 on many systems, and a busy node (or a test
suite) wraps it within minutes, so a pid alone can name a later, unrelated process.  A
process known to run at ``seen_ns`` (its hello, its segment's or ready file's time) is
that process only if the live one with its pid started by then.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["pid_alive", "writer_alive"]

# A later owner of a pid starts after the recorded process ended, and pids are handed
# out in order, so reuse within seconds does not happen; the slack absorbs the start
# time's 10 ms ticks and any stall of this process between its two clock reads.
_SLACK_NS = 5_000_000_000


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
        boot_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)  # wall at boot
        started_ns = boot_ns + int(fields[19]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return started_ns <= seen_ns + _SLACK_NS
    except (OSError, IndexError, ValueError):
        return True


def writer_alive(path: str) -> int:
    """The pid in the JSON file ``path`` ({"pid": ...}, written by that process once it ran)
    when that process still lives, checked against the file's time; 0 when it does not,
    or the file cannot be read."""
    try:
        with open(path) as fh:
            pid = int(json.load(fh)["pid"])
        seen = os.stat(path).st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return pid if pid > 0 and pid_alive(pid, seen) else 0
