"""Output verbs: ``export`` (PROV, Parquet, ...) and ``report`` (an HTML page)."""

from __future__ import annotations

import argparse
import sys

from .output import RUN_HELP, dump, emit, open_source, require_all, single_run

__all__ = ["VERBS"]


def _cmd_export(args) -> int:
    from ..post.export import export

    with open_source(args.run) as src:
        missing = require_all(src, args.partial)  # never a document that silently lacks a node
        result = export(src, args.format, args.output, missing, args.with_files)
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
                       "needs rdflib), as Parquet tables through pyarrow (one file per "
                       "table in --output DIR), or as a Workflow Run RO-Crate through rocrate "
                       "(Process Run Crate profile; --output DIR).  PROV goes to stdout unless "
                       "--output FILE.")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--format", required=True, help="prov-json, prov-n, prov-o (RDF/Turtle), "
                   "parquet, or ro-crate (a Process Run Crate in --output DIR)",
                   choices=("prov-json", "prov-n", "prov-o", "parquet", "ro-crate"))
    p.add_argument("--with-files", action="store_true",
                   help="ro-crate: copy the used and generated files into the crate (default: "
                   "they stay where they are, named by file:// ids)")
    p.add_argument("--output", "-o", metavar="PATH", help="file (PROV) or directory (parquet)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.add_argument("--partial", action="store_true",
                   help="export the readable partitions when some cannot be read, marked as "
                   "partial (entity provhpc:export), instead of writing nothing")
    p.set_defaults(func=_cmd_export)


def _cmd_report(args) -> int:
    from ..post.report import report

    with open_source(args.run) as src:
        if len(getattr(src, "runs", ())) > 1:  # a directory of runs: the page across them
            from ..post.report import report_runs

            runs = list(src.runs)
            for r in runs:
                require_all(r, args.partial)
            out = args.output or "provhpc-report-runs"
            res = report_runs(runs, out, args.metric, args.mode or "max", args.run)
            emit(args, res, f"wrote {res['html']} ({len(res['images'])} plots) of "
                            f"{res['runs']} runs in {args.run}")
            return 0
        run = single_run(src)
        missing = require_all(run, args.partial)
        out = args.output or f"provhpc-report-{run.run_id}"
        result = report(run, out, missing=missing)
    note = "" if run is src else f", the newest of {len(src.runs)} in {args.run}"
    emit(args, result, f"wrote {result['html']} ({len(result['images'])} plots) of run "
                       f"{run.run_id}{note}")
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="one self-contained HTML page about a run",
                       description="Write OUTPUT/index.html, one file readable offline (plots "
                       "embedded; the PNGs are also written beside it): the run card (who, "
                       "when, job, nodes, ranks, how it ended, code version, hyperparameters), "
                       "inputs and outputs with their identities, the lineage of each model as "
                       "a graph, ML metric curves per rank, telemetry per node, a labelled "
                       "timeline per rank, failures, stragglers, capture statistics and drops.  "
                       "RUN may be an output directory of several runs: then one page across them "
                       "(the metric curves of all runs overlaid, the best metric against each "
                       "varying hyperparameter, the run table).  Needs matplotlib.",
                       epilog="examples:\n  provhpc report prov/latest -o report\n"
                       "  chromium --headless --screenshot=report.png report/index.html",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--output", "-o", metavar="DIR",
                   help="output directory (default ./provhpc-report-<run_id>, or "
                   "./provhpc-report-runs for a directory of runs)")
    p.add_argument("--metric", help="several runs: the metric to rank them by (default "
                   "val_accuracy, or a loss)")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="several runs: is a higher --metric better (max, default; min for a "
                   "loss)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.add_argument("--partial", action="store_true",
                   help="report on the readable partitions when some cannot be read (the "
                   "page names the missing ones) instead of writing nothing")
    p.set_defaults(func=_cmd_report)


VERBS = [_add_export, _add_report]
