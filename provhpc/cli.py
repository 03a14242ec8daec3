"""The ``provhpc`` command.  Subcommands are listed explicitly in COMMANDS."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__


def _cmd_run(args) -> int:
    from .launch import run

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run(cmd, out=args.out)


def _cmd_aggregate(args) -> int:
    from . import config, identity, session
    from .aggregator import Aggregator, run_process

    cfg = config.load(out=args.out, run_id=args.run_id)
    run_id = session.validate_run_id(args.run_id or cfg.run_id or "")
    ident = identity.simulate(identity.detect(), cfg.simulate_nodes)
    node = args.node or ident.node
    endpoint, ready = args.endpoint, args.ready
    if not endpoint or not ready:
        endpoint, ready = session.rendezvous(cfg, run_id, node)
    meta = json.loads(args.meta) if args.meta else session.run_meta(ident, cfg)
    agg = Aggregator(cfg, run_id, node, os.path.abspath(cfg.out), endpoint, ready,
                     expect=args.expect, linger=args.linger, meta=meta)
    return run_process(agg)


def _cmd_keygen(args) -> int:
    from . import netkey

    try:
        netkey.keygen(args.file)
    except FileExistsError:
        raise ValueError(f"{args.file} exists; a key file is never overwritten") from None
    print(f"wrote a new CURVE secret to {args.file} (mode 0600).  Copy it, owner-only, to every "
          "host of the run and set PROVHPC_KEY_FILE there (with PROVHPC_LISTEN on the "
          "aggregator, PROVHPC_CONNECT on remote ranks).")
    return 0


def format_summary(s: dict) -> str:
    lines = [f"run {s['run_id']}  ({s['path']})",
             f"nodes {len(s['nodes'])}: {', '.join(s['nodes'])}   ranks {s['world_size']}   "
             f"duration {s['duration_s']:.2f} s   status {s['status'] or '?'}",
             f"records {s['records_total']}   dropped {s['dropped_total']}"
             + (f" {s['dropped_by_reason']}" if s["dropped_total"] else "")]
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
        if not p["complete"]:
            lines.append(f"warning: partition {p['path']} is not marked complete "
                         "(run `provhpc recover`)")
    for err in s["partition_errors"].values():
        lines.append(f"error: {err}")
    return "\n".join(lines)


def _add_run(sub):
    p = sub.add_parser("run", help="run a program with capture (under mpiexec/srun or alone)",
                       description="Run CMD with provenance capture.  Under mpiexec or srun every "
                       "rank runs `provhpc run`; the first rank of each node starts the node's "
                       "aggregator.  Output goes to DIR/<run_id>/<node>.h5.")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (PROVHPC_OUT, default ./provenance)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- python script.py [args...]")
    p.set_defaults(func=_cmd_run)


def _add_aggregate(sub):
    p = sub.add_parser("aggregate", help="run a node aggregator (e.g. as its own job step)",
                       description="Run this node's aggregator in the foreground until every "
                       "expected rank said goodbye (or, with --expect 0, until no rank has been "
                       "connected for --linger seconds).  Ranks started with "
                       "PROVHPC_EXTERNAL_AGGREGATOR=1 and the same PROVHPC_RUN_ID find it.")
    p.add_argument("--run-id", default=None, help="run identity (default PROVHPC_RUN_ID)")
    p.add_argument("--out", metavar="DIR", help="output directory (PROVHPC_OUT)")
    p.add_argument("--node", help="node name (default: from the launcher / hostname)")
    p.add_argument("--expect", type=int, default=0, help="ranks on this node (0 = unknown)")
    p.add_argument("--linger", type=float, default=30.0,
                   help="with --expect 0: seconds without ranks before closing")
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--meta", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_aggregate)


def _add_keygen(sub):
    p = sub.add_parser("keygen", help="write a new CURVE secret for the network transport",
                       description="Write a new CURVE secret key (Z85) to FILE with mode 0600 "
                       "(an existing file is never overwritten).  The same file, as "
                       "PROVHPC_KEY_FILE, authenticates and encrypts the tcp link between an "
                       "aggregator started with PROVHPC_LISTEN and ranks started with "
                       "PROVHPC_CONNECT.  Nothing secret is printed.")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_cmd_keygen)


COMMANDS = [_add_run, _add_aggregate, _add_keygen]  # + provhpc.cli_post.COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provhpc", description="MPI-native W3C PROV provenance for ML runs on HPC clusters.")
    parser.add_argument("--version", action="version", version=f"provhpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands of the post-processing modules (listed explicitly there)."""
    import importlib.util

    if importlib.util.find_spec("provhpc.cli_post") is None:
        return []
    from .cli_post import COMMANDS as post

    return post


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `provhpc summary RUN | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"provhpc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
