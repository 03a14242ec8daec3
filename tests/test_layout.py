"""The package's surface: every module says what it exports, and exports what it says."""

import ast
import importlib
import pathlib
import re

import pytest

import provhpc

ROOT = pathlib.Path(provhpc.__file__).parent
MODULES = sorted(
    ".".join(("provhpc", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    for p in ROOT.rglob("*.py"))


def _public(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return not last.startswith("_") or name == "provhpc"


@pytest.mark.parametrize("name", [m for m in MODULES if _public(m)])
def test_every_public_module_declares_all(name):
    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), f"{name} has no __all__ (or give it a _name)"
    exported = list(mod.__all__)
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    private = [n for n in exported if n.startswith("_") and not n.endswith("__")]
    assert not private, f"{name} exports a private name: {private}"


def test_the_walk_sees_every_layer():
    layers = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert {"format", "capture", "node", "launch", "post", "cli"} <= layers


def _imported_modules(tree) -> set:
    """Names a module binds to other modules (``import x``, ``from . import x as _x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is None:  # from . import x
            names |= {a.asname or a.name for a in node.names}
    return names


def test_no_module_reads_another_modules_private_names():
    """``mod._name`` and ``from mod import _name`` across modules are the reaches the layout
    forbids; a private module (``_fast``, ``_version``, ``_progress``) is its package's own
    business."""
    reaches = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        mods = _imported_modules(tree)
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                reaches += [f"{where}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")
                            and a.name not in ("_fast", "_version", "_progress")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in mods and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id not in ("os", "sys"):
                reaches.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not reaches, reaches


def _interned(c_source: str) -> dict:
    return dict(re.findall(r'INTERN\((s_\w+), "(\w+)"\)', c_source))


def test_hot_path_contract_is_the_agents_public_fields():
    """What _fast.c reads from the agent, what api.py's fast paths read from it, and the
    list in docs/architecture.md are all ``Agent.HOT_PATH``, public fields of a live agent."""
    from provhpc.capture.agent import Agent

    hot = set(Agent.HOT_PATH)
    assert all(not n.startswith("_") for n in hot), hot
    c = (ROOT / "capture" / "_fast.c").read_text()
    names = _interned(c)
    state_of = c[c.index("static state_t *state_of"):c.index("/* The owner thread may write")]
    room = c[c.index("static int room("):c.index("/* Copy the records")]
    commit = c[c.index("static int commit("):c.index("/* Attribute records of")]
    read = {names[v] for part in (state_of, room, commit)
            for v in re.findall(r"\b(s_\w+)\b", part) if v in names}
    assert read and read <= hot, f"_fast.c reads agent fields outside HOT_PATH: {read - hot}"
    # api.py: every attribute it reads off an agent is a hot-path field or public API
    tree = ast.parse((ROOT / "capture" / "api.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in ("a", "agent")}
    private = {u for u in used if u.startswith("_")}
    assert not private, f"api.py reads private agent attributes: {private}"
    assert {u for u in used if u in hot}, "api.py's fast path no longer uses HOT_PATH?"
    # the documented list
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## The hot-path contract"):]
    section = section[:section.index("\n## ", 5)]
    items = re.findall(r"^- (.*?):", section, re.M)
    listed = {n for item in items for n in re.findall(r"`(\w+)`", item)}
    assert listed == hot, (f"docs/architecture.md lists {sorted(listed ^ hot)} differently "
                           "from Agent.HOT_PATH")


def test_hot_path_fields_exist_on_an_agent(tmp_path):
    from provhpc.capture.agent import Agent
    from provhpc.testing import capture

    with capture(tmp_path) as cap:
        missing = [n for n in Agent.HOT_PATH if not hasattr(cap.agent, n)]
    assert not missing, missing
