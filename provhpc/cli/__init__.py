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

from .. import _progress
from .._version import __version__
from . import capture, exports, maintain, query, runs
from .output import friendly

__all__ = ["EXAMPLES", "HelpFormatter", "VERB_GROUPS", "build_parser", "main"]

# (group, its verbs): capture first, then reading and answering, then upkeep.
VERB_GROUPS = [("capture", capture.VERBS), ("runs", runs.VERBS), ("query", query.VERBS),
               ("export", exports.VERBS), ("maintain", maintain.VERBS)]


# every verb's --help ends with examples (a verb may set its own epilog instead)
EXAMPLES = {
    "run": ["mpiexec -n 4 provhpc run -o prov -- python train.py --epochs 3",
            "srun -n 64 provhpc run -o $SCRATCH/prov -- python train.py"],
    "aggregate": ["PROVHPC_RUN_ID=exp1 provhpc aggregate -o prov --expect 8"],
    "keygen": ["provhpc keygen ~/.provhpc/net.key && export PROVHPC_NET_KEY_FILE="
               "~/.provhpc/net.key"],
    "ls": ["provhpc ls prov", "provhpc ls prov --json"],
    "query": ["provhpc query prov tasks --kind epoch --rank 0-3",
              "provhpc query prov metrics --name val_accuracy --where 'value>0.8'",
              "provhpc query prov tasks --all-runs --absolute",
              "provhpc query prov produced checkpoints/mlp.npz",
              "provhpc query prov best --metric val_accuracy --mode max",
              "mpiexec -n 8 provhpc query prov/latest tasks --json"],
    "lineage": ["provhpc lineage prov/latest checkpoints/mlp.npz",
                "provhpc lineage prov data/raw.npz --direction forward",
                "provhpc lineage prov/latest 0:17 --format prov-n"],
    "export": ["provhpc export prov/latest --format prov-json -o run.prov.json",
               "provhpc export prov/latest --format parquet -o tables/",
               "provhpc export prov --format ro-crate -o crate/ --with-files"],
    "index": ["provhpc index prov/latest"],
    "compare": ["provhpc compare prov/20261207-021856-0ccbf3 prov/20261207-021858-abef98",
                "provhpc compare prov --json"],
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description; keeps indented lines (lists, examples) and
    the ``examples:`` epilog as written."""

    def _fill_text(self, text, width, indent):
        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if para.startswith("examples:") or any(ln.startswith("  ") for ln in lines[1:]):
                out.append("\n".join(indent + ln for ln in lines))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provhpc", description="MPI-native W3C PROV provenance for ML runs on HPC clusters.")
    parser.add_argument("--version", action="version", version=f"provhpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, verbs in VERB_GROUPS:
        for add in verbs:
            before = set(sub.choices)
            add(sub)
            for name in set(sub.choices) - before:
                p = sub.choices[name]
                p.formatter_class = HelpFormatter
                if not p.epilog and name in EXAMPLES:
                    p.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])
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
    _progress.enable(sys.stderr.isatty())  # a bar on a terminal, never in a log or a pipe
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
