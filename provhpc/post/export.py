"""Export: W3C PROV (``provhpc.post.prov``, through the ``prov`` package), Parquet through
pyarrow."""

from __future__ import annotations

import json
import os

import numpy as np

from .._progress import track
from .lineage import graph
from .prov import PROV_FORMATS, document, serialize
from .tables import TABLES, field_names

__all__ = ["FORMATS", "export", "serialize", "to_parquet", "to_prov"]

FORMATS = (*PROV_FORMATS, "parquet", "ro-crate")


class _Runs:
    """Several runs as one source of ``graph`` (its cache is its own)."""

    def __init__(self, runs):
        self.runs = runs
        self._cache = {}


def to_prov(source, lineage=None):
    """A ``prov.model.ProvDocument`` of a run, a collection, or (``lineage``) a subgraph."""
    runs = getattr(source, "runs", None) or (source if isinstance(source, list) else [source])
    g = graph(runs[0] if len(runs) == 1 else _Runs(runs))
    # an attempt of a requeued job comes with the attempts before it (its graph has them)
    return document(getattr(g, "runs_for_export", None) or runs, g, lineage)


def to_parquet(source, directory: str) -> list[str]:
    """One Parquet file per table (tasks, entities, metrics, attributes, relations)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet export needs pyarrow: pip install 'provhpc[parquet]'") \
            from exc
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in track(TABLES, "export parquet: tables"):
        arr = np.asarray(source.table(name))
        cols = {}
        for col in field_names(arr):
            v = arr[col]
            if name == "attributes" and col == "value":
                num = np.isin(arr["vtype"], ("int", "float", "bool"))
                cols["value_num"] = pa.array(np.where(num, 0, np.nan), pa.float64())
                fv = np.full(len(arr), np.nan)
                if num.any():
                    fv[num] = v[num].astype(float)
                cols["value_num"] = pa.array(fv, pa.float64())
                none = np.asarray(None, object)
                cols["value_str"] = pa.array(np.where(arr["vtype"] == "str", v, none).tolist(),
                                             pa.string())
                continue
            cols[col] = pa.array(v.tolist(), pa.string()) if v.dtype.kind == "O" \
                else pa.array(v)
        path = os.path.join(directory, f"{name}.parquet")
        pq.write_table(pa.table(cols), path)
        written.append(path)
    return written


def export(source, fmt: str, output: str | None = None, missing=(),
           with_files: bool = False) -> dict:
    """Export ``source`` as ``fmt``; PROV text is returned (and written to ``output`` if given).

    ``missing``: partitions that could not be read (a ``--partial`` export): the document
    says so in an entity ``provhpc:export`` (``provhpc:partial``,
    ``provhpc:missing_partitions``), Parquet in a ``_partial.json`` beside the tables."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    partial = {"partial": bool(missing), "missing_partitions": list(missing)}
    if fmt == "ro-crate":
        if not output:
            raise ValueError("ro-crate export needs --output DIR")
        from .rocrate import to_rocrate

        files = [to_rocrate(source, output, with_files)]
        if missing:
            note = os.path.join(output, "_partial.json")
            with open(note, "w") as fh:
                json.dump(partial, fh, indent=1)
            files.append(note)
        return {"format": fmt, "files": files, "text": None, **partial}
    if fmt == "parquet":
        if not output:
            raise ValueError("parquet export needs --output DIR")
        files = to_parquet(source, output)
        if missing:
            note = os.path.join(output, "_partial.json")
            with open(note, "w") as fh:
                json.dump(partial, fh, indent=1)
            files.append(note)
        return {"format": fmt, "files": files, "text": None, **partial}
    for step in track(("document", "serialize"), f"export {fmt}"):
        if step == "document":
            doc = to_prov(source)
            if missing:
                doc.entity("provhpc:export", {"provhpc:partial": True,
                                              "provhpc:missing_partitions": " ".join(missing)})
        else:
            text = serialize(doc, fmt)
    if output:
        with open(output, "w") as fh:
            fh.write(text)
        return {"format": fmt, "files": [output], "text": None, **partial}
    return {"format": fmt, "files": [], "text": text, **partial}
