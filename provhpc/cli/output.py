"""Shared output helpers of the verbs: JSON, aligned tables, the run summary, errors."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time

import numpy as np

from ..format import records as R

__all__ = [
    "ABSOLUTE", "RUN_HELP", "UNREADABLE", "dump", "emit", "format_code", "format_end",
    "format_summary", "format_table", "friendly", "iso_ns", "jsonable", "note_errors",
    "open_source", "parse_ranks", "require_all", "rows_of", "single_run"
]

_HIDE = {"run"}
RUN_HELP = ("a run directory, or an output directory of runs (its newest run, unless the "
            "verb reads every run)")


def jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.names is None else \
            [dict(zip(obj.dtype.names, row)) for row in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=jsonable)


def rows_of(obj) -> list[dict]:
    if isinstance(obj, np.ndarray):
        names = obj.dtype.names
        return [dict(zip(names, row)) for row in obj.tolist()]
    return list(obj)


ABSOLUTE = "absolute"  # the origin that prints times as UTC ISO-8601 (--absolute)


def iso_ns(ns: int) -> str:
    """A time in ns since the epoch as UTC ISO-8601 with microseconds."""
    return (datetime.datetime.fromtimestamp(ns // 1000 / 1e6, datetime.timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def format_table(rows, columns=None, limit=None, origin_ns=None, all_runs=False) -> str:
    """Rows (dicts) as aligned text.  Times (``start``, ``end``, ``t``) are seconds from
    ``origin_ns``: one time, or a ``{run_id: ns}`` mapping for each row's own run;
    ``ABSOLUTE`` as origin prints them as UTC ISO-8601.  ``all_runs`` shows the run column."""
    rows = rows_of(rows)
    if not rows:
        return "(no rows)"
    columns = columns or [c for c in rows[0] if c not in _HIDE or (all_runs and c == "run")]
    shown = rows if limit is None else rows[:limit]
    if isinstance(origin_ns, dict):
        cells = [[_cell(r.get(c), c, origin_ns.get(r.get("run"))) for c in columns]
                 for r in shown]
    else:
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
        if v < 0:
            return ""
        if origin_ns == ABSOLUTE:
            return iso_ns(v)
        return f"{(v - origin_ns) / 1e9:.4f}"
    if col in ("index", "step") and isinstance(v, int) and v == R.NO_STEP:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def emit(args, obj, text=None) -> None:
    if args.json:
        print(dump(obj))
    else:
        print(text if text is not None else dump(obj))


def parse_ranks(text):
    if text is None:
        return None
    out = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError
                out += list(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"bad --rank {text!r}: expected ranks such as 0,2,4-7") from None
    if not out:
        raise ValueError(f"bad --rank {text!r}: expected ranks such as 0,2,4-7")
    return out


#: the partitions a verb could not read (path -> why), gathered from every source it opened;
#: ``provhpc.cli.main`` names each on stderr and makes the verb exit non-zero
UNREADABLE: dict[str, str] = {}


@contextlib.contextmanager
def open_source(path, comm=None):
    """Open a run or a directory of runs for a verb; what it could not read is kept in
    ``UNREADABLE`` when the verb is done with it."""
    from ..post.mpi_post import share
    from ..post.reader import open_path

    src = open_path(path, select=share(comm))
    try:
        yield src
    finally:
        try:
            note_errors(src)
        finally:
            src.close()


def note_errors(src) -> None:
    """Keep what ``src`` (a Run or a Collection) could not read in ``UNREADABLE``."""
    UNREADABLE.update(getattr(src, "errors", None) or {})


def require_all(src, partial: bool) -> list[str]:
    """Decode every table of ``src`` now.  Unless ``partial``, a partition that cannot be
    read stops the verb before it writes anything (ValueError naming each); with it, the
    paths of the missing partitions are returned, to be marked in the answer."""
    from ..post.tables import TABLES

    for name in TABLES:
        src.table(name)
    src.ranks()
    errors = dict(getattr(src, "errors", None) or {})
    if errors and not partial:
        UNREADABLE.update(errors)
        raise ValueError("nothing was written: " + "; ".join(errors.values())
                         + " (--partial goes on with the readable partitions)")
    return sorted(errors)


def single_run(source):
    return source.latest if hasattr(source, "runs") else source


def format_end(end: dict) -> str:
    """One line: how the job ended (``Run.end()``), with the scheduler's word for why."""
    line = _format_end(end)
    said = end.get("scheduler")
    if said:
        why = said.get("verdict") or "cannot tell yet"
        line += (f"; {said.get('scheduler', 'scheduler').upper()} says {why} (job state "
                 f"{said.get('state', '?')}"
                 + (f", reason {said['reason']}" if said.get("reason") else "")
                 + f", from {said.get('source', '?')}"
                 + ("" if said.get("final") else ", not final") + ")")
    return line


