"""Data-parallel MLP training with numpy and mpi4py, instrumented with provhpc.

A domain-flavoured toy: synthetic seismic traces whose facies (4 classes)
set their dominant frequency and amplitude.  The lifecycle is the one
provhpc records: curation (filter and clean raw trace files) -> learning-data
preparation (split, normalise, shard per rank) -> train/validate per epoch ->
evaluate -> checkpoint on disk.

    mpiexec -n 4 provhpc run -- python examples/train_mlp.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import provhpc

FACIES = ("shale", "sandstone", "limestone", "salt")


def make_raw_files(directory: str, n_files: int, traces: int, samples: int, seed: int) -> list:
    """Write raw trace files (once, on rank 0): some traces are dead or clipped."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    t = np.linspace(0, 1, samples)
    for i in range(n_files):
        path = os.path.join(directory, f"survey_{i:02d}.npz")
        facies = rng.integers(0, len(FACIES), traces)
        freq = 8 + 6 * facies + rng.normal(0, 1.5, traces)
        amp = 1 + 0.4 * facies + rng.normal(0, 0.2, traces)
        x = amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t) + rng.normal(0, 0.6,
                                                                              (traces, samples))
        x[rng.random(traces) < 0.03] = 0.0  # dead traces
        x[rng.random(traces) < 0.02] *= 50.0  # clipped / spiky traces
        np.savez(path, x=x.astype(np.float32), y=facies.astype(np.int64))
        paths.append(path)
    return paths


def features(x: np.ndarray) -> np.ndarray:
    """Spectral features of each trace: the magnitude of the low-frequency band."""
    spec = np.abs(np.fft.rfft(x, axis=1))[:, 1:49]
    return np.log1p(spec).astype(np.float32)


