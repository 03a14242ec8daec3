"""Lineage: the PROV graph of one run or of a directory of runs, and its closures.

Nodes are activities (one per task row) and *logical* entities.  Entity
records denote the same logical entity when they share an identity:

* a content hash (``data(path, hash=True)``): the path (made absolute with the
  run's working directory) plus the hash — this links a file across runs;
* a fingerprint (``size`` and ``mtime_ns``, recorded by ``data(path)`` of an existing
  file): the absolute path plus size and mtime — this links a file across runs too;
  the same path with another hash or fingerprint is another version, linked to the
  one before it by ``wasRevisionOf``;
* a key with a URI scheme (``urn:…``, ``doi:…``, ``s3://…``): a user-given
  global id — also links across runs;
* otherwise kind plus key within one run (every rank's ``split/validation``
  is one entity), never across runs.

Edges are the captured relations, each read as "subject depends on object"
(``used``, ``wasGeneratedBy``, ``wasDerivedFrom``, ``wasInformedBy``,
``hadMember``).  ``backward`` follows them from a node to its origins,
``forward`` to what came of it.  Closures run as vectorised frontier
expansions over CSR arrays, never per edge in Python.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..format import records as R
from .prov import document
from .tables import as_table, lookup, pair_keys

__all__ = ["CODE_ID", "EDGE_DTYPE", "Graph", "Lineage", "NODE_DTYPE", "code_label",
           "entity_identity", "graph", "lineage"]

NODE_DTYPE = np.dtype([
    ("node", "<i8"), ("type", "O"), ("run", "O"), ("rank", "<i4"), ("id", "<u8"),
    ("name", "O"), ("kind", "O"), ("hash", "O"), ("host", "O"), ("start", "<i8"),
    ("end", "<i8"), ("status", "O"), ("identity", "O")])
EDGE_DTYPE = np.dtype([("src", "<i8"), ("relation", "O"), ("dst", "<i8"), ("run", "O"),
                       ("rank", "<i4"), ("t", "<i8")])
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def entity_identity(run_id: str, cwd: str, kind, key, hsh, fp=None) -> np.ndarray:
    """The identity string of each entity record (see the module docstring).

    ``fp``: each record's file fingerprint (``size:mtime_ns``, '' for none).
    Object-array arithmetic and one string scan for ':' keep this off a
    per-record Python loop; only hashed, fingerprinted and URI-like keys are looked
    at singly.
    """
    kind, key, hsh = (np.asarray(x, object) for x in (kind, key, hsh))
    out = f"run:{run_id}:" + kind + ":" + key if len(key) else np.zeros(0, object)
    if fp is not None and len(key):
        fp = np.asarray(fp, object)
        for i in np.flatnonzero((fp != "") & (hsh == "")).tolist():
            k = key[i]
            if not _URI.match(k):  # a file seen by its fingerprint: path, size, mtime
                path = os.path.normpath(os.path.join(cwd, k)) if cwd else k
                out[i] = f"file:{path}@{fp[i]}"
    hashed = np.flatnonzero(hsh != "")
    colon = np.flatnonzero((np.char.find(key.astype(str), ":") > 0) & (hsh == "")) \
        if len(key) else np.zeros(0, np.int64)
    for i in colon.tolist():
        k = key[i]
        if _URI.match(k) and not k.startswith("file:"):
            out[i] = f"id:{k}"
    for i in hashed.tolist():
        k = key[i]
        path = os.path.normpath(os.path.join(cwd, k)) if cwd and not _URI.match(k) else k
        out[i] = f"file:{path}#{hsh[i]}"
    return out


class Graph:
    """The PROV graph of some runs: ``nodes`` and ``edges`` tables plus CSR indexes."""

    # set only on a graph read from an index (from_index) and by graph() respectively
    _entity_source: Any
    runs_for_export: list

    def __init__(self, runs):
        runs = list(runs)
        act, ent_rows, rel = [], [], []
        n_act = 0
        for run in runs:
            t, e, r = np.asarray(run.tasks()), np.asarray(run.entities()), \
                np.asarray(run.relations())
            cwd = (run.manifest.get("meta") or {}).get("cwd", "")
            ident = entity_identity(run.run_id, cwd, e["kind"], e["key"], e["hash"],
                                    fingerprints(run, e))
            e, ident, r = _with_code(run, t, e, ident, r)
            kt, ke, ks, ko = pair_keys((t["rank"], t["id"]), (e["rank"], e["id"]),
                                       (r["rank"], r["subject"]), (r["rank"], r["object"]))
            keys = np.concatenate([kt, ke])
            # activities: their global node index; entity records: -(global record index + 1)
            e_off = sum(len(x[0]) for x in ent_rows)
            vals = np.concatenate([n_act + np.arange(len(t)), -(e_off + np.arange(len(e)) + 1)])
            order = np.argsort(keys, kind="stable")
            src, dst = lookup(keys[order], order, ks), lookup(keys[order], order, ko)
            ok = (src >= 0) & (dst >= 0)
            rel.append((vals[src[ok]], vals[dst[ok]], r[ok]))
            act.append(t)
            ent_rows.append((e, ident))
            n_act += len(t)
        self._build(act, ent_rows, rel, n_act, _attempt_links(runs, act))

    def _build(self, act, ent_rows, rel, n_act, informed=()):
        t = np.concatenate(act) if act else np.zeros(0, NODE_DTYPE)
        e = np.concatenate([x[0] for x in ent_rows]) if ent_rows else None
        ident = np.concatenate([x[1] for x in ent_rows]) if ent_rows else np.zeros(0, object)
        uniq, first, inverse = np.unique(ident.astype(str), return_index=True,
                                         return_inverse=True)
        n = n_act + len(uniq)
        nodes = np.zeros(n, NODE_DTYPE)
        nodes["node"] = np.arange(n)
        if n_act:
            a = nodes[:n_act]
            for col in ("run", "rank", "id", "name", "start", "end", "status"):
                a[col] = t[col]
            a["type"], a["kind"], a["host"], a["hash"] = "activity", t["type"], t["node"], ""
            a["identity"] = ""
            nodes[:n_act] = a
        if len(uniq):
            en = nodes[n_act:]
            rep = e[first]
            en["type"], en["run"], en["rank"], en["id"] = "entity", rep["run"], rep["rank"], \
                rep["id"]
            en["name"], en["kind"], en["hash"], en["host"] = rep["key"], rep["kind"], \
                rep["hash"], rep["node"]
            en["start"], en["end"], en["status"] = rep["t"], -1, ""
            en["identity"] = uniq.astype(object)
            nodes[n_act:] = en
        # the logical entity node of each entity record of the runs' tables (not of the
        # code entities this graph adds: an index stores it beside those tables)
        real = e["id"] != CODE_ID if e is not None else np.zeros(0, bool)
        self.entity_of_record = (n_act + inverse)[real]
        self._entity_records = e[real] if e is not None else None
        self._nodes, self._stored_nodes = as_table(nodes), None
        self.n_activities = n_act

        def resolve(v):
            return np.where(v >= 0, v, n_act + inverse[np.maximum(-v - 1, 0)] if len(inverse)
                            else -1)

        edges = np.zeros(sum(len(x[0]) for x in rel), EDGE_DTYPE)
        if len(edges):
            edges["src"] = np.concatenate([resolve(s) for s, _, _ in rel])
            edges["dst"] = np.concatenate([resolve(d) for _, d, _ in rel])
            rr = np.concatenate([r for _, _, r in rel])
            edges["relation"], edges["run"], edges["rank"], edges["t"] = \
                rr["relation"], rr["run"], rr["rank"], rr["t"]
            # the same relation stated by several ranks about one logical entity: keep one
            rel_code = np.unique(edges["relation"].astype(str), return_inverse=True)[1]
            n_rel = int(rel_code.max()) + 1
            if n * n * n_rel < 2**62:  # one int64 key per edge: a fast 1-d unique
                key = (edges["src"] * n + edges["dst"]) * n_rel + rel_code
                _, keep = np.unique(key, return_index=True)
            else:
                _, keep = np.unique(np.stack([edges["src"], edges["dst"], rel_code], 1),
                                    axis=0, return_index=True)
            edges = edges[np.sort(keep)]
        rev = revisions(nodes) if len(uniq) else []
        if len(informed):  # an attempt after a requeue: its run activities by the last one's
            edges = np.concatenate([edges, _edges(nodes, informed, R.WAS_INFORMED_BY)])
        if rev:  # a path rewritten between its records: each version a revision of the last
            edges = np.concatenate([edges, _edges(nodes, rev, R.WAS_REVISION_OF)])
        self._edges, self._stored_edges = as_table(edges), None
        # per direction: (indptr, neighbour node, edge row) sorted by the edge's first node
        self._csr = {"backward": _csr(edges["src"], edges["dst"], n),
                     "forward": _csr(edges["dst"], edges["src"], n)}

    @classmethod
    def from_index(cls, run) -> Graph:
        """The graph of one run as its index stored it (``provhpc.post.index``)."""
        a = run.index.graph_arrays()
        g = cls.__new__(cls)
        g._nodes, g._edges = None, None
        g._stored_nodes, g._stored_edges = a["nodes"], a["edges"]
        g.n_activities, g.entity_of_record, g._csr = a["n_activities"], a["entity_of_record"], \
            a["csr"]
        g._entity_records = None
        g._entity_source = run
        return g

    @property
    def csr(self) -> dict:
        """The graph's adjacency per direction: ``{direction: (indptr, nbr, edge)}``."""
        return self._csr

    @property
    def nodes(self):
        """All nodes (a ``Table``); from an index, decoded in full on first use."""
        if self._nodes is None:
            self._nodes = as_table(self._stored_nodes.full())
        return self._nodes

    @property
    def edges(self):
        if self._edges is None:
            self._edges = as_table(self._stored_edges.full())
        return self._edges

    @property
    def n_nodes(self) -> int:
        return len(self._nodes) if self._nodes is not None else len(self._stored_nodes)

    def node_column(self, name: str) -> np.ndarray:
        if self._nodes is not None:
            return np.asarray(self._nodes)[name]
        return self._stored_nodes.column(name)

    def node_rows(self, idx) -> np.ndarray:
        if self._nodes is not None:
            return np.asarray(self._nodes)[idx]
        return self._stored_nodes.rows(idx)

    def edge_column(self, name: str) -> np.ndarray:
        if self._edges is not None:
            return np.asarray(self._edges)[name]
        return self._stored_edges.column(name)

    def edge_rows(self, idx) -> np.ndarray:
        if self._edges is not None:
            return np.asarray(self._edges)[idx]
        return self._stored_edges.rows(idx)

    def _name_is(self, value: str) -> np.ndarray:
        """Mask of the nodes whose ``name`` is ``value`` (an index compares codes only)."""
        if self._nodes is not None:
            return np.asarray(self._nodes)["name"] == value
        st = self._stored_nodes
        return np.isin(st.codes("name"), st.find("name", value))

    @property
    def entity_records(self):
        """The entity records behind the logical entities (read on first use from an index)."""
        if self._entity_records is None and getattr(self, "_entity_source", None) is not None:
            self._entity_records = np.asarray(self._entity_source.entities())
        return self._entity_records

    # ------------------------------------------------------------------ lookup
    def resolve(self, spec: str, cwd: str = "") -> np.ndarray:
        """Node indices for ``spec``: ``[run/]rank:id``, an entity key or path, or a task name."""
        spec = str(spec)
        col = self.node_column
        m = re.fullmatch(r"(?:(?P<run>[^/]+)/)?(?P<rank>-?\d+):(?P<id>0x[0-9a-fA-F]+|\d+)", spec)
        if m:
            sel = (col("rank") == int(m["rank"])) & (col("id") == int(m["id"], 0))
            if m["run"]:
                sel &= col("run") == m["run"]
            hit = np.flatnonzero(sel)
            if not len(hit) and self.entity_records is not None:
                er = self.entity_records
                rec = (er["rank"] == int(m["rank"])) & (er["id"] == int(m["id"], 0))
                if m["run"]:
                    rec &= er["run"] == m["run"]
                hit = np.unique(self.entity_of_record[rec])
            if len(hit):
                return hit
        is_ent = col("type") == "entity"
        for candidate in _spellings(spec, cwd):
            hit = np.flatnonzero(is_ent & self._name_is(candidate))
            if len(hit):
                return hit
        absolute = os.path.abspath(spec)
        ids = col("identity").astype(str)
        hit = np.flatnonzero(is_ent & np.char.startswith(ids, f"file:{absolute}#"))
        if len(hit):
            return hit
        hit = np.flatnonzero(~is_ent & self._name_is(spec))
        if len(hit):
            return hit
        base = os.path.basename(spec)
        names = col("name").astype(str)
        hit = np.flatnonzero(is_ent & (np.char.endswith(names, "/" + base) | (names == base)))
        if len(hit):
            return hit
        raise ValueError(f"{spec!r}: no entity or activity with this id, key, path or name")

    # ------------------------------------------------------------------ closures
    def closure(self, start, direction: str = "backward", depth: int | None = None) -> Lineage:
        if direction not in self._csr:
            raise ValueError(f"direction must be 'backward' or 'forward', got {direction!r}")
        indptr, nbr, _ = self._csr[direction]
        start = np.unique(np.atleast_1d(np.asarray(start, np.int64)))
        level = np.full(self.n_nodes, -1, np.int64)
        level[start] = 0
        frontier, d = start, 0
        while len(frontier) and (depth is None or d < depth):
            nb = _neighbours(indptr, nbr, frontier)
            nb = np.unique(nb[level[nb] < 0])
            d += 1
            level[nb] = d
            frontier = nb
        return Lineage(self, start, level, direction)

    def lineage(self, spec, direction="backward", depth=None, cwd="") -> Lineage:
        start = spec if isinstance(spec, (np.ndarray, list, int, np.integer)) \
            else self.resolve(spec, cwd)
        return self.closure(start, direction, depth)

    def explain(self, i: int) -> dict:
        """Why the records of entity node ``i`` are one entity: the runs they come from
        and the rule that joined them (content hash, fingerprint, URI-like id, code of
        one clean commit, or kind and key within one run)."""
        n = self.node_rows([int(i)])[0]
        ident = str(n["identity"])
        runs: list[str] = []
        er = self.entity_records
        if er is not None and len(er):
            recs = np.flatnonzero(np.asarray(self.entity_of_record) == int(i))
            runs = sorted({str(x) for x in np.asarray(er["run"])[recs].tolist()})
        if ident.startswith("file:") and "#" in ident:
            rule = "the same path and content hash"
        elif ident.startswith("file:"):
            rule = "the same path, size and modification time (no hash was recorded)"
        elif ident.startswith("id:"):
            rule = "the same URI-like id"
        elif ident.startswith("code:"):
            rule = "the same script at the same clean git commit"
        else:
            rule = "the same kind and key within one run (never joined across runs)"
        return {"node": int(i), "identity": ident, "runs": runs or [str(n["run"])],
                "rule": rule}

    def label(self, i: int) -> str:
        n = self.node_rows([int(i)])[0]
        if n["type"] == "activity":
            return f"{n['kind']} {n['name']} (rank {n['rank']}, {n['rank']}:{n['id']})"
        return f"{n['kind']} {n['name']}"