def _format_end(end: dict) -> str:
    state = end.get("state", "?")
    if state == "failed":
        what = ": ".join(x for x in (end.get("exception"), end.get("message")) if x)
        return (f"ended failed: rank {end['rank']} (exit code {end['exit_code']})"
                + (f" raised {what}" if what else "")
                + (f" at {end['where']}" if end.get("where") else ""))
    if state == "killed":
        if end["first"] is None:
            return (f"ended killed: rank(s) {', '.join(map(str, end['ranks']))} died without "
                    "a goodbye, found together by their aggregator (which went first is not "
                    "known, nor the signal)")
        rest = [r for r in end["ranks"] if r != end["first"]]
        return (f"ended killed: rank {end['first']} died first"
                + (f", then rank(s) {', '.join(map(str, rest))}" if rest else "")
                + " (as their aggregator saw them; the signal is not known)")
    if state == "terminated":
        return f"ended terminated: SIGTERM/SIGINT on rank(s) {', '.join(map(str, end['ranks']))}"
    if state == "lost":
        return ("ended lost: no process is left and nobody wrote an end (the whole job was "
                "killed, or its node died)")
    if state == "running":
        return "running"
    return f"ended {state}"


def format_code(code: dict, env: dict) -> str:
    """One line: the script, its git commit, branch and state, Python and key packages."""
    if not code.get("script") and not code.get("command"):
        return "code not recorded (no program in this run's metadata)"
    git = code.get("git") or {}
    where = (f" @ {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}"
             f" on {git.get('branch') or 'detached HEAD'}" if git.get("commit")
             else " (not in a git work tree)")
    pkgs = env.get("packages") or {}
    shown = ", ".join(f"{k} {pkgs[k]}" for k in ("torch", "numpy", "mpi4py", "provhpc")
                      if k in pkgs)
    py = (env.get("python") or {}).get("version")
    return (f"code {os.path.basename(code.get('script') or '') or '?'}{where}"
            + (f"   python {py}" if py else "") + (f", {shown}" if shown else ""))


def _records_origin(s: dict) -> str:
    """Where the stored records came from, when not all from the processes' rows below."""
    samples = s.get("telemetry_records", 0)
    if not samples:
        return ""
    sent = s["records_total"] - samples
    return (f" ({sent} from the {len(s['ranks'])} processes below + {samples} telemetry "
            "samples by the aggregator)")


def format_summary(s: dict) -> str:
    lines = [f"run {s['run_id']}  ({s['path']})",
             f"nodes {len(s['nodes'])}: {', '.join(s['nodes'])}   ranks {s['world_size']}   "
             f"duration {s['duration_s']:.2f} s   status {s['status'] or '?'}"
             + (f" ({s['status_note']})" if s.get("status_note") else ""),
             f"records {s['records_total']}{_records_origin(s)}   dropped {s['dropped_total']}"
             + (f" {s['dropped_by_reason']}" if s["dropped_total"] else "")]
    if s.get("end"):
        lines.append(format_end(s["end"]))
    if s.get("attempt") or s.get("previous_attempt"):
        lines.append(f"attempt {s.get('attempt', 0)} of its job"
                     + (f", after run {s['previous_attempt']}" if s.get("previous_attempt")
                        else " (no earlier attempt found beside it)"))
    if s.get("code"):
        lines.append(format_code(s["code"], s.get("environment") or {}))
    kinds = ["activity_start", "activity_end", "entity", "relation", "attribute", "metric"]
    short = ["act+", "act-", "entity", "rel", "attr", "metric"]
    lines.append("")
    lines.append(f"{'rank':>5} {'node':<20} {'role':<6} {'status':<10} {'records':>9} "
                 + " ".join(f"{h:>7}" for h in short) + f" {'dropped':>8} {'salvaged':>8}")
    for r in s["ranks"]:
        by = r["records_by_kind"]
        lines.append(f"{r['rank']:>5} {r['node'][:20]:<20} {r['role']:<6} {r['status']:<10} "
                     f"{r['records']:>9} " + " ".join(f"{by.get(k, 0):>7}" for k in kinds)
                     + f" {r['dropped']:>8} {r['salvaged']:>8}")
    for p in s["partitions"]:
        if p["complete"]:
            continue
        idle = max(0.0, (time.time_ns() - p["last_write_ns"]) / 1e9)
        if p.get("live"):
            lines.append(f"live: partition {p['path']} is being written (its aggregator "
                         f"wrote it {idle:.0f} s ago)")
        else:
            lines.append(f"warning: partition {p['path']} is not marked complete and "
                         f"nothing wrote it for {idle:.0f} s: if the job has "
                         f"ended, run `provhpc recover {s['path']}`")
    if s["partition_errors"]:  # each error in full on stderr, by provhpc.cli.main
        lines.append(f"unreadable: {len(s['partition_errors'])} partition(s) "
                     f"({', '.join(sorted(s['partition_errors']))}): this summary lacks them")
    return "\n".join(lines)


def friendly(handler):
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
