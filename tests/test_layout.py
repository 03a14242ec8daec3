"""The package's surface: every module says what it exports, and exports what it says."""

import importlib
import pathlib

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
