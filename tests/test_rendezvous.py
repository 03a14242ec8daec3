"""The runtime directory of a run is shared by the nodes of this host (simulated nodes, or a
runtime dir several nodes see): one node that ends must never pull it from under another."""

from __future__ import annotations

import os

import pytest

from provhpc.launch import config
from provhpc.launch.session import rendezvous
from provhpc.node.aggregator import Aggregator

pytestmark = pytest.mark.timeout(60)


def test_a_node_that_ends_first_leaves_a_starting_node_its_directory(tmp_path):
    cfg = config.load({}, runtime_dir=str(tmp_path / "rt"), telemetry_interval=0)
    out = str(tmp_path / "out")
    ep_a, ready_a = rendezvous(cfg, "race", "a")  # node a: its leader is still starting
    ep_b, ready_b = rendezvous(cfg, "race", "b")
    # node b's whole run ends (no rank came: it lingers, then cleans up) before node a's
    # aggregator has bound anything in the runtime directory
    assert Aggregator(cfg, "race", "b", out, ep_b, ready_b, expect=0, linger=0.1).serve() == 0
    assert not os.path.exists(os.path.dirname(ready_b))  # b took its own directory away
    agg = Aggregator(cfg, "race", "a", out, ep_a, ready_a, expect=0, linger=0.1)
    thread = agg.start_thread()
    try:
        assert agg.ready.wait(10), "node a's aggregator could not bind: its directory is gone"
        assert os.path.exists(ready_a)
    finally:
        thread.join(20)
    assert agg.exit_status == 0
    # the last node out removes the run's runtime directory, and nothing above it
    run_rt = os.path.dirname(os.path.dirname(ready_a))
    assert not os.path.exists(run_rt)
    assert os.path.isdir(os.path.dirname(run_rt))
