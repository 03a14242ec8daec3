"""Helpers shared by the benchmarks: paths, interleaved timing, statistics, tables.

Every benchmark measures what it compares in the same run, interleaved
(round-robin, a fresh shuffled order each round), and reports medians with the
min..max range, so that drift of the machine hits every variant alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")


def venv_bin(name: str) -> str:
    """A tool of the project's venv (its mpiexec, provhpc, python), never one from PATH."""
    path = os.path.join(VENV_BIN, name)
    if os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(sys.executable), name)


def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def clean_env(**extra) -> dict:
    """An environment without launcher or provhpc variables from the caller, plus ``extra``."""
    strip = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "MPI_LOCAL", "PROVHPC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def machine() -> str:
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")


# ---------------------------------------------------------------------- timing
def interleave(cases: dict, rounds: int, seed: int = 1) -> dict:
    """Run each ``cases[name]()`` once per round, rounds interleaved in shuffled order.

    Each case returns one sample (a number, or a dict of numbers); the result
    maps name -> list of samples.  The garbage collector is off inside a case,
    as in ``timeit``, and collected between cases.
    """
    rng = random.Random(seed)
    samples: dict = {name: [] for name in cases}
    names = list(cases)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            gc.collect()
            gc.disable()
            try:
                samples[name].append(cases[name]())
            finally:
                gc.enable()
    return samples


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def fmt_range(values, fmt="{:.0f}") -> str:
    lo, hi = spread(values)
    return f"{fmt.format(lo)}..{fmt.format(hi)}"


def bootstrap_ci(values, stat=None, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 1) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` (default: the median).

    Resamples ``values`` with replacement; with few values (7 repetitions)
    the interval is coarse but honest: it never claims more than the spread
    of the repetitions supports.
    """
    values = list(values)
    if len(values) < 2:
        return float("nan"), float("nan")
    stat = stat or statistics.median
    rng = random.Random(seed)
    n = len(values)
    boots = sorted(stat([values[rng.randrange(n)] for _ in range(n)])
                   for _ in range(resamples))
    lo = boots[int((1 - level) / 2 * resamples)]
    hi = boots[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def table(header: list, rows: list) -> str:
    """A GitHub-flavoured markdown table (readable in a terminal too)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(r, width))) + " |"
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def dump_json(path: str | None, doc: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1, default=float)
        print(f"figures written to {path}")


# ---------------------------------------------------------------------- processes
def cpu_times_of(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def peak_rss_of(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live process, bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run(cmd: list, env: dict | None = None, cwd: str | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc


# ---------------------------------------------------------------------- one launch
def launch(script: str, script_args: list, ranks: int, workdir: str, capture: bool = True,
           nodes: int = 0, env: dict | None = None, timeout: float = 600) -> dict:
    """Run one configuration: ``mpiexec -n ranks [provhpc run --] python script``.

    ``nodes`` > 1 splits the ranks into simulated nodes (PROVHPC_SIMULATE_NODES),
    each with its own aggregator and partition.  Returns the ``BENCH`` lines of
    the ranks, the ``BENCH_AGG`` lines of the node leaders, the partitions'
    figures and the wall time of the whole launch.  (One function per launch
    so that other launchers -- srun, an emulated cluster -- can replace it.)
    """
    out = os.path.join(workdir, "prov")
    cmd = [venv_bin("mpiexec"), "-n", str(ranks)]
    if capture:
        cmd += [venv_bin("provhpc"), "run", "--out", out, "--"]
    cmd += [venv_bin("python"), os.path.join(ROOT, "benchmarks", script)] + list(script_args)
    extra = {"PROVHPC_SIMULATE_NODES": nodes} if capture and nodes > 1 else {}
    e = clean_env(**extra, **(env or {}))
    t0 = time.perf_counter()
    proc = run(cmd, env=e, cwd=workdir, timeout=timeout)
    wall = time.perf_counter() - t0
    text = proc.stdout
    res = {"wall_s": wall, "ranks": parse_lines(text, "BENCH"),
           "aggregators": parse_lines(text, "BENCH_AGG")}
    if capture:
        res["partitions"] = partition_figures(out)
    return res


def parse_lines(text: str, tag: str) -> list:
    import re

    return [json.loads(m.group(1)) for m in re.finditer(tag + r" (\{[^{}]*\})", text)]


def partition_figures(out: str) -> dict:
    """Records, drops, bytes and completeness of every partition under ``out``."""
    import glob

    import h5py

    figs = {"records": 0, "dropped": 0, "bytes": 0, "partitions": 0, "complete": 0,
            "per_rank_records": {}}
    for path in glob.glob(os.path.join(out, "*", "*.h5")):
        if os.path.islink(os.path.dirname(path)):  # the `latest` link
            continue
        with h5py.File(path, "r", locking=False) as f:
            figs["partitions"] += 1
            figs["complete"] += bool(f.attrs.get("complete", False))
            figs["records"] += f["records"].shape[0]
            figs["dropped"] += int(f["drops"]["count"].sum()) if f["drops"].shape[0] else 0
            for row in f["ranks"][:]:
                figs["per_rank_records"][int(row["rank"])] = int(row["records"])
        figs["bytes"] += os.path.getsize(path)
    return figs
