"""Maintenance verbs: ``index``, ``recover`` (after a crash) and ``merge``."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .output import RUN_HELP, UNREADABLE, dump, emit

__all__ = ["VERBS"]


def _cmd_index(args) -> int:

    from ..post.indexing import build
    from ..post.reader import Collection, open_path

    src = open_path(args.run)
    runs = src.runs if isinstance(src, Collection) else [src]
    out: list[dict[str, Any]] = []
    for run in runs:
        t0 = time.perf_counter()
        path = build(run.path)
        out.append({"run_id": run.run_id, "path": path, "bytes": os.path.getsize(path),
                    "seconds": round(time.perf_counter() - t0, 3)})
        run.close()
    emit(args, {"runs": out}, "\n".join(
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
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_index)


def _cmd_recover(args) -> int:
    from ..node.recover import recover
    from ..post.reader import is_run_dir

    path = args.run
    runs = sorted(os.path.join(path, d) for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d)) and not os.path.islink(
                      os.path.join(path, d)) and is_run_dir(os.path.join(path, d))) \
        if os.path.isdir(path) and not is_run_dir(path) else []
    if runs:  # an output directory: every run in it
        reports = [_with_end(recover(r)) for r in runs]
        if args.json:
            print(dump(reports))
        else:
            print("\n".join(_recover_text(r) for r in reports))
        errors = {p: f"{p}: {e}" for r in reports for p, e in r["errors"].items()}
        UNREADABLE.update(errors)
        return 1 if errors else 0
    res = _with_end(recover(path))
    emit(args, res, _recover_text(res))
    UNREADABLE.update({p: f"{p}: {e}" for p, e in res["errors"].items()})  # on stderr
    return 1 if res["errors"] else 0


def _with_end(res: dict) -> dict:
    """The report with how the run ended, read after the repair (``Run.end()``)."""
    from ..post.reader import PartitionError, Run, record_end

    try:
        with Run(res["run_dir"], use_index=False) as run:
            # written into the manifest too: it no longer says running once all is gone
            res["end"] = record_end(run) if run.partition_paths else {"state": "unknown"}
    except (OSError, PartitionError, ValueError) as exc:
        res["end"] = {"state": "unknown", "why": str(exc)}
    return res


def _recover_text(res: dict) -> str:
    from .output import format_end

    lines = [f"recover {res['run_dir']}: {format_end(res['end'])}"]
    for p in res["partitions"]:
        extra = {k: v for k, v in p.items() if k not in ("path", "action", "reason")}
        lines.append(f"  {p['path']}: {p['action']}"
                     + (f" ({p['reason']})" if p.get("reason") else "")
                     + ("  " + ", ".join(f"{k} {v}" for k, v in extra.items()) if extra
                        else ""))
    for seg in res["segments"]:
        lines.append(f"  segment {seg['path']} (rank {seg['rank']}, pid {seg['pid']}): "
                     f"{seg.get('action', 'not taken')}")
    if not res["partitions"] and not res["segments"]:
        lines.append("  nothing to recover")
    return "\n".join(lines)


def _add_recover(sub):
    p = sub.add_parser("recover", help="repair partitions left by killed aggregators",
                       description="Repair the partitions of RUN left by a killed aggregator "
                       "(so they open and are marked) and salvage records left in shared-memory "
                       "segments of dead ranks.  Each partition's contents are checked (schema, "
                       "dtypes, every record chunk, string ids): one that cannot be opened is "
                       "moved to <file>.corrupt, one that opens but is unsound is named and left "
                       "in place; either makes the exit status 1.  How the run ended (with the "
                       "scheduler's verdict under SLURM) is then written into its manifest "
                       "(`ended`).  RUN may be an output directory: every run in it is "
                       "recovered.",
                       epilog="examples:\n  provhpc recover prov/20261207-015636-60c943",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_recover)


def _cmd_merge(args) -> int:
    from ..post.merge import merge

    res = merge(args.sources, args.out, overwrite=args.force)
    emit(args, res, "\n".join(f"{r['run_id']}: {r['partitions']} partitions, {r['records']} "
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
                       "cross-run queries.  Sources are not modified.  The merged run reads like "
                       "the original with every verb (summary, query, lineage, export, report, "
                       "index).",
                       epilog="examples:\n  provhpc merge prov/latest -o compact\n"
                       "  provhpc merge siteA/prov siteB/prov -o all-runs && provhpc index "
                       "all-runs/<run_id>",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a run directory, or an output directory of runs")
    p.add_argument("-o", "--output", "--out", dest="out", required=True, metavar="OUT",
                   help="destination directory (created if missing)")
    p.add_argument("--force", action="store_true", help="replace OUT/<run_id> if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_merge)


VERBS = [_add_index, _add_recover, _add_merge]
