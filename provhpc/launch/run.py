"""``provhpc run -- CMD``: capture around a Python program, launched by any launcher.

A Python command runs in this process through ``runpy`` so the agent is the
program's own; an uncaught exception is recorded, flushed, mapped to an exit
status and, in a multi-rank MPI job, to ``MPI_Abort`` so one failing rank never
hangs the job.  SIGTERM (a SLURM time limit) unwinds the program as
``SystemExit(143)`` so every open activity is closed and flushed.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import traceback

from . import session as _session

__all__ = ["PYTHON_FLAGS_WITHOUT_VALUE", "run", "split_python"]

PYTHON_FLAGS_WITHOUT_VALUE = {"-u", "-B", "-O", "-OO", "-s", "-S", "-E", "-I", "-q"}


def split_python(cmd: list[str]):
    """(mode, target, argv) for a Python command line, or None for anything else."""
    if not cmd:
        raise ValueError("provhpc run: no command given (use: provhpc run -- python script.py)")
    args = list(cmd)
    exe = os.path.basename(args[0])
    if args[0].endswith(".py"):
        return "path", args[0], args
    if not (exe.startswith("python")
            or os.path.realpath(args[0]) == os.path.realpath(sys.executable)):
        return None
    args = args[1:]
    while args and args[0] in PYTHON_FLAGS_WITHOUT_VALUE:
        args = args[1:]
    if not args:
        raise ValueError("provhpc run: no script given to python")
    if args[0] == "-m" and len(args) > 1:
        return "module", args[1], [args[1]] + args[2:]
    if args[0] == "-c" and len(args) > 1:
        return "code", args[1], ["-c"] + args[2:]
    if args[0].startswith("-"):
        raise ValueError(f"provhpc run: unsupported python option {args[0]!r}")
    return "path", args[0], args


def _run_python(mode: str, target: str, argv: list[str]) -> None:
    sys.argv = argv
    if mode == "path":
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    elif mode == "module":
        sys.path.insert(0, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, "")
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


def _on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def run(cmd: list[str], out=None) -> int:
    parsed = split_python(cmd)
    s = _session.init(out=out, argv=cmd[1:] if parsed and parsed[0] != "path" else cmd)
    if parsed is None:
        return _run_subprocess(cmd, s)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if s is not None:
        # A rank blocked in C (an MPI collective) never runs the handler above: the signal
        # also wakes the agent's I/O thread, which drains and exits if the program has not
        # unwound within agent.SIGTERM_GRACE, while the handler is still ours.
        signal.set_wakeup_fd(s.agent.wakeup_fd, warn_on_full_buffer=False)
        s.agent.sigterm_exit = lambda: signal.getsignal(signal.SIGTERM) is _on_sigterm
    error: BaseException | None = None
    status, code = "ok", 0
    try:
        _run_python(*parsed)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
        if code:
            status, error = ("terminated" if code == 143 else "error"), exc
    except KeyboardInterrupt as exc:
        status, code, error = "error", 130, exc
    except BaseException as exc:  # noqa: B902 - the program's failure becomes our exit status
        traceback.print_exc()
        status, code, error = "error", 1, exc
    sys.stdout.flush()
    sys.stderr.flush()
    if s is not None:
        signal.set_wakeup_fd(-1)  # before shutdown closes the pipe
        _session.shutdown(status, code, error)
        if status == "terminated":
            # Everything is on disk.  Leave now: interpreter teardown would run
            # MPI_Finalize, which can wait forever for peers that were stopped too.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if code and s.comm is not None and s.comm.Get_size() > 1 and status != "terminated":
            print(f"provhpc: rank {s.ident.rank} failed (exit {code}); aborting the job",
                  file=sys.stderr, flush=True)
            s.comm.Abort(code)
    return code


def _run_subprocess(cmd: list[str], s) -> int:
    """A non-Python command: run it as a child; the wrapper records its run activity."""
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda n, f: proc.send_signal(n))
    code = proc.wait()
    if s is not None:
        _session.shutdown("ok" if code == 0 else "error", code)
    return code if code >= 0 else 128 - code
