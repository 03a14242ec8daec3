"""The ``provhpc`` command.

The verbs are a table: each module of this package defines its verbs as
``add(subparsers)`` functions in ``VERBS``, and ``VERB_GROUPS`` lists the
modules in the order ``provhpc --help`` shows them.  A new verb is one
``_cmd_x``/``_add_x`` pair in the module of its group and one entry in that
module's ``VERBS``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from . import capture, exports, maintain, query, runs
from .output import friendly

__all__ = ["VERB_GROUPS", "build_parser", "main"]

# (group, its verbs): capture first, then reading and answering, then upkeep.
VERB_GROUPS = [("capture", capture.VERBS), ("runs", runs.VERBS), ("query", query.VERBS),
               ("export", exports.VERBS), ("maintain", maintain.VERBS)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provhpc", description="MPI-native W3C PROV provenance for ML runs on HPC clusters.")
    parser.add_argument("--version", action="version", version=f"provhpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, verbs in VERB_GROUPS:
        for add in verbs:
            before = set(sub.choices)
            add(sub)
            if group == "capture":
                continue
            for name in set(sub.choices) - before:  # reading verbs: one clear line, exit 2/1
                p = sub.choices[name]
                p.set_defaults(func=friendly(p.get_default("func")))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .output import UNREADABLE

    UNREADABLE.clear()
    try:
        rc = args.func(args)
    except BrokenPipeError:  # `provhpc summary RUN | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"provhpc {args.command}: {exc}", file=sys.stderr)
        return 2
    for err in UNREADABLE.values():  # one line per partition the verb could not read
        print(f"provhpc {args.command}: {err}", file=sys.stderr)
    return rc or (1 if UNREADABLE and not getattr(args, "partial", False) else rc)


if __name__ == "__main__":
    sys.exit(main())
