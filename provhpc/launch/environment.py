"""Environment provenance: what ran, with what, where — without leaking secrets.

``collect(argv)`` returns a JSON-able dict written into the run metadata
(``manifest.json`` and each partition's ``meta`` attribute): the Python
version, the versions of selected packages (read from their installed
metadata, nothing is imported), the git commit and dirty state of the
script's repository, the command line, the SLURM job and the host.

Redaction rules (this docstring is the reference):

* No environment dump.  Only variables on an allow-list are copied at all
  (``ALLOWED_ENV`` names and ``ALLOWED_ENV_PREFIXES``).
* A name that matches ``SECRET_NAME`` (TOKEN, SECRET, PASSWORD, PASSWD, PWD,
  KEY, CREDENTIAL, AUTH, COOKIE, SESSION, PRIVATE, SIGNATURE, CERT) keeps its
  name but its value becomes ``"<redacted>"`` — in the environment and in the
  command line (``--api-key X``, ``--token=X``, ``password=X``).
* User information in URLs (``https://user:pass@host``) becomes
  ``https://<redacted>@host`` wherever it appears (command line, git remote,
  allowed variables).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys

__all__ = [
    "ALLOWED_ENV", "ALLOWED_ENV_PREFIXES", "GIT_TIMEOUT", "PACKAGES", "REDACTED", "SECRET_NAME",
    "SLURM_FIELDS", "allowed_env", "collect", "git_info", "is_secret", "package_versions",
    "redact_argv", "redact_url", "redact_value", "slurm_info"
]

REDACTED = "<redacted>"

SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(?:OR)?D|(?:^|[^A-Z])PWD|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|"
    r"SIGNATURE|CERT", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")

PACKAGES = ("provhpc", "numpy", "h5py", "pyzmq", "mpi4py", "torch", "torchvision", "scipy",
            "pandas", "pyarrow", "scikit-learn", "nvidia-ml-py", "psutil", "mpich")

ALLOWED_ENV = frozenset((
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "HOSTNAME", "VIRTUAL_ENV", "CONDA_DEFAULT_ENV", "CONDA_PREFIX",
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID", "PBS_JOBID", "PBS_JOBNAME", "LSB_JOBID", "LSB_JOBNAME",
))
ALLOWED_ENV_PREFIXES = (
    "SLURM_JOB_", "SLURM_STEP_", "SLURM_CLUSTER_NAME", "SLURM_NNODES", "SLURM_NTASKS",
    "SLURM_NODELIST", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_CPUS_",
    "SLURM_GPUS", "SLURM_TASKS_PER_NODE", "SLURM_SUBMIT_HOST", "SLURM_SUBMIT_DIR",
    "SLURM_ARRAY_", "SLURM_RESTART_COUNT", "SLURMD_NODENAME", "NCCL_", "TORCH_DISTRIBUTED_",
    "PROVHPC_",
)
# SLURM job information that goes into its own section (the rest stays under "env").
SLURM_FIELDS = {"SLURM_JOB_ID": "job_id", "SLURM_JOB_NAME": "job_name",
                "SLURM_JOB_PARTITION": "partition", "SLURM_JOB_ACCOUNT": "account",
                "SLURM_JOB_QOS": "qos", "SLURM_CLUSTER_NAME": "cluster",
                "SLURM_JOB_NODELIST": "nodelist", "SLURM_JOB_NUM_NODES": "nodes",
                "SLURM_NTASKS": "ntasks", "SLURM_STEP_ID": "step_id",
                "SLURM_ARRAY_JOB_ID": "array_job_id", "SLURM_ARRAY_TASK_ID": "array_task_id",
                "SLURM_SUBMIT_HOST": "submit_host", "SLURM_RESTART_COUNT": "restart_count"}

GIT_TIMEOUT = 2.0


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact_url(text: str) -> str:
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact_value(name: str, value: str) -> str:
    return REDACTED if is_secret(name) else redact_url(value)


def redact_argv(argv) -> list:
    """The command line with values of secret-named options (and URL credentials) removed."""
    out, hide_next = [], False
    for arg in map(str, argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and "=" not in arg:
            hide_next = is_secret(arg.lstrip("-"))
            out.append(arg)
            continue
        key, sep, value = arg.partition("=")
        if sep and is_secret(key):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(redact_url(arg))
    return out


def allowed_env(environ=None) -> dict:
    """The allow-listed variables, secret-named values redacted."""
    environ = os.environ if environ is None else environ
    return {k: redact_value(k, v) for k, v in sorted(environ.items())
            if k in ALLOWED_ENV or k.startswith(ALLOWED_ENV_PREFIXES)}


def package_versions(names=PACKAGES) -> dict:
    """Installed versions from package metadata (no imports; missing ones are left out)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken dist-info must not stop a run
            continue
    return out


def _script_path(argv) -> str:
    for arg in argv or ():
        if str(arg).endswith(".py") and os.path.isfile(arg):
            return os.path.abspath(arg)
    return ""


def _git(args, cwd):
    try:
        p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                           timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_info(path: str) -> dict:
    """Commit, branch, dirty state and remote of the repository holding ``path``."""
    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    top = _git(["rev-parse", "--show-toplevel"], d)
    if not top:
        return {}
    info = {"root": top, "commit": _git(["rev-parse", "HEAD"], top) or ""}
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], top)
    if branch:
        info["branch"] = branch
    status = _git(["status", "--porcelain", "--untracked-files=no"], top)
    info["dirty"] = bool(status) if status is not None else None
    if status:  # the files with uncommitted changes (porcelain: "XY path"), at most 50
        changed = [ln.split(maxsplit=1)[-1] for ln in status.splitlines() if ln.strip()]
        info["changed"] = sorted(c.split(" -> ")[-1] for c in changed)[:50]
    remote = _git(["config", "--get", "remote.origin.url"], top)
    if remote:
        info["remote"] = redact_url(remote)
    return info


def slurm_info(environ) -> dict:
    return {field: environ[var] for var, field in SLURM_FIELDS.items() if environ.get(var)}


def collect(argv=None, environ=None) -> dict:
    """The environment provenance of this process (see the module docstring for the rules)."""
    environ = os.environ if environ is None else environ
    argv = list(sys.argv if argv is None else argv)
    script = _script_path(argv)
    doc = {
        "python": {"version": sys.version.split()[0],
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine()},
        "host": socket.gethostname(),
        "packages": package_versions(),
        "command": redact_argv(argv),
        "env": allowed_env(environ),
    }
    if script:
        doc["script"] = script
    git = git_info(script or os.getcwd())
    if git:
        doc["git"] = git
    slurm = slurm_info(environ)
    if slurm:
        doc["slurm"] = slurm
    return doc
