"""Question verbs: ``query`` (tables and named questions, MPI-aware) and ``lineage``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from .output import (
    ABSOLUTE,
    RUN_HELP,
    UNREADABLE,
    dump,
    emit,
    format_table,
    open_source,
    parse_ranks,
    require_all,
    rows_of,
    single_run,
)


def note_errors_of(errors: dict) -> None:
    """What the ranks of an MPI query could not read (gathered on rank 0)."""
    UNREADABLE.update(errors)

__all__ = ["QUESTIONS", "TABLE_VERBS", "VERBS"]

TABLE_VERBS = ("tasks", "entities", "metrics", "attributes", "relations")
QUESTIONS = ("produced", "derivation", "epochs", "lagging", "best", "stages", "stragglers",
             "failures", "capture", "metadata", "timeline")


CROSS_RUN = ("produced", "derivation", "best")  # a directory means all of its runs
ROW_QUESTIONS = ("epochs", "lagging", "stages", "stragglers", "failures", "timeline")
TIME_COLUMN = {"tasks": "start"}  # the others' time is "t"


def _runs_of(src) -> list:
    return list(src.runs) if hasattr(src, "runs") else [src]


def _scope(args, src):
    """What a single-run verb reads of ``src``: its newest run unless ``--all-runs``.  A
    directory of several runs is named in the output: which run answered, or that all did."""
    runs = _runs_of(src)
    if len(runs) < 2 and not hasattr(src, "runs"):
        return src, []
    if args.all_runs:
        return src, runs
    run = single_run(src)
    note = (f"run {run.run_id}: the only run in {args.run}" if len(runs) == 1 else
            f"run {run.run_id}: the newest of {len(runs)} runs in {args.run} "
            "(--all-runs answers for every run)")
    print(note, file=sys.stderr if args.json else sys.stdout)
    return run, [run]


def _origin(args, runs_start: dict, fallback: int):
    if args.absolute:
        return ABSOLUTE
    return runs_start if args.all_runs else fallback


def _cmd_query(args) -> int:
    from ..post.mpi_post import comm_from_env

    what = args.what
    if what in TABLE_VERBS:
        comm = comm_from_env()
        return _query_table(args, comm)
    if args.all_runs and what in CROSS_RUN:
        raise ValueError(f"query {what} already reads every run of a directory; "
                         "--all-runs is for the single-run questions and the tables")
    with open_source(args.run) as src:
        if what in CROSS_RUN:
            res, text = _answer(args, src, src)
        elif args.all_runs:
            res, text = _answer_all(args, _runs_of(src))
        else:
            run, _ = _scope(args, src)
            res, text = _answer(args, src, run)
        errors = dict(getattr(src, "errors", {}))
    if isinstance(res, dict):
        res = {**res, "partial": bool(errors), "missing_partitions": sorted(errors)}
    if errors and not args.json:
        text = f"partial: {len(errors)} partition(s) could not be read\n{text}"
    emit(args, res, text)
    # each unreadable partition is named on stderr by provhpc.cli.main
    return 1 if errors and not args.partial else 0


def _answer_all(args, runs) -> tuple[Any, str]:
    """A single-run question over every run: one table of rows with their run, or one
    answer per run (capture, metadata)."""
    if args.what in ROW_QUESTIONS:
        rows, origins = [], {}
        for run in runs:
            res, _ = _answer(args, run, run)
            rows += [{"run": run.run_id, **r} for r in rows_of(res)]
            origins[run.run_id] = run.time_range()[0]
        text = format_table(rows, limit=args.limit, origin_ns=_origin(args, origins, 0),
                            all_runs=True) if rows else "(no rows)"
        return rows, text
    answers = [{"run": run.run_id, **_answer(args, run, run)[0]} for run in runs]
    texts = [f"== run {run.run_id}\n{_answer(args, run, run)[1]}" for run in runs]
    return answers, "\n\n".join(texts)


def _answer(args, src, run) -> tuple[Any, str]:
    """One question of ``run`` (or of every run of ``src`` for the cross-run ones)."""
    from ..post import questions as Q

    what = args.what
    res: Any  # what the question returns: a table, a list of rows or a dict
    if what in ("produced", "derivation") and not args.arg:
        raise ValueError(f"query {what} needs an ENTITY (id, data path or name)")
    if what == "produced":
        res = Q.produced(src, args.arg)
        text = _format_produced(res)
    elif what == "derivation":
        res = Q.derivation(src, args.arg, args.origin)
        text = _format_derivation(res)
    elif what == "epochs":
        res = Q.epoch_metrics(run, [args.metric] if args.metric else None)
        res = res[np.isin(res["rank"], parse_ranks(args.rank))] if args.rank else res
        text = format_table(res, limit=args.limit)
    elif what == "lagging":
        # a loss by default: lower is better unless --mode max says otherwise
        res = Q.lagging_ranks(run, args.metric or "epoch_loss",
                              args.mode == "max", args.threshold)
        text = format_table(res) if res else "no rank lags (tolerance " \
            f"{args.threshold:g})"
    elif what == "best":
        res = Q.best(src, args.metric or "val_accuracy", args.mode or "max")
        keys = list(res[0]["varying"]) if res else []
        text = format_table([{"run": r["run"], r["metric"]: r["value"], "epoch": r["epoch"],
                              "step": r["step"], "rank": r["rank"], **r["varying"]}
                             for r in res], all_runs=True) + (
            "\n(the hyperparameters that differ between the runs; --json has them all)"
            if keys else "")
    elif what == "stages":
        res = Q.stage_times(run)
        res = res[np.isin(res["rank"], parse_ranks(args.rank))] if args.rank else res
        text = format_table(res, limit=args.limit)
    elif what == "stragglers":
        res = Q.stragglers(run, args.threshold)
        text = format_table(res, limit=args.limit) if res else "no stragglers"
    elif what == "failures":
        res = Q.failures(run)
        text = format_table(res) if res else "no failed activities"
    elif what == "capture":
        res = Q.capture_stats(run)
        text = _format_capture(res)
    elif what == "metadata":
        res = run.metadata()
        text = dump(res)
    else:  # timeline
        res = run.timeline(parse_ranks(args.rank))
        text = format_table(res, ["rank", "node", "type", "name", "index", "start", "end",
                                  "duration_s", "status"], args.limit,
                            ABSOLUTE if args.absolute else run.time_range()[0])
    return res, text


def _query_table(args, comm) -> int:
    from ..post.mpi_post import gather_or_raise
    from ..post.query import select

    filters = dict(kind=args.kind, name=args.name, rank=parse_ranks(args.rank), node=args.node,
                   since=args.since, until=args.until, where=args.where or (),
                   status=args.status)
    with open_source(args.run, comm) as src:
        scope, runs = _scope(args, src) if comm is None or comm.rank == 0 else \
            (src if args.all_runs else single_run(src), [])
        def part():
            rows = select(scope, args.what, **filters)
            return (np.asarray(rows), dict(getattr(scope, "errors", {})),
                    {r.run_id: r.time_range()[0] for r in _runs_of(scope)})

        if comm is None:
            parts = [part()]
        else:
            parts = gather_or_raise(comm, part)
            if parts is None:
                return 0
        order = {r.run_id: i for i, r in enumerate(_runs_of(src))}
    rows = np.concatenate([p[0] for p in parts])
    errors = {k: v for p in parts for k, v in p[1].items()}
    starts: dict = {}
    for p in parts:
        for run_id, t0 in p[2].items():
            if t0:
                starts[run_id] = min(t0, starts.get(run_id, t0))
    if len(rows):  # by run (oldest first), then rank, then time
        run_pos = np.array([order.get(r, -1) for r in rows["run"].tolist()])
        rows = rows[np.lexsort((rows[TIME_COLUMN.get(args.what, "t")], rows["rank"],
                                run_pos))]
    ids = sorted({str(r) for r in rows["run"].tolist()}, key=lambda r: order.get(r, -1))
    if args.json:
        print(dump({"rows": rows, "count": len(rows), "runs": ids or
                    [r.run_id for r in runs], "partial": bool(errors),
                    "missing_partitions": sorted(errors), "partition_errors": errors}))
    else:
        cols = args.columns.split(",") if args.columns else None
        names = rows.dtype.names or ()
        bad = [c for c in cols or () if c not in names]
        if bad:
            raise ValueError(f"--columns: no column {', '.join(map(repr, bad))} in "
                             f"{args.what}; its columns: {', '.join(names)}")
        origin = _origin(args, starts, min(starts.values(), default=0))
        if errors:
            print(f"partial: {len(errors)} partition(s) could not be read")
        print(format_table(rows, cols, args.limit, origin, all_runs=args.all_runs))
        print(f"{len(rows)} rows")
    note_errors_of(errors)
    return 1 if errors and not args.partial else 0


def _format_produced(res) -> str:
    t = res["target"]
    lines = [f"{t['kind']} {t['key']}  (run {t['run']}{', ' + t['hash'] if t['hash'] else ''})",
             f"produced on ranks {res['ranks']} on nodes {res['nodes']}", "", "hyperparameters:"]
    for h in res["hyperparameters"]:
        lines.append(f"  {h['key']} ({h['id']}): "
                     + ", ".join(f"{k}={v}" for k, v in h["values"].items()))
    lines.append("data:")
    for d in res["data"]:
        lines.append(f"  {'  ' * (d['level'] - 1)}{d['kind']:<10} {d['key']}"
                     + (f"  {d['hash']}" if d.get("hash") else ""))
    lines.append("code:")
    for c in res["code"]:
        if "program" in c:
            lines.append(f"  {' '.join(c['argv'])}  (cwd {c['cwd']})")
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in c["versions"].items()))
        else:
            lines.append(f"  {c['kind']} {c['key']}")
    if res["parameters"]:
        lines.append("activity parameters:")
        for name, p in res["parameters"].items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    lines.append("activities:")
    for a in res["activities"]:
        lines.append(f"  {a['type']:<6} {a['name']:<16} rank {a['rank']} node {a['node']} "
                     f"({a['id']})")
    return "\n".join(lines)


def _format_derivation(res) -> str:
    lines = [f"{res['target']}: backward closure of {res['closure_nodes']} nodes, "
             f"{res['closure_edges']} edges"]
    for chain in res["chains"]:
        if not chain:
            continue
        lines.append("")
        lines.append(f"  {chain[0]['from']}")
        for step in chain:
            lines.append(f"    --{step['relation']}--> {step['to']}")
    return "\n".join(lines)


def _format_capture(res) -> str:
    out = [format_table(res["ranks"], ["rank", "pid", "role", "node", "records", "seconds",
                                       "records_per_s", "dropped", "salvaged", "drops"]), "",
           format_table(res["partitions"], ["node", "records", "telemetry_records", "file_bytes",
                                            "file_bytes_per_record", "record_bytes",
                                            "strings", "string_heap_bytes", "sequence_gaps"]),
           "", f"records {res['records']}  file bytes/record {res['file_bytes_per_record']}  "
           f"dropped {res['dropped_total']} {res['dropped_by_reason'] or ''}"]
    return "\n".join(out)


def _add_query(sub):
    p = sub.add_parser(
        "query", help="filter tables or ask a question of a run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Query RUN: a run directory, or an output directory of runs.  Of a "
        "directory, tables and single-run questions answer for its newest run and say which "
        "(--all-runs: every run, each row with its run); produced, derivation and best read "
        "every run in it.\n\n"
        "Tables (filtered by --kind --name --rank --node --since --until --where --status):\n"
        "  tasks       activities: run, stages, epochs, tasks (start/end/duration/status)\n"
        "  entities    data, hyperparameters, checkpoints (key, kind, content hash)\n"
        "  metrics     metric points (name, step, time, value)\n"
        "  attributes  typed key/values (role attribute|parameter|generated)\n"
        "  relations   used, wasGeneratedBy, wasDerivedFrom, wasInformedBy, hadMember\n"
        "Questions:\n"
        "  produced ENTITY    hyperparameters, data, code, ranks and nodes behind ENTITY\n"
        "  derivation ENTITY  derivation chains from the raw inputs to ENTITY\n"
        "  epochs             per-epoch metrics per rank (--metric NAME)\n"
        "  lagging            ranks whose last-epoch --metric is worse than the median\n"
        "  best               per run, best --metric (--mode max|min) and its hyperparameters\n"
        "  stages             wall time per stage and epoch per rank\n"
        "  stragglers         ranks slower than the median by more than --threshold\n"
        "  failures           failed tasks: rank, node, exception, last inputs\n"
        "  capture            records/s per rank, bytes per record, drops and reasons\n"
        "  metadata           job, launcher, nodes, ranks, configuration, versions\n"
        "  timeline           activities per rank in start order\n\n"
        "--where KEY OP VALUE (OP: == != > >= < <= ~glob) compares a column, or else the "
        "attribute KEY of the row's task/entity: --where lr>=0.01 --where status=error.\n"
        "Times: --since/--until take seconds from the run's first record or ISO-8601.  "
        "Printed times are seconds from the first record of each row's own run "
        "(--absolute: UTC ISO-8601); rows are sorted by run, rank, then time.\n"
        "Under mpiexec -n N, table queries divide the partitions among ranks; rank 0 prints.")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("what", nargs="?", default="tasks", choices=TABLE_VERBS + QUESTIONS,
                   metavar="WHAT", help="a table or a question (default tasks)")
    p.add_argument("arg", nargs="?", metavar="ENTITY", help="for produced / derivation")
    p.add_argument("--kind", action="append", help="activity type / entity kind / role (glob)")
    p.add_argument("--name", action="append", help="name or key (glob, repeatable)")
    p.add_argument("--rank", help="ranks: 0,2,4-7")
    p.add_argument("--node", action="append", help="node name (glob)")
    p.add_argument("--status", action="append", help="tasks: ok|error|killed|open")
    p.add_argument("--since", help="seconds from the run start, or ISO-8601")
    p.add_argument("--until", help="seconds from the run start, or ISO-8601")
    p.add_argument("--where", action="append", metavar="KEY OP VALUE",
                   help="column or attribute comparison (repeatable, all must hold)")
    p.add_argument("--metric", help="metric name (epochs, lagging, best)")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="best/lagging: is a higher metric better (max) or lower (min); "
                        "default max for best (an accuracy), min for lagging (a loss)")
    p.add_argument("--max", dest="mode", action="store_const", const="max",
                   help="the same as --mode max")
    p.add_argument("--min", dest="mode", action="store_const", const="min",
                   help="the same as --mode min")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="stragglers/lagging: relative slack over the median (default 0.2)")
    p.add_argument("--origin", help="derivation: only the chain to this origin entity")
    p.add_argument("--all-runs", action="store_true",
                   help="of a directory of runs, answer for every run (a run column), not "
                   "only the newest")
    p.add_argument("--absolute", action="store_true",
                   help="print times as UTC ISO-8601 instead of seconds from the run start")
    p.add_argument("--columns", help="comma-separated columns to print")
    p.add_argument("--limit", type=int, default=None, help="print at most N rows")
    p.add_argument("--json", action="store_true",
                   help="print JSON (tables and dict answers carry partial and "
                   "missing_partitions)")
    p.add_argument("--partial", action="store_true",
                   help="an answer from the readable partitions is an answer: exit 0 when "
                   "some cannot be read (they are still named on stderr)")
    p.set_defaults(func=_cmd_query)


def _cmd_lineage(args) -> int:
    from ..post.lineage import graph, lineage

    with open_source(args.run) as src:
        missing = require_all(src, args.partial)  # a closure missing a node is not one
        lin = lineage(src, args.entity, args.direction, args.depth)
        g = graph(src)
        if args.format in ("prov-json", "prov-n"):
            from ..post.export import serialize

            print(serialize(lin.to_prov(), args.format))
            return 0
        joins = []
        if args.explain:  # every entity of the closure that joins records of several runs
            for n in lin.nodes.to_dicts():
                if n["type"] == "entity":
                    why = g.explain(n["node"])
                    if len(why["runs"]) > 1:
                        joins.append({**why, "name": n["name"]})
        if args.json:
            print(dump({**lin.to_dict(), "partial": bool(missing),
                        "missing_partitions": missing,
                        **({"joins": joins} if args.explain else {})}))
            return 0
        if missing:
            print(f"partial: {len(missing)} partition(s) could not be read: "
                  + ", ".join(missing))
        print(f"{args.direction} lineage of {args.entity}: {len(lin.nodes)} nodes, "
              f"{len(lin.edges)} edges, ranks {lin.ranks}, nodes {lin.hosts}")
        for n in lin.nodes.to_dicts():
            print(f"{'  ' * n['level']}[{n['level']}] {g.label(n['node'])}"
                  + (f"  {n['hash']}" if n["hash"] else "")
                  + (f"  run {n['run']}" if len(getattr(src, "runs", ())) > 1 else ""))
        print("edges:")
        for e in lin.edges.to_dicts():
            print(f"  {g.label(e['src'])} --{e['relation']}--> {g.label(e['dst'])}")
        if args.explain:
            print("joins across runs:" if joins else "joins across runs: none")
            for j in joins:
                print(f"  {j['name']}: one entity in runs {', '.join(j['runs'])}: "
                      f"{j['rule']}")
    return 0


def _add_lineage(sub):
    p = sub.add_parser("lineage", help="backward/forward closure of an entity or task",
                       description="The PROV subgraph reachable from ENTITY: backward "
                       "(what it came from: wasGeneratedBy, used, wasDerivedFrom, "
                       "wasInformedBy, hadMember) or forward (what came of it).  ENTITY is an "
                       "id (RANK:ID, or RUN/RANK:ID), a data path or key, or a task name.  RUN "
                       "may be a directory of runs: data entities with the same path and "
                       "content hash (or the same URI-like id) link the runs.")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("entity", metavar="ENTITY",
                   help="an id (RANK:ID or RUN/RANK:ID), a data path or key, or a task name")
    p.add_argument("--direction", choices=("backward", "forward"), default="backward",
                   help="backward: what ENTITY came from (default); forward: what came of it")
    p.add_argument("--depth", type=int, default=None, help="at most N relations away")
    p.add_argument("--format", choices=("text", "prov-json", "prov-n"), default="text",
                   help="text (default), or the closure as a PROV document")
    p.add_argument("--json", action="store_true", help="print JSON (nodes, edges)")
    p.add_argument("--partial", action="store_true",
                   help="answer from the readable partitions when some cannot be read, "
                   "marked as partial, instead of refusing")
    p.add_argument("--explain", action="store_true",
                   help="say, for each entity that joins records of several runs, why they "
                   "are one (content hash, path+size+mtime, URI-like id, code commit)")
    p.set_defaults(func=_cmd_lineage)


def _cmd_compare(args) -> int:
    from ..post.compare import MEASURED, compare
    from ..post.reader import open_path

    sources = [open_path(p) for p in args.runs]
    try:
        runs = [r for src in sources for r in _runs_of(src)]
        res = compare(runs, everything=args.all)
        if args.json:
            print(dump(res))
            return 0
        ids = res["runs"]
        print("compare " + "  ".join(f"[{i}] {r}" for i, r in enumerate(ids)))
        print(f"{res['differences']} difference(s)" + ("" if args.all else
                                                       " (--all shows what is the same)"))
        for name, rows in res["sections"].items():
            if not rows:
                continue
            print(f"\n{name}" + ("  (measured: always shown)" if name in MEASURED else ""))
            table = []
            for row in rows:
                cells = {"": "*" if row["differs"] and name not in MEASURED else "",
                         "key": row["key"]}
                for i, v in enumerate(row["values"]):
                    text = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
                    if row.get("vs_first") and i:
                        text += f"  ({row['vs_first'][i]})"
                    cells[f"[{i}]"] = text
                table.append(cells)
            print(format_table(table))
    finally:
        for src in sources:
            src.close()
    return 0


def _add_compare(sub):
    p = sub.add_parser("compare", help="what differs between runs",
                       description="Compare two runs or more (or every run of a directory): "
                       "hyperparameters, configuration, code (commit, dirty state, changed "
                       "files), environment (Python, packages), launcher, nodes and ranks, "
                       "input data (same, changed or new by identity: path and content hash), "
                       "how each run ended; then the wall time per stage and the final and best "
                       "value of each metric, always.  Only what differs is shown unless "
                       "--all; * marks a difference.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories, or output directories (each of their runs)")
    p.add_argument("--all", action="store_true", help="show what is the same too")
    p.add_argument("--json", action="store_true", help="print JSON (sections of rows: key, "
                   "values per run, differs)")
    p.set_defaults(func=_cmd_compare)


VERBS = [_add_query, _add_lineage, _add_compare]
