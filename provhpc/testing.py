"""Helpers to test instrumentation: a real agent and aggregator in one process.

    from provhpc.testing import capture

    def test_my_training(tmp_path):
        with capture(tmp_path) as cap:
            my_training_step()
        tasks = cap.records(kind="activity_start")

The aggregator runs as a thread (the same class as the production process)
and writes a real partition under ``tmp_path``; ``capture`` closes everything
on exit and the partition is then readable through ``cap.run``.
"""

from __future__ import annotations

import contextlib
import os
import secrets

import numpy as np

from .capture import api
from .capture.agent import Agent
from .format import records as R
from .format.segment import segment_name, shm_dir
from .launch import config as _config
from .launch import identity as _identity
from .node.aggregator import Aggregator
from .post.reader import Run

__all__ = ["Capture", "capture"]


class Capture:
    def __init__(self, out: str, run_id: str, node: str):
        self.out, self.run_id, self.node = out, run_id, node
        self.run_dir = os.path.join(out, run_id)
        self.agent: Agent | None = None
        self.aggregator: Aggregator | None = None
        self._run: Run | None = None

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = Run(self.run_dir)
        return self._run

    def records(self, kind: str | None = None) -> np.ndarray:
        """All records of the run (after the capture closed), optionally of one kind."""
        parts = [p.records() for p in self.run.partitions]
        recs = np.concatenate(parts) if parts else np.zeros(0, R.RECORD_DTYPE)
        if kind is not None:
            code = {v: k for k, v in R.KIND_NAMES.items()}[kind]
            recs = recs[recs["kind"] == code]
        return recs

    def strings(self, ids) -> list:
        table = self.run.partitions[0].strings
        return [table[i] for i in ids]

    def close(self) -> None:
        if self._run is not None:
            self._run.close()


@contextlib.contextmanager
def capture(tmp_path, rank: int = 0, node: str = "testnode", run_id: str | None = None,
            **settings):
    """Capture inside this process into ``tmp_path``; yields a ``Capture``."""
    out = str(tmp_path)
    run_id = run_id or f"test-{secrets.token_hex(4)}"
    settings.setdefault("runtime_dir", out)
    settings.setdefault("flush_interval", 0.2)
    cfg = _config.load(out=out, run_id=run_id, **settings)
    cap = Capture(out, run_id, node)
    sock_dir = os.path.join(out, "rt")
    os.makedirs(sock_dir, mode=0o700, exist_ok=True)
    endpoint = f"ipc://{sock_dir}/{secrets.token_hex(4)}.sock"
    agg = Aggregator(cfg, run_id, node, out, endpoint, os.path.join(sock_dir, "ready"),
                     expect=1, linger=5.0)
    thread = agg.start_thread()
    if not agg.ready.wait(10):
        raise RuntimeError("provhpc.testing: the aggregator did not start")
    ident = _identity.Identity(rank=rank, node=node, host=node)
    seg = os.path.join(shm_dir(), segment_name(run_id, node, rank, os.getpid()))
    agent = Agent(cfg, ident, run_id, endpoint, seg)
    if not agent.wait_ready(10):
        raise RuntimeError("provhpc.testing: the agent was not welcomed")
    previous = api.set_agent(agent)
    outer = api.CURRENT.set(0)  # no activity of an earlier capture is this one's parent
    cap.agent, cap.aggregator = agent, agg
    try:
        yield cap
    finally:
        api.CURRENT.reset(outer)
        api.set_agent(previous)
        api.fingerprint_pending(agent)  # as provhpc's shutdown does
        agent.end_open_activities()
        agent.shutdown()
        thread.join(15)
        cap.close()
