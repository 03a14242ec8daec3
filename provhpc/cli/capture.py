"""Capture verbs: ``run`` (a program with capture), ``aggregate`` (a node aggregator in the
foreground), ``keygen`` (the CURVE secret of the network transport)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

__all__ = ["VERBS"]


def _cmd_run(args) -> int:
    from ..launch.run import run

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run(cmd, out=args.out)


def _add_run(sub):
    p = sub.add_parser("run", help="run a program with capture (under mpiexec/srun or alone)",
                       description="Run CMD with provenance capture.  Under mpiexec or srun every "
                       "rank runs `provhpc run`; the first rank of each node starts the node's "
                       "aggregator.  Output goes to DIR/<run_id>/<node>.h5.")
    p.add_argument("-o", "--output", "--out", dest="out", metavar="DIR",
                   help="output directory (PROVHPC_OUT, default ./provenance)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- python script.py [args...]")
    p.set_defaults(func=_cmd_run)


def _cmd_aggregate(args) -> int:
    from ..launch import config, identity, session
    from ..node.aggregator import Aggregator, run_process

    cfg = config.load(out=args.out, run_id=args.run_id)
    run_id = session.validate_run_id(args.run_id or cfg.run_id or "")
    ident = identity.simulate(identity.detect(), cfg.simulate_nodes)
    node = args.node or ident.node
    endpoint, ready = args.endpoint, args.ready
    if not endpoint or not ready:
        endpoint, ready = session.rendezvous(cfg, run_id, node)
    if args.meta_file:  # written owner-only by the spawning leader; read once, then removed
        with open(args.meta_file) as fh:
            meta = json.load(fh)
        with contextlib.suppress(OSError):
            os.unlink(args.meta_file)
    else:
        meta = session.run_meta(ident, cfg)
    job = str(meta.pop("_job", ""))  # the spawning job's digest: only its ranks are served
    leader = meta.pop("_leader", None)  # the rank that started it (none: started by hand)
    agg = Aggregator(cfg, run_id, node, os.path.abspath(cfg.out), endpoint, ready,
                     expect=args.expect, linger=args.linger, meta=meta, job=job,
                     leader=leader if isinstance(leader, dict) else None)
    return run_process(agg)


def _add_aggregate(sub):
    p = sub.add_parser("aggregate", help="run a node aggregator (e.g. as its own job step)",
                       description="Run this node's aggregator in the foreground until every "
                       "expected rank said goodbye (or, with --expect 0, until no rank has been "
                       "connected for --linger seconds).  Ranks started with "
                       "PROVHPC_EXTERNAL_AGGREGATOR=1 and the same PROVHPC_RUN_ID find it.")
    p.add_argument("--run-id", default=None, help="run identity (default PROVHPC_RUN_ID)")
    p.add_argument("-o", "--output", "--out", dest="out", metavar="DIR",
                   help="output directory (PROVHPC_OUT)")
    p.add_argument("--node", help="node name (default: from the launcher / hostname)")
    p.add_argument("--expect", type=int, default=0, help="ranks on this node (0 = unknown)")
    p.add_argument("--linger", type=float, default=30.0,
                   help="with --expect 0: seconds without ranks before closing")
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--meta-file", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_aggregate)


def _cmd_keygen(args) -> int:
    from ..format import netkey

    try:
        netkey.keygen(args.file)
    except FileExistsError:
        raise ValueError(f"{args.file} exists; a key file is never overwritten") from None
    print(f"wrote a new CURVE secret to {args.file} (mode 0600).  Copy it, owner-only, to every "
          "host of the run and set PROVHPC_KEY_FILE there (with PROVHPC_LISTEN on the "
          "aggregator, PROVHPC_CONNECT on remote ranks).")
    return 0


def _add_keygen(sub):
    p = sub.add_parser("keygen", help="write a new CURVE secret for the network transport",
                       description="Write a new CURVE secret key (Z85) to FILE with mode 0600 "
                       "(an existing file is never overwritten).  The same file, as "
                       "PROVHPC_KEY_FILE, authenticates and encrypts the tcp link between an "
                       "aggregator started with PROVHPC_LISTEN and ranks started with "
                       "PROVHPC_CONNECT.  Nothing secret is printed.")
    p.add_argument("file", metavar="FILE", help="the key file to write (owner-only, 0600)")
    p.set_defaults(func=_cmd_keygen)


VERBS = [_add_run, _add_aggregate, _add_keygen]