class MLP:
    def __init__(self, n_in: int, n_hidden: int, n_out: int, seed: int):
        rng = np.random.default_rng(seed)
        self.w1 = (rng.normal(0, 1, (n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32)
        self.b1 = np.zeros(n_hidden, np.float32)
        self.w2 = (rng.normal(0, 1, (n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32)
        self.b2 = np.zeros(n_out, np.float32)

    def params(self):
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x):
        h = np.maximum(x @ self.w1 + self.b1, 0)
        logits = h @ self.w2 + self.b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return h, p / p.sum(axis=1, keepdims=True)

    def loss_grad(self, x, y):
        h, p = self.forward(x)
        n = len(y)
        loss = -np.log(p[np.arange(n), y] + 1e-9).mean()
        d = p.copy()
        d[np.arange(n), y] -= 1
        d /= n
        gw2, gb2 = h.T @ d, d.sum(0)
        dh = (d @ self.w2.T) * (h > 0)
        gw1, gb1 = x.T @ dh, dh.sum(0)
        return float(loss), [gw1, gb1, gw2, gb2]

    def accuracy(self, x, y) -> float:
        return float((self.forward(x)[1].argmax(1) == y).mean()) if len(y) else 0.0


def allreduce_mean(comm, arrays):
    flat = np.concatenate([a.ravel() for a in arrays])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    flat /= comm.Get_size()
    out, i = [], 0
    for a in arrays:
        out.append(flat[i:i + a.size].reshape(a.shape))
        i += a.size
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--traces", type=int, default=400, help="traces per raw file")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--data", default="data/seismic", help="raw data directory")
    ap.add_argument("--checkpoint", default="checkpoints/mlp.npz")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--log-every", type=int, default=1,
                    help="record the step loss every N steps (0 = per epoch only)")
    ap.add_argument("--fail-rank", type=int, default=-1, help="this rank raises (for tests)")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    args = ap.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hp = provhpc.hyperparameters(epochs=args.epochs, batch=args.batch, lr=args.lr,
                                 hidden=args.hidden, seed=args.seed, world_size=size,
                                 optimizer={"name": "sgd", "momentum": 0.0})

    with provhpc.stage("curation") as curation:
        if rank == 0:
            make_raw_files(args.data, args.files, args.traces, args.samples, args.seed)
        comm.Barrier()
        raw_paths = sorted(os.path.join(args.data, f) for f in os.listdir(args.data)
                           if f.endswith(".npz"))[: args.files]
        xs, ys, raws = [], [], []
        for path in raw_paths[rank::size]:  # each rank curates its share of the files
            raw = provhpc.data(path, kind="raw", hash=True)
            raws.append(raw)
            with provhpc.task("curate_file", used=[raw], max_abs=20.0) as t:
                with np.load(path) as z:
                    x, y = z["x"], z["y"]
                keep = (np.abs(x).max(axis=1) < 20.0) & (np.abs(x).sum(axis=1) > 0)
                xs.append(x[keep])
                ys.append(y[keep])
                t.generated(kept=int(keep.sum()), dropped=int((~keep).sum()))
        local_x = np.concatenate(xs) if xs else np.zeros((0, args.samples), np.float32)
        local_y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        curated = provhpc.data(f"curated/rank{rank}", kind="dataset", derived_from=raws,
                               traces=len(local_y))
        curation.generated(curated)

    with provhpc.stage("preparation", used=[curated]) as prep:
        # gather the curated traces, split once, shard the training set per rank
        all_x = np.concatenate(comm.allgather(features(local_x)))
        all_y = np.concatenate(comm.allgather(local_y))
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(all_y))
        n_test, n_val = len(order) // 10, len(order) // 10
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        mean, std = all_x[train].mean(0), all_x[train].std(0) + 1e-6
        norm = lambda a: (a - mean) / std  # noqa: E731
        shard = train[rank::size]
        x_tr, y_tr = norm(all_x[shard]), all_y[shard]
        x_va, y_va, x_te, y_te = norm(all_x[val]), all_y[val], norm(all_x[test]), all_y[test]
        shard_e = provhpc.data(f"shard/train/rank{rank}", kind="shard", derived_from=[curated],
                               samples=len(y_tr), split="train")
        val_e = provhpc.data("split/validation", kind="split", samples=len(y_va))
        test_e = provhpc.data("split/test", kind="split", samples=len(y_te))
        prep.generated(shard_e, val_e, test_e, n_train=len(train), n_val=len(val),
                       n_test=len(test))

    model = MLP(x_tr.shape[1], args.hidden, len(FACIES), args.seed)
    steps = max(1, len(y_tr) // args.batch)
    steps = comm.allreduce(steps, op=MPI.MIN)  # same number of collective steps on every rank
    step = 0
    with provhpc.stage("train", used=[shard_e, hp]) as train_stage:
        for epoch in range(args.epochs):
            with provhpc.epoch(epoch):
                t0 = time.perf_counter()
                perm = np.random.default_rng(args.seed + epoch + rank).permutation(len(y_tr))
                losses = []
                for b in range(steps):
                    idx = perm[b * args.batch:(b + 1) * args.batch]
                    loss, grads = model.loss_grad(x_tr[idx], y_tr[idx])
                    grads = allreduce_mean(comm, grads)
                    for p, g in zip(model.params(), grads):
                        p -= args.lr * g
                    losses.append(loss)
                    if args.log_every and b % args.log_every == 0:
                        provhpc.metric("train_loss", loss, step=step)
                    if args.step_sleep:
                        time.sleep(args.step_sleep)
                    step += 1
                if rank == args.fail_rank and epoch == args.epochs - 1:
                    raise RuntimeError(f"rank {rank}: simulated failure in epoch {epoch}")
                provhpc.metric("epoch_loss", float(np.mean(losses)), step=epoch)
                provhpc.metric("epoch_seconds", time.perf_counter() - t0, step=epoch)
            with provhpc.stage("validate", used=[val_e]):
                provhpc.metric("val_accuracy", model.accuracy(x_va, y_va), step=epoch)
        train_stage.generated(final_loss=float(np.mean(losses)))

    with provhpc.stage("evaluate", used=[test_e]) as ev:
        acc = model.accuracy(x_te, y_te)
        provhpc.metric("test_accuracy", acc)
        ev.generated(test_accuracy=acc)

    if rank == 0:
        with provhpc.task("save_checkpoint", used=[hp]) as t:
            os.makedirs(os.path.dirname(args.checkpoint) or ".", exist_ok=True)
            np.savez(args.checkpoint, *model.params())
            # the model is trained on every rank's shard (allreduced gradients)
            shards = [provhpc.data(f"shard/train/rank{r}", kind="shard") for r in range(size)]
            ckpt = provhpc.data(args.checkpoint, kind="checkpoint", hash=True,
                                derived_from=[*shards, hp], test_accuracy=acc)
            t.generated(ckpt)
        print(f"facies MLP: {size} ranks, {args.epochs} epochs, test accuracy {acc:.3f}, "
              f"checkpoint {args.checkpoint}")
    comm.Barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
