"""Build a run's index (``provhpc index RUN``): decode, build the graph, write
``RUN/index.hdf5`` in the layout ``provhpc.post.index`` describes and reads."""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np

from .._progress import track
from .index import FILENAME, VERSION, NotIndexable, put_table, sources
from .lineage import Graph
from .reader import Run
from .tables import TABLES

__all__ = ["build"]


def build(run_or_path) -> str:
    """Decode the run, build its graph and write ``RUN/index.hdf5``; return its path.

    Raises ``NotIndexable`` when a partition is incomplete (still written, or
    left by a killed aggregator: run ``provhpc recover`` first) or unreadable.
    """
    path = run_or_path if isinstance(run_or_path, str) else run_or_path.path
    with Run(path, use_index=False) as run:
        if not run.all_partition_paths:
            raise NotIndexable(f"{run.path}: no partitions to index")
        before = sources(run)
        for p in run.partitions:
            if not p.complete:
                raise NotIndexable(f"{p.path}: partition is not complete (still being written, "
                                  "or its aggregator was killed: run `provhpc recover` first)")
        tables = {name: np.asarray(run.table(name))
                  for name in track(TABLES, f"index {run.run_id}: decoding tables")}
        if run.errors:
            raise NotIndexable("; ".join(run.errors.values()))
        time_range = run.time_range()
        g = Graph([run])
        target = os.path.join(run.path, FILENAME)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
                f.attrs.update({"format": "provhpc-index", "version": VERSION,
                                "run_id": run.run_id, "built_at": time.time_ns(),
                                "time_range": np.array(time_range, np.int64),
                                "sources": json.dumps(before)})
                for name, arr in tables.items():
                    put_table(f.create_group(f"tables/{name}"), arr)
                gg = f.create_group("graph")
                gg.attrs["n_activities"] = g.n_activities
                put_table(gg.create_group("nodes"), np.asarray(g.nodes))
                put_table(gg.create_group("edges"), np.asarray(g.edges))
                gg.create_dataset("entity_of_record", data=np.asarray(g.entity_of_record,
                                                                      np.int64))
                for direction, (indptr, nbr, edge) in g.csr.items():
                    gg.create_dataset(f"csr/{direction}_indptr", data=indptr)
                    gg.create_dataset(f"csr/{direction}_nbr", data=np.asarray(nbr, np.int64))
                    gg.create_dataset(f"csr/{direction}_edge", data=edge)
            if sources(run) != before:
                raise NotIndexable(f"{run.path}: the run changed while it was indexed; "
                                  "index it again when it is finished")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target