def fingerprints(run, e: np.ndarray) -> np.ndarray:
    """``size:mtime_ns`` of each entity record of ``e`` whose file was stat-ed when it was
    recorded (the last value of each), '' for the others."""
    out = np.full(len(e), "", object)
    if not len(e):
        return out
    a = np.asarray(run.attributes())
    if not len(a):
        return out
    a = a[(a["role"] == "attribute") & np.isin(a["key"], ["size", "mtime_ns"])]
    if not len(a):
        return out
    ke, ka = pair_keys((e["rank"], e["id"]), (a["rank"], a["owner"]))
    order = np.argsort(ke, kind="stable")
    row = lookup(ke[order], order, ka)
    size: dict[int, object] = {}
    mtime: dict[int, object] = {}
    for r, k, v in zip(row.tolist(), a["key"].tolist(), a["value"].tolist()):
        if r >= 0:
            (size if k == "size" else mtime)[r] = v
    for r, m in mtime.items():
        if r in size:
            out[r] = f"{size[r]}:{m}"
    return out


def _edges(nodes: np.ndarray, pairs, relation: str) -> np.ndarray:
    """Edges (src, dst) of ``relation`` that the graph adds, stamped like their source."""
    extra = np.zeros(len(pairs), EDGE_DTYPE)
    extra["src"] = [a for a, _ in pairs]
    extra["dst"] = [b for _, b in pairs]
    extra["relation"] = relation
    extra["run"], extra["rank"] = nodes["run"][extra["src"]], nodes["rank"][extra["src"]]
    extra["t"] = nodes["start"][extra["src"]]
    return extra


