"""Starting and stopping capture in a process: identity, run id, rendezvous.

``init()`` is what ``provhpc run`` does before user code: detect the rank,
agree on one run id, have the node's leader start the aggregator, wait for it,
and start this rank's agent.  ``shutdown()`` ends open activities, hands every
record over and, on a leader, waits for the aggregator to close the partition.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import tempfile
import time

from ..capture import api
from ..capture.agent import Agent
from ..format import records as R
from ..format.modes import remove_rendezvous_dirs, run_modes
from ..format.procs import pid_alive, writer_alive
from ..format.segment import segment_name, shm_dir
from . import config as _config
from . import environment as _environment
from . import identity as _identity

__all__ = [
    "ATTACH_ENV", "MIN_FREE", "OutputRefused", "RUN_ID_RE", "RunIdInUse", "Session",
    "agree_run", "agree_run_id", "attach_from_environ", "check_output", "claim_rendezvous",
    "claim_run_dir", "clean_env", "current", "init", "job_digest", "new_run_id",
    "on_shutdown", "rendezvous", "run_meta", "runtime_base", "shutdown", "spawn_aggregator",
    "validate_run_id", "wait_ready"
]

log = logging.getLogger("provhpc")

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_ENV_STRIP = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "MPI_LOCAL", "I_MPI")


class Session:
    """What ``init`` started in this process."""

    def __init__(self, cfg, ident, run_id, run_dir, agent, aggregator=None, comm=None):
        self.cfg, self.ident, self.run_id, self.run_dir = cfg, ident, run_id, run_dir
        self.agent, self.aggregator, self.comm = agent, aggregator, comm
        self.run_activity = None
        self.closed = False
        self.ready = ""  # this node's rendezvous ready file ("" for a tcp connection)
        self.nodes = [ident.node]  # every node expected to leave a partition
        self.previous_attempt = ""  # rank 0: the run id of this job's attempt before a requeue


_session: Session | None = None


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ValueError(f"provhpc: invalid run id {run_id!r} (letters, digits, . _ -; "
                         "no path separators)")
    return run_id


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _mpi_comm(ident):
    """COMM_WORLD when this is an MPI launch with more than one rank."""
    if ident.size <= 1 or ident.launcher not in ("hydra", "openmpi", "srun"):
        return None
    try:
        import mpi4py
    except ImportError:
        return None
    if "mpi4py.MPI" not in sys.modules:
        # MPI is started here for the run-id broadcast; mpi4py would register MPI_Finalize
        # for every process that exits, forked children (DataLoader workers) included, which
        # changes their exit status.  Only this process finalizes, once, at its exit.
        mpi4py.rc.finalize = False
        atexit.register(_finalize_mpi, os.getpid())
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != ident.size:
        log.warning("provhpc: the launcher says %d ranks but MPI sees %d (a launcher/MPI "
                    "mismatch gives silent singletons); not using MPI", ident.size,
                    comm.Get_size())
        return None
    return comm


def _finalize_mpi(pid: int) -> None:
    """MPI_Finalize at the exit of the process that started MPI, never of a forked child."""
    if os.getpid() != pid:
        return
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def agree_run_id(cfg, ident, comm) -> str:
    """The run id every rank of this job agrees on (see ``agree_run``)."""
    return agree_run(cfg, ident, comm)[0]


def agree_run(cfg, ident, comm) -> tuple[str, str]:
    """(run id, job token) that every rank of this job shares, and no other job does.

    The token tells this job from another that was given the same run id: with MPI it is
    a secret that rank 0 draws and broadcasts; without MPI it is derived from the
    launcher's job identity (``_job_key``), and it is ``""`` (nothing checked) when the
    launcher gives none.  A requeued SLURM job or a restarted torchrun attempt gets a
    run id of its own (``.r<N>``), so it never writes into the finished attempt.
    """
    given = validate_run_id(cfg.run_id) if cfg.run_id else ""
    if comm is not None:
        mine = (given or new_run_id(), secrets.token_hex(16)) if comm.Get_rank() == 0 else None
        rid, token = comm.bcast(mine, root=0)
        return rid, token
    if ident.size <= 1:
        return given or new_run_id(), secrets.token_hex(16)
    key = _job_key(ident)
    if given:
        return given, key
    env = os.environ
    if ident.launcher == "srun" and ident.job_id:
        rid = f"slurm-{ident.job_id}.{ident.step_id or 0}{_attempt('SLURM_RESTART_COUNT')}"
        return validate_run_id(rid), key
    if ident.launcher == "torchrun":
        trid = env.get("TORCHELASTIC_RUN_ID", "")
        if not (trid and trid != "none"):  # single-node torchrun: the workers' common parent
            trid = f"{os.getppid()}-{_proc_start(os.getppid())}"
        suffix = _attempt("TORCHELASTIC_RESTART_COUNT")
        return validate_run_id(f"torchrun-{trid}"[:96 - len(suffix)] + suffix), key
    if key.startswith("openmpi:"):  # Open MPI's job namespace, the same on every node
        return validate_run_id(re.sub(r"[^A-Za-z0-9._-]", "-", f"ompi-{key[8:]}")[:96]), key
    if ident.launcher == "hydra" and ident.local_size == ident.size:
        # one node: every rank is a child of the same hydra proxy
        proxy = os.getppid()
        key = f"hydra:{proxy}-{_proc_start(proxy)}"
        return validate_run_id(f"hydra-{proxy}-{_proc_start(proxy)}"), key
    raise RuntimeError(f"provhpc: cannot agree on a run id across the nodes of this "
                       f"{ident.launcher} job without MPI; set PROVHPC_RUN_ID")


def _attempt(var: str) -> str:
    """``.r<N>`` for the N-th restart of a job (``var`` counts them), else ``""``."""
    n = os.environ.get(var, "")
    return f".r{n}" if n.isdigit() and int(n) > 0 else ""


def _job_key(ident) -> str:
    """What every rank of one job shares without MPI: the launcher's identity of the job."""
    env = os.environ
    if ident.launcher == "srun" and ident.job_id:
        return (f"srun:{ident.job_id}.{ident.step_id or 0}:"
                f"{env.get('SLURM_RESTART_COUNT', '0')}")
    if ident.launcher == "torchrun":
        trid = env.get("TORCHELASTIC_RUN_ID", "")
        if not (trid and trid != "none"):
            trid = f"{os.getppid()}-{_proc_start(os.getppid())}"
        return f"torchrun:{trid}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if ident.launcher == "openmpi" and env.get("PMIX_NAMESPACE"):
        return f"openmpi:{env['PMIX_NAMESPACE']}"
    if ident.launcher == "hydra" and env.get("PMI_PORT"):
        return f"hydra:{env['PMI_PORT']}"
    if ident.launcher == "hydra" and ident.local_size == ident.size:
        proxy = os.getppid()
        return f"hydra:{proxy}-{_proc_start(proxy)}"
    return ""


