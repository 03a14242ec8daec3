"""Small real runs for the post-processing tests, captured in-process (provhpc.testing)."""

from __future__ import annotations

import os
import time

import numpy as np

import provhpc
from provhpc.testing import capture


def write_file(path: str, seed: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.random.default_rng(seed).normal(size=64))
    return path


def training_rank(raw_path: str, ckpt_dir: str, rank: int, lr: float, epochs: int = 3,
                  slow_epoch: float = 0.0, fail: bool = False, loss_bias: float = 0.0):
    """The demo's lifecycle on one rank: curation -> train/validate -> checkpoint."""
    raw = provhpc.data(raw_path, kind="raw", hash=True)
    hp = provhpc.hyperparameters(lr=lr, batch=32, optimizer={"name": "sgd"})
    with provhpc.stage("curation") as cur:
        with provhpc.task("curate_file", used=[raw], max_abs=20.0) as t:
            t.generated(kept=60, dropped=4)
        curated = provhpc.data(f"curated/rank{rank}", kind="dataset", derived_from=[raw])
        cur.generated(curated)
    with provhpc.stage("train", used=[curated, hp]):
        for e in range(epochs):
            with provhpc.epoch(e):
                if slow_epoch:
                    time.sleep(slow_epoch)
                provhpc.metric("epoch_loss", 1.0 / (e + 1) + loss_bias, step=e)
            with provhpc.stage("validate"):
                provhpc.metric("val_accuracy", min(0.99, lr * 10 * (e + 1) / epochs), step=e)
    ckpt = None
    if rank == 0:
        with provhpc.task("save_checkpoint", used=[hp]) as t:
            path = write_file(os.path.join(ckpt_dir, f"model-{lr}.npy"), 99)
            ckpt = provhpc.data(path, kind="checkpoint", hash=True, derived_from=[curated, hp])
            t.generated(ckpt)
    if fail:
        try:
            with provhpc.task("export_onnx", used=[curated]):
                raise RuntimeError("simulated failure")
        except RuntimeError:
            pass
    return ckpt


def build_run(out, run_id: str, lr: float = 0.05, nodes=("node-a", "node-b"), data_dir=None,
              slow_rank=None, fail_rank=None, lag_rank=None) -> str:
    """A run with one rank per node, each node its own partition (like a 2-node job)."""
    data_dir = data_dir or os.path.join(str(out), "data")
    raw = write_file(os.path.join(data_dir, "raw.npy"), 1)
    for rank, node in enumerate(nodes):
        with capture(out, rank=rank, node=node, run_id=run_id):
            training_rank(raw, os.path.join(data_dir, "ckpt"), rank, lr,
                          slow_epoch=0.05 if rank == slow_rank else 0.0,
                          fail=rank == fail_rank, loss_bias=0.5 if rank == lag_rank else 0.0)
    return os.path.join(str(out), run_id)