def _attempt_links(runs, act) -> list[tuple[int, int]]:
    """(run activity of a requeued job's attempt, run activity of rank 0 of the attempt
    before it) for every rank, where both attempts are among ``runs``: wasInformedBy."""
    first: dict[str, int] = {}  # run id -> node of its rank-0 run activity
    per_run: dict[str, list[int]] = {}
    base = 0
    for run, t in zip(runs, act):
        idx = np.flatnonzero(t["type"] == "run")
        per_run[run.run_id] = (base + idx).tolist()
        zero = idx[t["rank"][idx] == 0]
        if len(zero):
            first[run.run_id] = base + int(zero[0])
        base += len(t)
    return [(a, first[run.previous_attempt]) for run in runs
            if getattr(run, "previous_attempt", "") in first for a in per_run[run.run_id]]


def revisions(nodes: np.ndarray) -> list[tuple[int, int]]:
    """(newer, older) node pairs: one path seen with different content (hash or
    fingerprint) is a sequence of versions, each a revision of the one before it."""
    ident = nodes["identity"].astype(str)
    by_path: dict[str, list[tuple[int, int]]] = {}
    for i in np.flatnonzero(np.char.startswith(ident, "file:")).tolist():
        s = ident[i][5:]
        path, sep, rest = s.partition("#")
        if not sep:
            path, _, rest = s.rpartition("@")
            when = int(rest.split(":")[1]) if ":" in rest else int(nodes["start"][i])
        else:
            when = int(nodes["start"][i])
        by_path.setdefault(path, []).append((when, i))
    out = []
    for versions in by_path.values():
        if len(versions) > 1:
            versions.sort()
            out += [(b, a) for (_, a), (_, b) in zip(versions, versions[1:])]
    return out


