"""One aggregator per (run, node): a second one refuses instead of stealing the socket."""

import json
import subprocess

from provhpc.launch import config
from provhpc.node.aggregator import Aggregator


def _aggregator(tmp_path, sock):
    cfg = config.load({}, runtime_dir=str(tmp_path))
    rd = tmp_path / "rt"
    rd.mkdir(mode=0o700, exist_ok=True)
    return Aggregator(cfg, "guard", "n1", str(tmp_path / "out"), f"ipc://{rd}/{sock}",
                      str(rd / "n1.ready"), expect=0, linger=0.2), rd


def test_second_aggregator_for_a_node_refuses_while_the_first_lives(tmp_path):
    agg, rd = _aggregator(tmp_path, "b.sock")
    other = subprocess.Popen(["sleep", "60"])  # stands for the live first aggregator
    try:
        with open(rd / "n1.ready", "w") as fh:
            json.dump({"pid": other.pid, "endpoint": "ipc://elsewhere", "path": "x"}, fh)
        assert agg.serve() == 3
        assert not (rd / "b.sock").exists()
        assert not (tmp_path / "out" / "guard").exists() or \
            not list((tmp_path / "out" / "guard").glob("*.h5"))
        assert json.loads((rd / "n1.ready").read_text())["pid"] == other.pid  # left alone
    finally:
        other.kill()
        other.wait()
    # the first one is gone: the ready file is stale and a new aggregator serves
    agg2, _ = _aggregator(tmp_path, "c.sock")
    assert agg2.serve() == 0
    assert list((tmp_path / "out" / "guard").glob("n1*.h5"))