def job_digest(token: str) -> str:
    """The job token as it is written to files and hellos ("" for an unknown job)."""
    return hashlib.sha256(b"provhpc-job\0" + token.encode()).hexdigest()[:32] if token else ""


class RunIdInUse(ValueError):
    """Another job already owns this run id; nothing of this job was started."""


def _claim(path: str, doc: dict, mode: int) -> dict | None:
    """Make ``path`` name this job (``doc["job"]``), or return the other job's claim there.

    Created with O_EXCL, so of two jobs starting at once exactly one wins; a rank of the
    same job that finds it being written reads it again.
    """
    other: dict = {"job": "?"}
    for _ in range(200):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            try:
                with open(path) as fh:
                    other = json.load(fh)
            except FileNotFoundError:  # removed meanwhile (a refused job undid its claim)
                continue
            except (OSError, ValueError):  # the winner is writing it: at most a moment
                time.sleep(0.01)
                continue
            return None if other.get("job") == doc["job"] else other
        with open(fd, "w") as fh:
            json.dump(doc, fh)
        return None
    return other


def _describe(other: dict) -> str:
    parts = [f"launcher {other.get('launcher') or '?'}"]
    if other.get("job_id"):
        parts.append(f"job {other['job_id']}" + (f".{other['step_id']}" if other.get(
            "step_id") not in (None, "") else ""))
    if other.get("host"):
        parts.append(f"host {other['host']} pid {other.get('pid', '?')}")
    if other.get("start"):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S",
                                                time.localtime(other["start"] / 1e9)))
    return ", ".join(parts)


