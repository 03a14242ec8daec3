"""Post-processing subcommands: ls, query, lineage, export, report, index, recover, merge.

Each mirrors an API function, takes ``--json``, and is listed in COMMANDS
(``provhpc.cli`` adds them).  ``query`` (and ``summary``
here) divide the partitions among ranks under ``mpiexec -n N``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from . import records as R

TABLE_VERBS = ("tasks", "entities", "metrics", "attributes", "relations")
QUESTIONS = ("produced", "derivation", "epochs", "lagging", "best", "stages", "stragglers",
             "failures", "capture", "metadata", "timeline")
_HIDE = {"run"}


# ---------------------------------------------------------------------- output helpers
def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.names is None else \
            [dict(zip(obj.dtype.names, row)) for row in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, default=_jsonable)


def _rows(obj) -> list[dict]:
    if isinstance(obj, np.ndarray):
        names = obj.dtype.names
        return [dict(zip(names, row)) for row in obj.tolist()]
    return list(obj)


def format_table(rows, columns=None, limit=None, origin_ns=None) -> str:
    """Rows (dicts) as aligned text; ``*_ns``-like time columns relative to ``origin_ns``."""
    rows = _rows(rows)
    if not rows:
        return "(no rows)"
    columns = columns or [c for c in rows[0] if c not in _HIDE]
    shown = rows if limit is None else rows[:limit]
    cells = [[_cell(r.get(c), c, origin_ns) for c in columns] for r in shown]
    widths = [min(60, max(len(c), *(len(row[i]) for row in cells))) for i, c in
              enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v[:w].ljust(w) for v, w in zip(row, widths)) for row in cells]
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows (--limit)")
    return "\n".join(lines)


def _cell(v, col, origin_ns) -> str:
    if v is None:
        return ""
    if col in ("start", "end", "t") and isinstance(v, int) and origin_ns:
        return "" if v < 0 else f"{(v - origin_ns) / 1e9:.4f}"
    if col in ("index", "step") and isinstance(v, int) and v == R.NO_STEP:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _print(args, obj, text=None) -> None:
    if args.json:
        print(_dump(obj))
    else:
        print(text if text is not None else _dump(obj))


def _ranks(text):
    if text is None:
        return None
    out = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            lo, hi = part.split("-", 1)
            out += list(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def _open(path, comm=None):
    from .mpi_post import share
    from .reader import open_path

    return open_path(path, select=share(comm))


def _single(source):
    return source.latest if hasattr(source, "runs") else source


# ---------------------------------------------------------------------- ls
def _cmd_ls(args) -> int:
    from .reader import Collection, Run, _is_run_dir

    runs = [Run(args.dir)] if _is_run_dir(args.dir) else list(Collection(args.dir))
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
        from .query import iso

        rows.append({"run_id": run.run_id, "start": iso(m.get("start") or -1),
                     "status": m.get("status") or "?", "nodes": len(nodes),
                     "ranks": meta.get("world_size"), "records": records,
                     "program": os.path.basename(prog), "errors": len(run.errors)})
        run.close()
    _print(args, rows, format_table(rows))
    return 0


def _add_ls(sub):
    p = sub.add_parser("ls", help="list the runs in a directory",
                       description="List the runs under DIR (an output directory): run id, "
                       "start, status, nodes, ranks, records, program.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_ls)


# ---------------------------------------------------------------------- summary (MPI-aware)
def _cmd_summary(args) -> int:
    from .cli import format_summary
    from .mpi_post import comm_from_env
    from .reader import summary

    comm = comm_from_env()
    with _open(args.run, comm) as run:
        s = summary(_single(run), comm)
    if s is None:
        return 0
    _print(args, s, format_summary(s))
    return 1 if s["partition_errors"] else 0


def _add_summary(sub):
    p = sub.add_parser("summary", help="ranks, nodes, records by kind, drops of a run",
                       description="Summarise a run: RUN is a run directory (or an output "
                       "directory, meaning its latest run).  Under mpiexec -n N the partitions "
                       "are divided among the ranks and rank 0 prints.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_summary)


# ---------------------------------------------------------------------- query
def _cmd_query(args) -> int:
    from .mpi_post import comm_from_env

    what = args.what
    if what in TABLE_VERBS:
        comm = comm_from_env()
        return _query_table(args, comm)
    from . import questions as Q

    with _open(args.run) as src:
        run = _single(src)
        need_arg = {"produced", "derivation"}
        if what in need_arg and not args.arg:
            raise ValueError(f"query {what} needs an ENTITY (id, data path or name)")
        if what == "produced":
            res = Q.produced(src, args.arg)
            text = _format_produced(res)
        elif what == "derivation":
            res = Q.derivation(src, args.arg, args.origin)
            text = _format_derivation(res)
        elif what == "epochs":
            res = Q.epoch_metrics(run, [args.metric] if args.metric else None)
            res = res[np.isin(res["rank"], _ranks(args.rank))] if args.rank else res
            text = format_table(res, limit=args.limit)
        elif what == "lagging":
            res = Q.lagging_ranks(run, args.metric or "epoch_loss",
                                  args.mode == "max", args.threshold)
            text = format_table(res) if res else "no rank lags (tolerance " \
                f"{args.threshold:g})"
        elif what == "best":
            res = Q.best(src, args.metric or "val_accuracy", args.mode)
            text = format_table([{**r, "hyperparameters": r["hyperparameters"]} for r in res])
        elif what == "stages":
            res = Q.stage_times(run)
            res = res[np.isin(res["rank"], _ranks(args.rank))] if args.rank else res
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
            text = _dump(res)
        else:  # timeline
            res = run.timeline(_ranks(args.rank))
            text = format_table(res, ["rank", "node", "type", "name", "index", "start", "end",
                                      "duration_s", "status"], args.limit,
                                run.time_range()[0])
        errors = getattr(src, "errors", {})
    _print(args, res, text)
    for err in errors.values():
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


def _query_table(args, comm) -> int:
    from .mpi_post import gather_or_raise
    from .query import select

    filters = dict(kind=args.kind, name=args.name, rank=_ranks(args.rank), node=args.node,
                   since=args.since, until=args.until, where=args.where or (),
                   status=args.status)
    with _open(args.run, comm) as src:
        def part():
            rows = select(src, args.what, **filters)
            return np.asarray(rows), dict(getattr(src, "errors", {})), \
                _single(src).time_range()[0]

        if comm is None:
            parts = [part()]
        else:
            parts = gather_or_raise(comm, part)
            if parts is None:
                return 0
    rows = np.concatenate([p[0] for p in parts])
    errors = {k: v for p in parts for k, v in p[1].items()}
    origin = min((p[2] for p in parts if p[2]), default=0)
    if args.json:
        print(_dump({"rows": rows, "count": len(rows), "partition_errors": errors}))
    else:
        cols = args.columns.split(",") if args.columns else None
        print(format_table(rows, cols, args.limit, origin))
        print(f"{len(rows)} rows")
    for err in errors.values():
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


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
           format_table(res["partitions"], ["node", "records", "file_bytes",
                                            "file_bytes_per_record", "record_bytes",
                                            "strings", "string_heap_bytes", "sequence_gaps"]),
           "", f"records {res['records']}  file bytes/record {res['file_bytes_per_record']}  "
           f"dropped {res['dropped_total']} {res['dropped_by_reason'] or ''}"]
    return "\n".join(out)


def _add_query(sub):
    p = sub.add_parser(
        "query", help="filter tables or ask a question of a run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Query RUN (a run directory, or an output directory = its latest run; "
        "`best` and cross-run lineage use every run in the directory).\n\n"
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
        "Times: --since/--until take seconds from the run's first record or ISO-8601.\n"
        "Under mpiexec -n N, table queries divide the partitions among ranks; rank 0 prints.")
    p.add_argument("run", metavar="RUN")
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
    p.add_argument("--mode", choices=("max", "min"), default="max",
                   help="best/lagging: is a higher metric better (max) or lower (min)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="stragglers/lagging: relative slack over the median (default 0.2)")
    p.add_argument("--origin", help="derivation: only the chain to this origin entity")
    p.add_argument("--columns", help="comma-separated columns to print")
    p.add_argument("--limit", type=int, default=None, help="print at most N rows")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_query)


# ---------------------------------------------------------------------- lineage
def _cmd_lineage(args) -> int:
    from .lineage import graph, lineage

    with _open(args.run) as src:
        lin = lineage(src, args.entity, args.direction, args.depth)
        g = graph(src)
        if args.format in ("prov-json", "prov-n"):
            from .export import serialize

            print(serialize(lin.to_prov(), args.format))
            return 0
        if args.json:
            print(_dump(lin.to_dict()))
            return 0
        print(f"{args.direction} lineage of {args.entity}: {len(lin.nodes)} nodes, "
              f"{len(lin.edges)} edges, ranks {lin.ranks}, nodes {lin.hosts}")
        for n in lin.nodes.to_dicts():
            print(f"{'  ' * n['level']}[{n['level']}] {g.label(n['node'])}"
                  + (f"  {n['hash']}" if n["hash"] else "")
                  + (f"  run {n['run']}" if len(getattr(src, "runs", ())) > 1 else ""))
        print("edges:")
        for e in lin.edges.to_dicts():
            print(f"  {g.label(e['src'])} --{e['relation']}--> {g.label(e['dst'])}")
    return 0


def _add_lineage(sub):
    p = sub.add_parser("lineage", help="backward/forward closure of an entity or task",
                       description="The PROV subgraph reachable from ENTITY: backward "
                       "(what it came from: wasGeneratedBy, used, wasDerivedFrom, "
                       "wasInformedBy, hadMember) or forward (what came of it).  ENTITY is an "
                       "id (RANK:ID, or RUN/RANK:ID), a data path or key, or a task name.  RUN "
                       "may be a directory of runs: data entities with the same path and "
                       "content hash (or the same URI-like id) link the runs.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("entity", metavar="ENTITY")
    p.add_argument("--direction", choices=("backward", "forward"), default="backward")
    p.add_argument("--depth", type=int, default=None, help="at most N relations away")
    p.add_argument("--format", choices=("text", "prov-json", "prov-n"), default="text")
    p.add_argument("--json", action="store_true", help="print JSON (nodes, edges)")
    p.set_defaults(func=_cmd_lineage)


# ---------------------------------------------------------------------- export
def _cmd_export(args) -> int:
    from .export import export

    with _open(args.run) as src:
        result = export(src, args.format, args.output)
    if args.json:
        print(_dump(result))
    elif result.get("text") is not None:
        sys.stdout.write(result["text"])
        if not result["text"].endswith("\n"):
            sys.stdout.write("\n")
    else:
        print(f"wrote {', '.join(result['files'])}")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="W3C PROV (JSON, PROV-N, PROV-O) or Parquet",
                       description="Export RUN (or every run of a directory) as W3C PROV "
                       "through the prov package (prov-json, prov-n, prov-o = RDF/Turtle, "
                       "needs rdflib) or as Parquet tables through pyarrow (one file per "
                       "table in --output DIR).  PROV goes to stdout unless --output FILE.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", required=True, choices=("prov-json", "prov-n", "prov-o",
                                                       "parquet"))
    p.add_argument("--output", "-o", metavar="PATH", help="file (PROV) or directory (parquet)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_cmd_export)


# ---------------------------------------------------------------------- report
def _cmd_report(args) -> int:
    from .report import report

    with _open(args.run) as src:
        run = _single(src)
        out = args.output or f"provhpc-report-{run.run_id}"
        result = report(run, out)
    _print(args, result, f"wrote {result['html']} ({len(result['images'])} plots)")
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="a static HTML page with plots of a run",
                       description="Write OUTPUT/index.html with PNG plots: per-rank timeline "
                       "of tasks, stages and epochs; metric curves per rank; records and drops "
                       "per rank; plus the summary and capture statistics.  Needs matplotlib.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="output directory (default ./provhpc-report-<run_id>)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_cmd_report)


# ---------------------------------------------------------------------- index
def _cmd_index(args) -> int:
    import time

    from .index import build
    from .reader import Collection, open_path

    src = open_path(args.run)
    runs = src.runs if isinstance(src, Collection) else [src]
    out = []
    for run in runs:
        t0 = time.perf_counter()
        path = build(run.path)
        out.append({"run_id": run.run_id, "path": path, "bytes": os.path.getsize(path),
                    "seconds": round(time.perf_counter() - t0, 3)})
        run.close()
    _print(args, {"runs": out}, "\n".join(
        f"{r['path']}: {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f} s" for r in out))
    return 0


def _add_index(sub):
    p = sub.add_parser("index", help="store a finished run's tables and lineage graph for "
                       "fast queries",
                       description="Decode every partition of RUN once and write its tables "
                       "and lineage graph to RUN/index.hdf5, column by column.  Later queries "
                       "(provhpc.open, summary aside) read only the columns they need from it "
                       "instead of decoding the whole run: at 10 M records a fresh process "
                       "answers in well under a second instead of tens of seconds.  The index "
                       "is used only while the partitions are unchanged (a recover, merge or "
                       "growing partition makes it stale; it is then ignored, with a warning, "
                       "until you index again).  RUN must be finished: every partition "
                       "complete (run `provhpc recover` first after a crash).  A directory of "
                       "runs indexes each of them.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_index)


# ---------------------------------------------------------------------- recover
def _cmd_recover(args) -> int:
    from .recover import recover

    res = recover(args.run)
    _print(args, res, "\n".join(f"{k}: {v}" for k, v in res.items()))
    return 0


def _add_recover(sub):
    p = sub.add_parser("recover", help="repair partitions left by killed aggregators",
                       description="Repair the partitions of RUN left by a killed aggregator "
                       "(so they open and are marked) and salvage records left in shared-memory "
                       "segments of dead ranks.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_recover)


# ---------------------------------------------------------------------- merge
def _cmd_merge(args) -> int:
    from .merge import merge

    res = merge(args.sources, args.out, overwrite=args.force)
    _print(args, res, "\n".join(f"{r['run_id']}: {r['partitions']} partitions, {r['records']} "
                                f"records -> {r['path']}" for r in res["runs"]))
    return 0


def _add_merge(sub):
    p = sub.add_parser("merge", help="compact runs into one partition each, in one directory",
                       description="Merge SOURCE runs (run directories or output directories "
                       "of runs) into OUT: each run becomes OUT/<run_id>/merged.h5, one "
                       "partition holding every node's records (strings remapped, rank tables, "
                       "drops and counters kept; each record's node comes from its rank), plus "
                       "its manifest.  Use it to compact a many-node run into one file, or to "
                       "gather runs from several output directories into one collection for "
                       "cross-run queries.  Sources are not modified.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="OUT", help="destination directory")
    p.add_argument("--force", action="store_true", help="replace OUT/<run_id> if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_merge)


def _friendly(handler):
    """Missing optional packages and failed MPI shares end with one clear line, exit 2."""
    def run(args):
        try:
            return handler(args)
        except ImportError as exc:
            print(f"provhpc {args.command}: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # RankFailed: names the rank and its error
            print(f"provhpc {args.command}: {exc}", file=sys.stderr)
            return 1
    run.__name__ = handler.__name__
    return run


def _wrap(add):
    def add_wrapped(sub):
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            p = sub.choices[name]
            p.set_defaults(func=_friendly(p.get_default("func")))
    add_wrapped.__name__ = add.__name__
    return add_wrapped


COMMANDS = [_add_ls, _add_summary, _add_query, _add_lineage, _add_export, _add_report,
            _add_index, _add_recover, _add_merge]
COMMANDS = [_wrap(add) for add in COMMANDS]
