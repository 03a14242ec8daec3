"""Output verbs: ``export`` (PROV, Parquet, ...) and ``report`` (an HTML page)."""

from __future__ import annotations

import sys

from .output import dump, emit, open_source, require_all, single_run

__all__ = ["VERBS"]


def _cmd_export(args) -> int:
    from ..post.export import export

    with open_source(args.run) as src:
        missing = require_all(src, args.partial)  # never a document that silently lacks a node
        result = export(src, args.format, args.output, missing)
    if args.json:
        print(dump(result))
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
    p.add_argument("--partial", action="store_true",
                   help="export the readable partitions when some cannot be read, marked as "
                   "partial (entity provhpc:export), instead of writing nothing")
    p.set_defaults(func=_cmd_export)


def _cmd_report(args) -> int:
    from ..post.report import report

    with open_source(args.run) as src:
        run = single_run(src)
        missing = require_all(run, args.partial)
        out = args.output or f"provhpc-report-{run.run_id}"
        result = report(run, out, missing=missing)
    note = "" if run is src else f", the newest of {len(src.runs)} in {args.run}"
    emit(args, result, f"wrote {result['html']} ({len(result['images'])} plots) of run "
                       f"{run.run_id}{note}")
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
    p.add_argument("--partial", action="store_true",
                   help="report on the readable partitions when some cannot be read (the "
                   "page names the missing ones) instead of writing nothing")
    p.set_defaults(func=_cmd_report)


VERBS = [_add_export, _add_report]