def claim_run_dir(run_dir: str, run_id: str, doc: dict, mode: int) -> None:
    """Make ``run_dir/job.json`` this job's, or refuse: a run directory in use or finished
    is never written into by another job (its manifest is never replaced)."""
    hint = ("nothing was started; choose another run id (PROVHPC_RUN_ID), or unset it "
            "for a fresh one")
    claim = os.path.join(run_dir, "job.json")
    manifest = os.path.join(run_dir, "manifest.json")
    if not os.path.exists(claim) and os.path.exists(manifest):
        raise RunIdInUse(f"run id {run_id!r} already has a run in {run_dir} (written before "
                         f"job claims); {hint}")
    other = _claim(claim, doc, mode)
    if other is None:
        return
    status = "running or ended without a manifest"
    with contextlib.suppress(OSError, ValueError):
        with open(manifest) as fh:
            status = "status " + str(json.load(fh).get("status"))
    raise RunIdInUse(f"run id {run_id!r} is taken by another job in {run_dir} "
                     f"({_describe(other)}; {status}); {hint}")


def claim_rendezvous(ready: str, run_id: str, node: str, doc: dict) -> None:
    """Make this node's runtime directory of the run this job's, or refuse (the same run id
    in use by another job here, whatever its --out).  A claim whose job is gone (no live
    claimant and no live aggregator on this host) is taken over."""
    claim = os.path.join(os.path.dirname(ready), "job")
    other: dict = {}
    for _ in range(2):
        found = _claim(claim, doc, 0o600)
        if found is None:
            return
        other = found
        if not _stale(other, doc, ready):
            break
        log.info("provhpc: taking over the stale runtime directory of run %s on node %s "
                 "(its job is gone)", run_id, node)
        for p in (claim, ready, ready + ".failed"):
            with contextlib.suppress(OSError):
                os.unlink(p)
    _refuse_rendezvous(other, run_id, node)


def check_rendezvous_free(node_dir: str, run_id: str, node: str, doc: dict) -> None:
    """Refuse now, before anything of this job is made, when another live job holds this
    node's runtime directory of the run (``claim_rendezvous`` decides races later)."""
    try:
        with open(os.path.join(node_dir, "job")) as fh:
            other = json.load(fh)
    except (OSError, ValueError):
        return
    if other.get("job") != doc["job"] and not _stale(other, doc, os.path.join(node_dir,
                                                                              "ready")):
        _refuse_rendezvous(other, run_id, node)


def _stale(other: dict, doc: dict, ready: str) -> bool:
    """Is ``other`` (a node's claim) left by a job that is gone: made on this host, its
    claimant no longer that live process (dead, a zombie, or its pid reused since the
    claim's ``start``), and no live aggregator named in the ready file?"""
    return other.get("host") == doc["host"] and not _claimant_alive(other) \
        and not writer_alive(ready)


def _refuse_rendezvous(other: dict, run_id: str, node: str) -> None:
    raise RunIdInUse(f"run id {run_id!r} is in use on node {node} by another job "
                     f"({_describe(other)}); nothing was started; choose another run id "
                     "(PROVHPC_RUN_ID), or unset it for a fresh one")


