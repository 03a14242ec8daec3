"""Docs match the code: the README settings table and the CLI verbs it names."""

import os
import re

from provhpc import cli
from provhpc.launch import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_settings_table_is_the_code_s():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    block = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block, "README lost its settings markers"
    assert block.group(1).strip() == config.markdown_table(), \
        "README settings table is stale: paste provhpc.launch.config.markdown_table()"


def test_every_cli_verb_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name in sub.choices:
        assert helps.get(name), f"`provhpc {name}` has no help line in `provhpc --help`"