CODE_ID = 1 << 63  # the record id of a run's code entity (no rank's ids reach it)


def code_label(code: dict) -> tuple[str, str]:
    """The key of a run's code entity and its identity suffix (None: one per run)."""
    script = os.path.basename(code.get("script") or "") or "program"
    git = code.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return script, ""
    state = " (dirty)" if git.get("dirty") else ""
    return f"{script} @ {commit[:12]}{state}", "" if state else f"code:{script}@{commit}"


def _with_code(run, t, e, ident, r):
    """Add the run's code (script, command, git state) as an entity of kind ``code`` that
    each of its activities used: one record per rank, one logical entity per run, the same
    entity across runs of one clean commit of one script."""
    if not len(t):
        return e, ident, r
    code = run.code()
    if not (code["script"] or code["command"]):
        return e, ident, r
    key, shared = code_label(code)
    ranks, first, inverse = np.unique(t["rank"], return_index=True, return_inverse=True)
    start = np.full(len(ranks), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(start, inverse, t["start"].astype(np.int64))
    ce = np.zeros(len(ranks), e.dtype)
    ce["run"], ce["rank"], ce["id"], ce["activity"] = run.run_id, ranks, CODE_ID, 0
    ce["node"], ce["key"], ce["kind"], ce["hash"], ce["t"] = t["node"][first], key, "code", \
        "", start
    cid = np.full(len(ranks), shared or f"run:{run.run_id}:code:{key}", object)
    cr = np.zeros(len(t), r.dtype)
    cr["run"], cr["node"], cr["rank"], cr["subject"] = run.run_id, t["node"], t["rank"], t["id"]
    cr["relation"], cr["object"], cr["t"] = "used", CODE_ID, t["start"]
    return (np.concatenate([e, ce]), np.concatenate([np.asarray(ident, object), cid]),
            np.concatenate([r, cr]))


def _spellings(spec: str, cwd: str):
    yield spec
    if cwd and os.path.isabs(spec):
        yield os.path.relpath(spec, cwd)
    yield os.path.normpath(spec)


def _csr(src, dst, n):
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1) if len(src) else None
    return np.cumsum(indptr), np.asarray(dst)[order], order.astype(np.int64)


