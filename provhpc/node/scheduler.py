"""What the batch scheduler says about how a job ended (SLURM: ``scontrol``, ``sacct``).

A rank that got SIGTERM cannot tell a time limit from ``scancel`` or a preemption: the
signal is the same.  The scheduler can, while it still knows the job (``scontrol`` for
``MinJobAge`` seconds after its end, ``sacct`` where accounting is kept).  ``verdict``
asks both, briefly, and says what it could not learn: ``final`` is False while the job
is still completing, and the answer may change then (a cancelled job reads
``completing`` until it is gone).
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["SLURM_STATES", "TIMEOUT_S", "verdict"]

#: seconds one scheduler command may take: a slow controller must not hold a verb
TIMEOUT_S = 5.0

#: SLURM job states and how provhpc names the end they mean
SLURM_STATES = {
    "COMPLETED": "completed", "FAILED": "failed", "TIMEOUT": "timeout",
    "CANCELLED": "cancelled", "PREEMPTED": "preempted", "NODE_FAIL": "node_fail",
    "OUT_OF_MEMORY": "out_of_memory", "DEADLINE": "deadline", "BOOT_FAIL": "boot_fail",
    "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued",
}
_REASONS = {"TimeLimit": "timeout", "Preemption": "preempted"}


def verdict(job_id: str, attempt: int = 0, timeout: float = TIMEOUT_S) -> dict | None:
    """How SLURM says job ``job_id`` (attempt ``attempt``: its restart count) ended.

    A dict with ``scheduler`` ("slurm"), ``source`` (the command that told), ``state``
    (SLURM's own word), ``verdict`` (``timeout``, ``cancelled``, ``preempted``,
    ``requeued``, ``node_fail``, ``completed``, ``failed``… or ``None`` when it cannot tell
    yet), ``reason``, ``exit_code`` and ``final``; ``None`` where no SLURM command answers
    (not a SLURM job, no client here, the job long forgotten without accounting)."""
    job_id = str(job_id or "").split(".")[0]
    if not job_id.isdigit():
        return None
    out = _scontrol(job_id, timeout)
    if out is not None:
        restarts = _int(out.get("Restarts"))
        if restarts is not None and restarts > attempt:  # this attempt was requeued
            return _answer("scontrol", out.get("JobState", ""), "requeued", out, True)
        state = out.get("JobState", "")
        if state in SLURM_STATES:
            return _answer("scontrol", state, SLURM_STATES[state], out, True)
        if state == "COMPLETING":  # the ranks are ending: only some causes are known yet
            return _answer("scontrol", state, _REASONS.get(out.get("Reason", "")), out, False)
        if state in ("RUNNING", "PENDING", "SUSPENDED", "CONFIGURING"):
            return _answer("scontrol", state, None, out, False)
    acct = _sacct(job_id, attempt, timeout)
    if acct is not None:
        state = acct["State"].split()[0] if acct.get("State") else ""
        return _answer("sacct", state, SLURM_STATES.get(state), acct,
                       state in SLURM_STATES)
    return None


def _answer(source, state, word, fields, final) -> dict:
    return {"scheduler": "slurm", "source": source, "state": state.lower(), "verdict": word,
            "reason": fields.get("Reason", "") if fields.get("Reason") not in (None, "None")
            else "", "exit_code": fields.get("ExitCode", ""),
            "time_limit": fields.get("TimeLimit", fields.get("Timelimit", "")),
            "final": bool(final)}


def _run(cmd: list[str], timeout: float) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _scontrol(job_id: str, timeout: float) -> dict | None:
    """``scontrol show job -o``: one line of Key=Value (a value may hold spaces only at
    the end, in Command=... and the like, which are not read)."""
    text = _run(["scontrol", "show", "job", "-o", job_id], timeout)
    if not text or not text.strip():
        return None
    fields = {}
    for word in text.split("\n")[0].split(" "):
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields if fields.get("JobId") == job_id or "JobState" in fields else None


def _sacct(job_id: str, attempt: int, timeout: float) -> dict | None:
    """The job's line in accounting, where it is kept (``--duplicates``: every attempt)."""
    cols = ["JobID", "State", "ExitCode", "Reason", "Timelimit"]
    text = _run(["sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id,
                 "-o", ",".join(cols)], timeout)
    if not text:
        return None
    rows = [dict(zip(cols, line.split("|"))) for line in text.splitlines() if "|" in line]
    rows = [r for r in rows if r.get("JobID") == job_id]
    if not rows:
        return None
    # one line per attempt, oldest first: a later one means this attempt was requeued
    return rows[min(attempt, len(rows) - 1)]


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
