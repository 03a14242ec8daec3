"""``provhpc run -- CMD``: capture around a Python program, launched by any launcher.

A Python command runs in this process through ``runpy`` so the agent is the
program's own; an uncaught exception is recorded, flushed, mapped to an exit
status and, in a multi-rank MPI job, to ``MPI_Abort`` so one failing rank never
hangs the job.  SIGTERM (a SLURM time limit) unwinds the program as
``SystemExit(143)`` so every open activity is closed and flushed.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import shutil
import signal
import subprocess
import sys
import traceback

from . import session as _session

__all__ = ["PYTHONPATH_FREE_FLAGS", "is_this_interpreter", "program_of", "run", "split_python"]

# interpreter flags a program run in this process does not miss (anything else, such as
# -X or -W, runs the interpreter as a child, as asked)
PYTHONPATH_FREE_FLAGS = {"-u", "-B", "-q"}


def split_python(cmd: list[str]):
    """(mode, target, argv) when ``cmd`` runs Python in this very interpreter, else None.

    ``script.py ...`` and ``python[3] [flags] script.py|-m mod|-c code`` where ``python``
    is this interpreter (the same file in the same directory: the same environment) run in
    this process.  Anything else (another interpreter, a shell script, an interpreter flag
    this process cannot take over) runs as it is asked, as a child: ``None``.
    """
    if not cmd:
        raise ValueError("no command given (use: provhpc run -- python script.py)")
    args = list(cmd)
    if args[0].endswith(".py"):
        return "path", args[0], args
    if not is_this_interpreter(args[0]):
        return None
    args = args[1:]
    while args and args[0] in PYTHONPATH_FREE_FLAGS:
        args = args[1:]
    if not args:
        raise ValueError("no script given to python")
    if args[0] == "-m" and len(args) > 1:
        return "module", args[1], [args[1]] + args[2:]
    if args[0] == "-c" and len(args) > 1:
        return "code", args[1], ["-c"] + args[2:]
    if args[0].startswith("-"):
        return None  # an option of the interpreter's own: the interpreter runs, as asked
    return "path", args[0], args


def is_this_interpreter(exe: str) -> bool:
    """Is ``exe`` (a name on PATH or a path) the interpreter running provhpc?

    The same binary is not enough: a venv's ``bin/python`` links to the system one, and
    ``/usr/bin/python3`` must not run with the venv's packages.  It must be the same file
    in the same directory as ``sys.executable``."""
    if not os.path.basename(exe).startswith("python"):
        return False
    path = exe if os.sep in exe else shutil.which(exe)
    if not path or not sys.executable:
        return False
    here = os.path.abspath(sys.executable)
    path = os.path.abspath(path)
    try:
        return os.path.dirname(path) == os.path.dirname(here) and os.path.samefile(path, here)
    except OSError:
        return False


def program_of(cmd: list[str], parsed) -> dict:
    """What ran, as recorded: mode (script, module, code, command), program, interpreter."""
    if parsed is None:
        exe = cmd[0] if os.sep in cmd[0] else (shutil.which(cmd[0]) or cmd[0])
        return {"mode": "command", "program": os.path.abspath(exe) if os.path.exists(exe)
                else exe, "interpreter": ""}
    mode, target, _ = parsed
    program = os.path.abspath(target) if mode == "path" else target if mode == "module" \
        else "-c"
    return {"mode": {"path": "script"}.get(mode, mode), "program": program,
            "interpreter": os.path.abspath(sys.executable)}


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


_stopping = False


def _on_sigterm(signum, _frame):
    """The first SIGTERM unwinds the program (``SystemExit(143)``); the rank then ends its
    capture.  Later ones are ignored: a time limit signals twice within milliseconds
    (slurmstepd, then ``srun: forcing job termination``), and a second SystemExit raised
    inside the shutdown would lose the rank's goodbye.  The agent still ends a rank whose
    unwinding hangs (``agent.SIGTERM_GRACE``), and the scheduler's SIGKILL follows."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise SystemExit(128 + signum)


def _after_fork_in_child() -> None:
    """A child the program forks is the program's, not the wrapper's: SIGTERM kills it as it
    would without capture, and its signals no longer wake the parent's agent."""
    with contextlib.suppress(ValueError):  # forked from a thread other than the main one
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)


def run(cmd: list[str], out=None) -> int:
    global _stopping
    parsed = split_python(cmd)
    # A command of its own may be the MPI process itself (`srun provhpc run -- ./train.sh`):
    # the wrapper then never starts MPI, and agrees on the run id from the launcher's job.
    s = _session.init(out=out, argv=cmd, program=program_of(cmd, parsed),
                      use_mpi=parsed is not None)
    if parsed is None:
        return _run_subprocess(cmd, s)
    main_pid = os.getpid()
    os.register_at_fork(after_in_child=_after_fork_in_child)
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
    except KeyboardInterrupt as exc:  # SIGINT: Ctrl-C, or the launcher passing it on
        traceback.print_exc()  # as Python prints it without the wrapper
        status, code, error = "terminated", 130, exc
    except BaseException as exc:  # noqa: B902 - the program's failure becomes our exit status
        traceback.print_exc()
        status, code, error = "error", 1, exc
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpid() != main_pid:
        # A child the program forked ended (``sys.exit`` in an ``os.fork`` child): its exit
        # code is the program's, as without capture; the run is the parent's to end.
        return code
    if s is not None:
        _stopping = True  # a SIGTERM from here on must not interrupt the shutdown,
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nor a second Ctrl-C
        signal.set_wakeup_fd(-1)  # before shutdown closes the pipe
        _session.shutdown(status, code, error)
        if status == "terminated":
            # Everything is on disk.  Leave now: interpreter teardown would run
            # MPI_Finalize, which can wait forever for peers that were stopped too.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if code and error is not None and not isinstance(error, SystemExit) \
                and s.comm is not None and s.comm.Get_size() > 1:
            # An uncaught exception: the other ranks may wait for this one in a collective
            # forever.  An explicit sys.exit(n) is the program's own ending, as without
            # capture (every rank may be ending the same way).
            print(f"provhpc: rank {s.ident.rank} failed (exit {code}); aborting the job",
                  file=sys.stderr, flush=True)
            s.comm.Abort(code)
    return code


def _run_subprocess(cmd: list[str], s) -> int:
    """A command of its own (another interpreter, a shell script): run it as a child, as
    asked.  The wrapper records the run; every Python process below it that imports
    provhpc joins the run through the environment (``session.ATTACH_ENV``)."""
    try:
        # close_fds=False: the child gets what it would get without the wrapper, the
        # launcher's PMI descriptor (PMI_FD) included, so it can be the MPI process
        proc = subprocess.Popen(cmd, close_fds=False)
    except OSError as exc:  # as a shell says it: 127 not found, 126 not executable
        print(f"provhpc run: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        if s is not None:
            _session.shutdown("error", code)
        return code
    got: list[int] = []

    def forward(signum, _frame):
        got.append(signum)
        if signum == signal.SIGINT and _in_terminal_foreground():
            return  # Ctrl-C reached the child itself, from the terminal
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
    if s is not None:
        status = "ok" if code == 0 else "terminated" if got else "error"
        _session.shutdown(status, code)
    return code


def _in_terminal_foreground() -> bool:
    """Is this process in the foreground process group of its terminal (where Ctrl-C
    signals the whole group, the child included)?"""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)
