"""Which activity is current follows ``contextvars`` rules, on the C and Python paths alike.

An asyncio task inherits the activity current where it was created, also when it runs
after that activity ended; tasks that interleave at ``await`` never see each other's
activities; a metric belongs to the activity of its own task.  The program runs in
fresh interpreters, with the C extension and with it blocked (what a machine without a
compiler gets).
"""

import json
import os
import subprocess
import sys

import pytest

from provhpc.capture import api

PROGRAM = r'''
import asyncio, json, sys
if sys.argv[2] == "python":
    sys.modules["provhpc.capture._fast"] = None
import provhpc
from provhpc.capture import api
from provhpc.testing import capture


async def worker(name, mine, theirs):
    with provhpc.task(name):
        mine.set()
        await theirs.wait()  # the other worker enters its task meanwhile
        provhpc.metric(f"m_{name}", 1.0)
        with provhpc.task(f"{name}.inner"):
            await asyncio.sleep(0)


async def late():
    with provhpc.task("late"):  # runs after "spawner" ended
        pass


async def main():
    a, b = asyncio.Event(), asyncio.Event()
    with provhpc.task("outer"):
        await asyncio.gather(worker("a", a, b), worker("b", b, a))
        with provhpc.task("spawner"):
            child = asyncio.create_task(late())
        await child
    with provhpc.task("after"):
        pass


with capture(sys.argv[1], telemetry_interval=0) as cap:
    for _ in range(2):  # the first round interns the strings (Python), the second not (C)
        asyncio.run(main())
starts = cap.records("activity_start")
name_of = dict(zip(starts["id"].tolist(), cap.strings(starts["name"])))
name_of[0] = None
parents = [(name_of[int(r["id"])], name_of.get(int(r["ref"]), "run")) for r in starts
           if name_of[int(r["id"])] not in ("run",) and cap.strings([r["sval"]])[0] == "task"]
metrics = cap.records("metric")
owners = [(n, name_of.get(int(i))) for n, i in zip(cap.strings(metrics["name"]),
                                                  metrics["id"].tolist())]
print(json.dumps({"c": api._fast is not None, "parents": parents, "metrics": owners}))
'''


def _run(tmp_path, mode):
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVHPC_")}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), mode], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


MODES = ["python", pytest.param("c", marks=pytest.mark.skipif(
    api._fast is None, reason="the C extension is not built here"))]


@pytest.mark.parametrize("mode", MODES)
def test_asyncio_tasks_see_the_activity_current_where_they_were_created(tmp_path, mode):
    got = _run(tmp_path, mode)
    assert got["c"] is (mode == "c")
    expected = {
        "outer": None, "a": "outer", "b": "outer", "a.inner": "a", "b.inner": "b",
        "spawner": "outer", "late": "spawner", "after": None,
    }
    parents = got["parents"]
    assert sorted(set(n for n, _ in parents)) == sorted(expected)
    assert len(parents) == 2 * len(expected)  # both rounds, each activity once per round
    for name, parent in parents:
        assert parent == expected[name], (name, parent)
    assert sorted(map(tuple, got["metrics"])) == [("m_a", "a")] * 2 + [("m_b", "b")] * 2
