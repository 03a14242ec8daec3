"""Three workflows, one lineage graph: curation run -> training run -> inference run.

Each stage is its own provhpc run (its own job in real life) writing into the
same output directory.  The files that pass between them are recorded as they are
(``provhpc.data(path)``, no hash asked for): each record carries the file's size and
modification time, so the runs link by identity (path plus that fingerprint), as in
ProvLake's multi-workflow view:

    python examples/multi_workflow.py --out provenance-mw
    provhpc ls provenance-mw
    provhpc lineage provenance-mw predictions/predictions.npy
    provhpc query provenance-mw derivation predictions/predictions.npy

``--stage curation|training|inference`` runs one stage (e.g. under
``mpiexec -n 2 provhpc run --out DIR -- python examples/multi_workflow.py --stage training``);
without it the three run one after the other, each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

import provhpc


def curation(args) -> None:
    os.makedirs(args.data, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    raws = []
    for i in range(3):
        path = os.path.join(args.data, f"raw_{i}.npy")
        x = rng.normal(size=(200, 8))
        x[rng.random(200) < 0.05] = np.nan
        np.save(path, x)
        raws.append(provhpc.data(path, kind="raw"))
    with provhpc.stage("curation", used=raws, drop_nan=True) as st:
        x = np.concatenate([np.load(r.key) for r in raws])
        x = x[~np.isnan(x).any(axis=1)]
        out = os.path.join(args.data, "curated.npy")
        np.save(out, x)
        st.generated(provhpc.data(out, kind="dataset", derived_from=raws,
                                  rows=len(x)))


def training(args) -> None:
    curated = os.path.join(args.data, "curated.npy")
    data = provhpc.data(curated, kind="dataset")
    hp = provhpc.hyperparameters(lr=args.lr, epochs=args.epochs)
    x = np.load(curated)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(float)
    w = np.zeros(x.shape[1])
    with provhpc.stage("train", used=[data, hp]):
        for e in range(args.epochs):
            with provhpc.epoch(e):
                p = 1 / (1 + np.exp(-x @ w))
                w -= args.lr * x.T @ (p - y) / len(y)
                provhpc.metric("loss", float(-np.mean(y * np.log(p + 1e-9)
                                                       + (1 - y) * np.log(1 - p + 1e-9))), step=e)
        acc = float(((x @ w > 0) == y).mean())
        provhpc.metric("train_accuracy", acc)
    with provhpc.task("save_model", used=[hp]) as t:
        os.makedirs(os.path.dirname(args.model), exist_ok=True)
        np.save(args.model, w)
        t.generated(provhpc.data(args.model, kind="model", derived_from=[data, hp],
                                 train_accuracy=acc))


def inference(args) -> None:
    model = provhpc.data(args.model, kind="model")
    rng = np.random.default_rng(args.seed + 1)
    batch_path = os.path.join(args.data, "incoming.npy")
    np.save(batch_path, rng.normal(size=(50, 8)))
    batch = provhpc.data(batch_path, kind="raw")
    with provhpc.stage("inference", used=[model, batch]) as st:
        pred = (np.load(batch_path) @ np.load(args.model) > 0).astype(np.int8)
        os.makedirs("predictions", exist_ok=True)
        out = os.path.join("predictions", "predictions.npy")
        np.save(out, pred)
        st.generated(provhpc.data(out, kind="predictions",
                                  derived_from=[model, batch], positives=int(pred.sum())))


STAGES = {"curation": curation, "training": training, "inference": inference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=list(STAGES))
    ap.add_argument("--out", default="provenance-mw", help="output directory of the runs")
    ap.add_argument("--data", default="data/mw")
    ap.add_argument("--model", default="models/logreg.npy")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    if args.stage:
        provhpc.init(out=args.out)  # a no-op when already under `provhpc run`
        STAGES[args.stage](args)
        provhpc.shutdown()
        return 0
    for stage in STAGES:  # one run (one process) per workflow
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--out", args.out,
               "--data", args.data, "--model", args.model, "--lr", str(args.lr),
               "--epochs", str(args.epochs), "--seed", str(args.seed)]
        subprocess.run(cmd, check=True)
    print(f"three runs in {args.out}: provhpc lineage {args.out} predictions/predictions.npy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