def _positions(indptr, frontier):
    """Positions in the CSR arrays of the edges of the ``frontier`` nodes."""
    lo, hi = indptr[frontier], indptr[frontier + 1]
    counts = hi - lo
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    return np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(total)


def _neighbours(indptr, nbr, frontier):
    return nbr[_positions(indptr, frontier)]


class Lineage:
    """A closure: its nodes (with ``level``, the distance from the start) and edges."""

    def __init__(self, graph: Graph, start, level, direction):
        self.graph, self.start, self.direction = graph, start, direction
        self.level = level
        inside = level >= 0
        self.node_index = np.flatnonzero(inside)
        nodes = graph.node_rows(self.node_index)
        # the edges with both ends inside: those of the inside nodes (by the backward
        # adjacency, which keys every edge by its src) whose other end is inside too
        indptr, nbr, edge = graph._csr["backward"]
        pos = _positions(indptr, self.node_index)
        self.edge_index = np.sort(edge[pos[inside[nbr[pos]]]])
        self._levels = level[inside]
        self._nodes = nodes

    @property
    def nodes(self):
        out = np.zeros(len(self._nodes), NODE_DTYPE.descr + [("level", "<i8")])
        for name in NODE_DTYPE.names:
            out[name] = self._nodes[name]
        out["level"] = self._levels
        return as_table(out[np.lexsort((out["node"], out["level"]))])

    @property
    def edges(self):
        return as_table(self.graph.edge_rows(self.edge_index))

    def activities(self):
        n = self.nodes
        return as_table(np.asarray(n)[n["type"] == "activity"])

    def entities(self):
        n = self.nodes
        return as_table(np.asarray(n)[n["type"] == "entity"])

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.activities()["rank"].tolist()))

    @property
    def hosts(self) -> list[str]:
        return sorted(set(self.activities()["host"].tolist()))

    def path(self, target) -> list[tuple]:
        """A shortest chain from the start to ``target`` (node index or spec).

        Returned as (node, relation, node) steps.
        """
        if not isinstance(target, (int, np.integer)):
            hits = [int(t) for t in self.graph.resolve(target) if self.level[t] >= 0]
            if not hits:
                raise ValueError(f"{target!r} is not in this {self.direction} lineage")
            target = min(hits, key=lambda t: self.level[t])
        e = self.graph.edge_rows(self.edge_index)
        if self.direction == "backward":
            src, dst = e["src"], e["dst"]
        else:
            src, dst = e["dst"], e["src"]
        chain, cur = [], int(target)
        while self.level[cur] > 0:
            cand = np.flatnonzero((dst == cur) & (self.level[src] == self.level[cur] - 1))
            if not len(cand):
                break
            k = cand[0]
            chain.append((int(src[k]), str(e["relation"][k]), cur))
            cur = int(src[k])
        return chain[::-1]

    def to_dict(self) -> dict:
        return {"direction": self.direction, "start": [int(s) for s in self.start],
                "nodes": self.nodes.to_dicts(), "edges": self.edges.to_dicts()}

    def to_prov(self):
        """This subgraph as a ``prov.model.ProvDocument`` (needs the ``prov`` package)."""
        return document(self.graph.runs_for_export, self.graph, lineage=self)


def graph(run_or_collection) -> Graph:
    """The lineage graph of a run or of every run in a collection, cached on it."""
    cache = getattr(run_or_collection, "_cache", None)
    if cache is not None and "graph" in cache:
        return cache["graph"]
    runs = getattr(run_or_collection, "runs", None) or [run_or_collection]
    if len(runs) == 1 and hasattr(runs[0], "attempts"):
        # a requeued job's attempt: what the attempts before it wrote (its checkpoint)
        # belongs to its lineage
        runs = runs[0].attempts() + runs
    if len(runs) == 1 and getattr(runs[0], "index", None) is not None:
        g = Graph.from_index(runs[0])
    else:
        g = Graph(runs)
    g.runs_for_export = runs
    if cache is not None:
        cache["graph"] = g
    return g


def lineage(run_or_collection, spec, direction: str = "backward", depth: int | None = None):
    """The backward or forward closure of an entity or task (id, key, path or name)."""
    runs = getattr(run_or_collection, "runs", None) or [run_or_collection]
    cwd = (runs[-1].manifest.get("meta") or {}).get("cwd", "")
    return graph(run_or_collection).lineage(spec, direction, depth, cwd)
