"""Run verbs: ``ls`` (the runs of a directory), ``summary`` (one run, MPI-aware) and
``watch`` (a running job, live)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .output import (
    RUN_HELP,
    UNREADABLE,
    dump,
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

        end = run.end()
        rows.append({"run_id": run.run_id, "start": iso(m.get("start") or -1),
                     "status": run.status, "end": end["state"], "cause": end.get("cause"),
                     "job": str(meta.get("job_id") or ""), "attempt": run.attempt,
                     "previous_attempt": run.previous_attempt, "nodes": len(nodes),
                     "ranks": meta.get("world_size"), "records": records,
                     "program": os.path.basename(prog), "errors": len(run.errors),
                     "_start": m.get("start") or 0})
        note_errors(run)  # named on stderr by provhpc.cli.main; the verb exits 1
        run.close()
    rows = _group_attempts(rows)
    text = [{k: ("" if v is None else v) for k, v in r.items()
             if k not in ("cause", "previous_attempt")} | {
                 "end": r["end"] + (f" ({r['cause']})" if r["cause"] else "")} for r in rows]
    emit(args, rows, format_table(text))
    return 0


def _group_attempts(rows: list[dict]) -> list[dict]:
    """The runs of one scheduler job (its steps, and its attempts: a requeued SLURM job
    keeps its id) next to each other, oldest attempt first, each group where its first
    run started."""
    by_run = {r["run_id"]: r for r in rows}

    def first(r):  # the earliest attempt reachable through previous_attempt
        seen = set()
        while r["previous_attempt"] in by_run and r["run_id"] not in seen:
            seen.add(r["run_id"])
            r = by_run[r["previous_attempt"]]
        return r

    groups: dict = {}
    for r in rows:
        root = first(r)  # the runs (steps, attempts) of one scheduler job go together
        key = ("job", root["job"]) if root["job"] else ("run", root["run_id"])
        groups.setdefault(key, []).append(r)
    out = []
    for members in sorted(groups.values(), key=lambda g: min(x["_start"] for x in g)):
        out += sorted(members, key=lambda x: (x["attempt"], x["_start"]))
    for r in out:
        del r["_start"]
    return out


def _add_ls(sub):
    p = sub.add_parser("ls", help="list the runs in a directory",
                       description="List the runs under DIR (an output directory): run id, "
                       "start, status, how it ended (and why, where the scheduler says), "
                       "job id and attempt, nodes, ranks, records, program.  The attempts "
                       "of a requeued job are listed together, oldest first.")
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


def _cmd_watch(args) -> int:
    from ..post.reader import open_path
    from ..post.watch import text

    src = open_path(args.run)
    run = single_run(src)
    if run is not src:
        print(f"run {run.run_id}: the newest of {len(src.runs)} runs in {args.run}",
              file=sys.stderr)
    try:
        if args.once:
            snap = run.snapshot()
            emit(args, snap, text(snap))
            UNREADABLE.update(snap["partition_errors"])
            return 0
        return _watch_loop(args, run, text)
    except KeyboardInterrupt:
        return 0
    finally:
        src.close()


def _watch_loop(args, run, text) -> int:
    """Refresh every --interval s until the run ends (or ^C): a rich view on a terminal,
    one plain-text (or JSON) snapshot per refresh otherwise."""
    live = None
    if sys.stdout.isatty() and not args.json:
        try:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(Text(""), console=Console(), auto_refresh=False, screen=False)
        except ImportError:  # the progress extra is not installed: plain text
            live = None

    def show(snap):
        if args.json:
            print(dump(snap), flush=True)
        elif live is not None:
            live.update(Text(text(snap)), refresh=True)
        else:
            print(text(snap) + "\n", flush=True)

    if live is not None:
        live.start()
    try:
        while True:
            snap = run.snapshot()
            if snap["status"] != "running":  # the run ended: read what its last flush
                run.refresh()                 # wrote, and leave that view on the screen
                show(run.snapshot())
                return 0
            show(snap)
            time.sleep(args.interval)
            run.refresh()
    finally:
        if live is not None:
            live.stop()


def _add_watch(sub):
    p = sub.add_parser("watch", help="a live view of a running job, from its partitions",
                       description="Follow RUN while it runs: per rank its node, stage, epoch, "
                       "step, step rate, seconds since its last record and the latest value of "
                       "each metric (LAG: behind the median step, SILENT: no record for 60 s); "
                       "job progress, drops and each node's telemetry.  It reads the "
                       "partitions only (they are consistent at every flush), so it works from "
                       "a login node on the shared file system with no connection to the job.  "
                       "Of an output directory it follows the newest run.  On a terminal the "
                       "view refreshes in place (rich, the progress extra); elsewhere one "
                       "snapshot is printed per refresh.  It ends when the run ends.",
                       epilog="examples:\n  provhpc watch prov\n"
                       "  provhpc watch prov/latest --once --json | jq '.ranks[].step'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between refreshes (default 2)")
    p.add_argument("--json", action="store_true",
                   help="print snapshots as JSON (run, status, updated, ranks: rank, node, "
                   "stage, epoch, step, metrics, records, dropped, idle_s, ...)")
    p.set_defaults(func=_cmd_watch)


VERBS = [_add_ls, _add_summary, _add_watch]