def _claimant_alive(claim: dict) -> bool:
    try:
        pid = int(claim.get("pid"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    start = claim.get("start")
    return pid > 0 and pid_alive(pid, start if isinstance(start, int) else 0)


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def _private_dir(parent: str, warn: bool = False) -> str:
    """``parent/provhpc-<uid>``, or the first of ``.1`` .. ``.7`` that is ours.

    A directory of that name made by another user (or open to others, or a symlink) is
    never used: every process of the node walks the same names and stops at the first
    owner-only directory of ours, so the ranks of a node still meet in one place.
    """
    name = f"provhpc-{os.getuid()}"
    for i in range(8):
        cand = os.path.join(parent, name if i == 0 else f"{name}.{i}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(cand, 0o700)
        try:
            st = os.lstat(cand)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            if i and warn and cand not in _warned:
                _warned.add(cand)
                log.warning("provhpc: %s is not yours or not private; using %s instead",
                            os.path.join(parent, name), cand)
            return cand
    raise PermissionError(f"provhpc: no private runtime directory of yours under {parent} "
                          f"({name} .. {name}.7 are taken); set PROVHPC_RUNTIME_DIR")


_warned: set = set()


def runtime_base(cfg, warn: bool = False) -> str:
    """The owner-only directory of this user's rendezvous sockets.

    An explicit ``PROVHPC_RUNTIME_DIR`` is used as given (and refused when it is not
    private); the default places fall back to a private name of our own when another
    user took them.
    """
    if cfg.runtime_dir:
        return os.path.join(cfg.runtime_dir, f"provhpc-{os.getuid()}")
    return _private_dir(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), warn)


def rendezvous(cfg, run_id: str, node: str, warn: bool = False) -> tuple[str, str]:
    """The aggregator's endpoint and ready file for (run, node); the dir is owner-only."""
    base = runtime_base(cfg, warn)
    # One directory per node: a node that ends first removes only its own files, and the run's
    # directory only once it is empty, never under another node that is still starting.
    d = os.path.join(base, run_id, node)
    ready = os.path.join(d, "ready")
    sock = os.path.join(d, "sock")
    dirs = [base, d]
    if len(sock) > 100:  # the limit of an ipc:// path: a short hashed name, /tmp if need be
        key = hashlib.sha1(f"{run_id}\0{node}".encode()).hexdigest()[:20]
        short = base if len(base) < 70 else _private_dir("/tmp", warn)
        sock = os.path.join(short, f"{key}.sock")
        dirs.append(short)
    for p in dirs:
        for _ in range(10):  # another node may rmdir the (empty) run directory meanwhile
            try:
                os.makedirs(p, mode=0o700, exist_ok=True)
                break
            except FileNotFoundError:
                continue
        st = os.stat(p)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"provhpc: {p} must be owned by you with mode 0700")
    return "ipc://" + sock, ready


def clean_env(environ=None) -> dict:
    """The environment of a helper process: no launcher variables, so it is never an MPI rank."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith(_ENV_STRIP)}


def spawn_aggregator(cfg, run_id, node, run_dir, endpoint, ready, expect, meta, job="",
                     leader=None):
    """Start the node's aggregator; ``leader`` is the (rank, local rank) of this process,
    which the aggregator watches until its hello (see ``Aggregator._check_leader``)."""
    fmode, dmode = run_modes(cfg.group_readable)
    os.makedirs(run_dir, mode=dmode, exist_ok=True)
    # The metadata (argv, cwd, git commit, packages) goes through an owner-only file beside
    # the ready file, never the command line, which every user can read in /proc.
    meta_file = os.path.join(os.path.dirname(ready) or run_dir, "meta.json")
    private = {"_job": job} if job else {}  # the underscored keys are not stored
    if leader is not None:
        private["_leader"] = {"rank": leader[0], "local_rank": leader[1], "pid": os.getpid()}
    with open(os.open(meta_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        json.dump({**meta, **private}, fh)
    logf = open(os.open(os.path.join(run_dir, f"{node}.aggregator.log"),
                        os.O_WRONLY | os.O_CREAT | os.O_APPEND, fmode), "ab")
    env = {**clean_env(), **_config.to_environ(cfg)}
    cmd = [sys.executable, "-m", "provhpc", "aggregate", "--run-id", run_id, "--node", node,
           "--out", os.path.dirname(run_dir), "--endpoint", endpoint, "--ready", ready,
           "--expect", str(expect), "--meta-file", meta_file]
    try:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    finally:
        logf.close()


def wait_ready(ready: str, timeout: float, proc=None) -> bool:
    """Wait for the node's aggregator; a leader whose spawn died marks ``<ready>.failed``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(ready):
            return True
        if os.path.exists(ready + ".failed"):
            return False
        if proc is not None and proc.poll() is not None:
            _mark_failed(ready, f"aggregator exited with {proc.returncode}")
            return False
        time.sleep(0.01)
    if proc is not None:
        _mark_failed(ready, f"aggregator not ready after {timeout:.0f}s")
    return False


def _mark_failed(ready: str, why: str) -> None:
    """Tell this node's ranks that no aggregator will come (they stop waiting)."""
    try:
        with open(os.open(ready + ".failed", os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(why + "\n")
    except OSError:
        pass


MIN_FREE = 1 << 20  # bytes: less than this free on --out at start is refused


class OutputRefused(ValueError):
    """The output directory cannot take the run; nothing was started."""


def check_output(run_dir: str, dir_mode: int = 0o700) -> None:
    """Create ``run_dir`` owner-only and prove it writable with room to spare, or refuse.

    Free space is read on the nearest existing ancestor first, so a full disk gets no
    run directory at all (and ranks racing here all see the same thing).
    """
    hint = "nothing was started; choose a writable --out (PROVHPC_OUT)"
    probe_at = run_dir
    while not os.path.exists(probe_at) and os.path.dirname(probe_at) != probe_at:
        probe_at = os.path.dirname(probe_at)
    try:
        st = os.statvfs(probe_at)
    except OSError:
        st = None
    if st is not None and st.f_bavail * st.f_frsize < MIN_FREE:
        raise OutputRefused(f"the output directory {run_dir} is full "
                            f"({st.f_bavail * st.f_frsize} bytes free, {MIN_FREE} needed to "
                            f"start); {hint}")
    try:
        os.makedirs(run_dir, mode=dir_mode, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".provhpc-probe-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputRefused(f"cannot write the output directory {run_dir} "
                            f"({exc.strerror or exc}); {hint}") from None


def run_meta(ident, cfg, argv=None) -> dict:
    """Run metadata; a rank never imports h5py for it (the aggregator adds h5py/HDF5)."""
    import numpy
    import zmq

    from .._version import __version__

    return {"provhpc": __version__, "python": sys.version.split()[0],
            "numpy": numpy.__version__, "pyzmq": zmq.__version__, "launcher": ident.launcher,
            "job_id": ident.job_id, "step_id": ident.step_id, "world_size": ident.size,
            "scheduler": scheduler_of(os.environ), "restart_count": restart_count(),
            "user": _user(), "argv": _environment.redact_argv(argv or sys.argv),
            "cwd": os.getcwd(),
            # only the writers of meta (node leaders, rank 0) pay for git and package look-ups
            "environment": _environment.collect(argv or sys.argv)
            if ident.is_leader or ident.rank == 0 else {}}


def scheduler_of(env) -> str:
    """The batch system whose job this is (``slurm``, ``pbs``, ``lsf``), or ''."""
    for var, name in (("SLURM_JOB_ID", "slurm"), ("PBS_JOBID", "pbs"), ("LSB_JOBID", "lsf")):
        if env.get(var):
            return name
    return ""


def restart_count() -> int:
    """How many times the scheduler (``SLURM_RESTART_COUNT``) or torchrun restarted this job."""
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


def find_previous_attempt(out: str, run_id: str, job_id: str, attempt: int) -> str:
    """The run id of the latest earlier attempt of job ``job_id`` in ``out`` (a requeued
    SLURM job keeps its job id and counts its restarts), or ''."""
    if attempt <= 0 or not job_id:
        return ""
    best: tuple = ()
    try:
        names = os.listdir(out)
    except OSError:
        return ""
    for name in names:
        if name == run_id or name == "latest":
            continue
        try:
            with open(os.path.join(out, name, "manifest.json")) as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            continue
        meta = doc.get("meta") or {}
        n = meta.get("restart_count") or 0
        if str(meta.get("job_id")) == str(job_id) and isinstance(n, int) and n < attempt:
            best = max(best, (n, doc.get("start") or 0, name))
    return best[2] if best else ""


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def init(out=None, run_id=None, comm=None, argv=None, program=None, use_mpi=True,
         **settings) -> Session | None:
    """Start capture in this process (what ``provhpc run`` does before user code).

    Returns the session, or None when capture is disabled.  Safe to call once;
    a second call returns the running session.
    """
    global _session
    if _session is not None and not _session.closed:
        return _session
    cfg = _config.load(out=out, run_id=run_id, **settings)
    if not cfg.enabled:
        return None
    ident = _identity.simulate(_identity.detect(), cfg.simulate_nodes)
    if comm is None and use_mpi:  # never in a wrapper: its child may be the MPI process
        comm = _mpi_comm(ident)
    rid, token = agree_run(cfg, ident, comm)
    job = job_digest(token)
    nodes = sorted(set(comm.allgather(ident.node))) if comm is not None else [ident.node]
    run_dir = os.path.join(os.path.abspath(cfg.out), rid)
    doc = {"job": job, "run_id": rid, "launcher": ident.launcher, "job_id": ident.job_id,
           "step_id": ident.step_id, "host": ident.host, "pid": os.getpid(),
           "start": time.time_ns()}
    if not cfg.connect and job:  # another live job with this run id on this node
        check_rendezvous_free(os.path.join(runtime_base(cfg), rid, ident.node), rid,
                              ident.node, doc)
    if not cfg.connect:  # refused here, before the program runs, not found out at its end
        fmode, dmode = run_modes(cfg.group_readable)
        check_output(run_dir, dmode)
        if job:
            claim_run_dir(run_dir, rid, doc, fmode)
    elif job:
        pass  # no shared run directory here: the remote aggregator checks the hello
    elif ident.is_leader:
        log.warning("provhpc: no MPI and no job identity from launcher %s: a second job given "
                    "run id %s would not be told apart from this one", ident.launcher, rid)
    usable = True
    if cfg.connect:  # no aggregator on this host: send inline to a remote one over CURVE
        endpoint, ready = cfg.connect, ""
    else:
        endpoint, ready = rendezvous(cfg, rid, ident.node, warn=ident.is_leader)
        if job:
            claim_rendezvous(ready, rid, ident.node, doc)
    meta = run_meta(ident, cfg, argv)
    proc = None
    if usable and not cfg.connect and ident.is_leader and not cfg.external_aggregator \
            and not os.path.exists(ready):
        try:
            proc = spawn_aggregator(cfg, rid, ident.node, run_dir, endpoint, ready,
                                    ident.local_size, meta, job,
                                    leader=(ident.rank, ident.local_rank))
        except OSError as exc:  # a read-only or full output file system: run without one
            log.warning("provhpc: cannot start the aggregator of node %s: %s", ident.node, exc)
            usable = False
    if not usable and not cfg.connect:
        log.warning("provhpc: rank %d: no aggregator for node %s; records stay in segment "
                    "%s (up to its capacity, the rest counted as dropped): `provhpc "
                    "recover %s` (with a writable directory) writes them", ident.rank, ident.node,
                    segment_name(rid, ident.node, ident.rank, os.getpid()), run_dir)
        _mark_failed(ready, "no usable output directory")
    elif not wait_ready(ready, cfg.startup_timeout, proc):
        # The aggregator exists before user code runs (a rank that dies at once is then
        # still salvaged); without one, records wait in the segment for `provhpc recover`.
        log.warning("provhpc: rank %d: no aggregator for node %s within %.0fs; records stay "
                    "in the segment for `provhpc recover %s`", ident.rank, ident.node,
                    cfg.startup_timeout, run_dir)
    seg_path = os.path.join(shm_dir(), segment_name(rid, ident.node, ident.rank, os.getpid()))
    agent = Agent(cfg, ident, rid, endpoint, seg_path, ready_path=ready, job=job)
    api.set_agent(agent)
    _session = Session(cfg, ident, rid, run_dir, agent, proc, comm)
    _session.nodes = nodes
    _session.ready = ready
    if ident.rank == 0:
        _session.previous_attempt = find_previous_attempt(
            os.path.abspath(cfg.out), rid, ident.job_id, meta["restart_count"])
        _write_manifest(_session, meta, start=True)
    api.CURRENT.set(0)  # the run is the root, whatever an earlier session left open
    program = program or {"mode": "script" if sys.argv and sys.argv[0].endswith(".py")
                          else "embedded", "program": os.path.abspath(sys.argv[0])
                          if sys.argv and sys.argv[0] else "", "interpreter": sys.executable}
    name = program["program"] if program["mode"] in ("module", "code") else \
        os.path.basename(program["program"])
    act = api.Activity("run", ("python -c" if name == "-c" else name) or "run")
    _session.run_activity = act.start()
    act.attributes(rank=ident.rank, node=ident.node, host=ident.host, launcher=ident.launcher,
                   job_id=ident.job_id, local_rank=ident.local_rank, world_size=ident.size,
                   gpu=ident.gpu, pid=os.getpid(), **program)
    if _session.previous_attempt:
        act.attributes(previous_attempt=_session.previous_attempt)
    _export_attach(_session)
    atexit.register(shutdown)
    return _session


_before_shutdown: list = []


#: the environment variable through which a Python process started below ``provhpc run``
#: (a wrapper's ``python train.py``, a multiprocessing spawn child) joins the run
ATTACH_ENV = "PROVHPC_ATTACH"
_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
_saved_env: dict = {}


def _export_attach(s: Session) -> None:
    """Let every Python process started from here join the run as a ``child`` of this rank:
    what it needs goes into the environment, and ``_boot/sitecustomize.py`` on PYTHONPATH
    says on stderr, before that process's program runs, when it cannot import provhpc."""
    doc = {"run_id": s.run_id, "endpoint": s.agent.endpoint, "job": s.agent.job,
           "ident": s.ident.to_dict(), "config": s.cfg.to_dict(), "pid": os.getpid(),
           "parent": s.run_activity.id if s.run_activity is not None else 0}
    _saved_env.update({k: os.environ.get(k) for k in (ATTACH_ENV, "PYTHONPATH")})
    os.environ[ATTACH_ENV] = json.dumps(doc)
    pythonpath = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = _BOOT + (os.pathsep + pythonpath if pythonpath else "")


def _restore_env() -> None:
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()


def attach_from_environ(environ=None) -> bool:
    """In a Python process started below ``provhpc run``: join its run (lazily, on the first
    record, with an agent of its own, role ``child``).  True when it will."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ATTACH_ENV)
    if not raw or api.get_agent(start_child=False) is not None or api.child_pending():
        return False
    try:
        doc = json.loads(raw)
        if doc.get("pid") == os.getpid():
            return False  # the rank that exported it
        cfg = _config.load(environ={k: v for k, v in environ.items()
                                    if not k.startswith("PROVHPC_")}, **doc["config"])
        if not cfg.enabled:
            return False
        ident = _identity.Identity(**doc["ident"])
        api.attach_child((cfg, ident, str(doc["run_id"]), str(doc["endpoint"]),
                          str(doc.get("job", ""))), int(doc.get("parent", 0)))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("provhpc: cannot join the run from %s (%s); this process is not "
                    "captured", ATTACH_ENV, exc)
        return False
    return True


def on_shutdown(fn) -> None:
    """Call ``fn()`` at the start of ``shutdown`` (integrations flush what they hold)."""
    if fn not in _before_shutdown:
        _before_shutdown.append(fn)


def shutdown(status: str = "ok", exit_code: int = 0, error: BaseException | None = None) -> bool:
    """End capture: close open activities, flush, goodbye; idempotent."""
    global _session
    s = _session
    if s is None or s.closed or s.agent.pid != os.getpid():
        return True
    for fn in _before_shutdown[::-1]:
        try:
            fn()
        except Exception:  # an integration's failure must not lose the rank's own records
            log.exception("provhpc: a shutdown hook failed")
    _before_shutdown.clear()
    s.closed = True
    _restore_env()
    agent = s.agent
    api.fingerprint_pending(agent)  # the files of activities the C fast path ended
    agent.end_open_activities(keep=s.run_activity.id if s.run_activity is not None else 0)
    if s.run_activity is not None:
        try:
            s.run_activity.end("ok" if status == "ok" else "error", error)
        except ValueError:
            pass
    ok = agent.shutdown(status, exit_code)
    api.set_agent(None)
    if s.aggregator is not None:
        try:
            s.aggregator.wait(s.cfg.shutdown_timeout)
        except subprocess.TimeoutExpired:
            log.warning("provhpc: the aggregator of node %s is still running after %.0fs",
                        s.ident.node, s.cfg.shutdown_timeout)
    if s.ident.rank == 0:
        _write_manifest(s, None, start=False, status=status, exit_code=exit_code)
    if s.ident.is_leader and s.ready:  # nothing of the run stays in the runtime directory
        for p in (s.ready + ".failed", os.path.join(os.path.dirname(s.ready), "job")):
            with contextlib.suppress(OSError):
                os.unlink(p)
        remove_rendezvous_dirs(s.ready, s.run_id, s.ident.node)
    return ok


def _scheduler_verdict(s: Session, status: str) -> dict | None:
    """What SLURM says of a job whose rank 0 was stopped by a signal: a time limit and a
    requeue are known already, ``scancel`` and preemption only once the job is gone
    (``final`` False: the readers ask again)."""
    meta_sched = scheduler_of(os.environ)
    if status != "terminated" or meta_sched != "slurm" or not s.ident.job_id:
        return None
    from ..node.scheduler import verdict

    return verdict(s.ident.job_id, restart_count(), timeout=2.0)  # within KillWait


def current() -> Session | None:
    return _session


def _write_manifest(s: Session, meta, start: bool, status="running", exit_code=None) -> None:
    path = os.path.join(s.run_dir, "manifest.json")
    try:
        doc = {}
        if not start and os.path.exists(path):
            with open(path) as fh:
                doc = json.load(fh)
        if start:
            doc = {"run_id": s.run_id, "schema_version": R.SCHEMA_VERSION, "meta": meta,
                   "nodes": s.nodes,
                   "config": s.cfg.to_dict(), "config_sources": s.cfg.sources,
                   "identity": s.ident.to_dict(), "start": time.time_ns()}
            if s.previous_attempt:
                doc["previous_attempt"] = s.previous_attempt
        doc.update({"status": status, "exit_code": exit_code})
        if not start:
            doc["end"] = time.time_ns()
            said = _scheduler_verdict(s, status)
            if said:
                doc["scheduler"] = said
        tmp = path + ".tmp"
        fmode = run_modes(s.cfg.group_readable)[0]
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, fmode), "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, path)
        if start:
            link = os.path.join(os.path.dirname(s.run_dir), "latest")
            tmp_link = f"{link}.{os.getpid()}"
            os.symlink(s.run_id, tmp_link)
            os.replace(tmp_link, link)
    except OSError as exc:
        log.warning("provhpc: cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):  # a full disk leaves no half-written copy
            os.unlink(path + ".tmp")


attach_from_environ()  # a no-op unless this process was started below `provhpc run`
