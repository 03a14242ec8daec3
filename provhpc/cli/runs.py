"""Run verbs: ``ls`` (the runs of a directory) and ``summary`` (one run, MPI-aware)."""

from __future__ import annotations

import argparse
import os

from .output import (
    RUN_HELP,
    UNREADABLE,
    emit,
    format_summary,
    format_table,
    note_errors,
    open_source,
    single_run,
)

__all__ = ["VERBS"]


def _cmd_ls(args) -> int:
    from ..post.reader import Collection, Run, is_run_dir

    runs = [Run(args.dir)] if is_run_dir(args.dir) else list(Collection(args.dir))
    rows = []
    for run in runs:
        m = run.manifest
        meta = m.get("meta") or {}
        argv = meta.get("argv") or []
        prog = next((a for a in argv[1:] if a.endswith(".py")), argv[0] if argv else "")
        nodes = [os.path.basename(p)[:-3] for p in run.partition_paths]
        records = 0
        for p in run.partitions:
            records += len(p)
        from ..post.query import iso

        rows.append({"run_id": run.run_id, "start": iso(m.get("start") or -1),
                     "status": run.status, "nodes": len(nodes),
                     "ranks": meta.get("world_size"), "records": records,
                     "program": os.path.basename(prog), "errors": len(run.errors)})
        note_errors(run)  # named on stderr by provhpc.cli.main; the verb exits 1
        run.close()
    emit(args, rows, format_table(rows))
    return 0


def _add_ls(sub):
    p = sub.add_parser("ls", help="list the runs in a directory",
                       description="List the runs under DIR (an output directory): run id, "
                       "start, status, nodes, ranks, records, program.")
    p.add_argument("dir", metavar="DIR", help="an output directory of runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_ls)


def _cmd_summary(args) -> int:
    from ..post.mpi_post import comm_from_env
    from ..post.reader import summary

    comm = comm_from_env()
    with open_source(args.run, comm) as run:
        s = summary(single_run(run), comm)
    if s is None:
        return 0
    s["partial"] = bool(s["partition_errors"])
    s["missing_partitions"] = sorted(s["partition_errors"])
    emit(args, s, format_summary(s))
    UNREADABLE.update(s["partition_errors"])  # (gathered from every rank under MPI)
    # each named on stderr by provhpc.cli.main; --partial accepts a partial answer
    return 1 if s["partition_errors"] and not args.partial else 0


def _add_summary(sub):
    p = sub.add_parser("summary", help="ranks, nodes, records by kind, drops of a run",
                       description="Summarise a run: RUN is a run directory (or an output "
                       "directory, meaning its newest run).  Under mpiexec -n N the partitions "
                       "are divided among the ranks and rank 0 prints.  A partition that cannot "
                       "be read is named on stderr and in the summary, and the exit status is "
                       "1 unless --partial.",
                       epilog="examples:\n  provhpc summary prov/latest\n"
                       "  mpiexec -n 4 provhpc summary prov/latest --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--json", action="store_true",
                   help="print JSON (with partial and missing_partitions)")
    p.add_argument("--partial", action="store_true",
                   help="a summary of the readable partitions is an answer: exit 0 when some "
                   "cannot be read (they are still named)")
    p.set_defaults(func=_cmd_summary)


VERBS = [_add_ls, _add_summary]
