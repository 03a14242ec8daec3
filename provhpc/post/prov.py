"""The W3C PROV document of runs, built with the ``prov`` package.

The PROV document is built with ``prov.model`` (never hand-written) and
round-trips through ``prov.read``.  PROV-ML concepts map onto PROV types
under our namespace ``https://w3id.org/provhpc/ns#`` (prefix ``provhpc``):

=====================  ==============================================
provhpc                PROV
=====================  ==============================================
run                    Activity, ``provhpc:WorkflowExecution``
stage                  Activity, ``provhpc:LearningStageExecution``
epoch                  Activity, ``provhpc:EpochExecution``
task                   Activity, ``provhpc:TaskExecution``
data / shard / split   Entity, ``provhpc:Dataset``
hyperparameters        Entity, ``provhpc:HyperparameterSet``
checkpoint / model     Entity, ``provhpc:Model``
code                   Entity, ``prov:Plan`` + ``provhpc:Code``: script, command,
                       git commit/branch/dirty, Python and package versions; every
                       activity ``wasAssociatedWith`` its rank with it as the plan
metric series          Entity + Collection, ``provhpc:MetricSeries``
person / job / node    Agent (``prov:Person``), ``provhpc:Job``, ``provhpc:Node``
rank process           Agent, ``prov:SoftwareAgent`` + ``provhpc:RankProcess``
=====================  ==============================================

Every activity ``wasAssociatedWith`` its rank; each rank's run activity also
with its node, the job and the person; ranks ``actedOnBehalfOf`` the job and
the job the person.  ``wasInformedBy`` is stated where captured and inferred
where one activity used what another generated (``provhpc:inferred``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
from typing import TYPE_CHECKING

import numpy as np

from ..format import records as R

if TYPE_CHECKING:
    from prov.model import ProvDocument

__all__ = ["ACTIVITY_TYPES", "DATA_NS_URI", "ENTITY_TYPES", "NS_URI", "PROV_FORMATS",
           "RUN_NS_URI", "document", "serialize"]

NS_URI = "https://w3id.org/provhpc/ns#"
RUN_NS_URI = "https://w3id.org/provhpc/run/"
DATA_NS_URI = "https://w3id.org/provhpc/data/"
ACTIVITY_TYPES = {"run": "WorkflowExecution", "stage": "LearningStageExecution",
                  "epoch": "EpochExecution", "task": "TaskExecution"}
ENTITY_TYPES = {"hyperparameters": "HyperparameterSet", "checkpoint": "Model",
                "model": "Model", "code": "Code", "script": "Code", "metric": "MetricSeries"}
PROV_FORMATS = ("prov-json", "prov-n", "prov-o")


def _prov():
    try:
        import prov.model as pm
    except ImportError as exc:
        raise ImportError("PROV export needs the prov package: pip install 'provhpc[prov]'") \
            from exc
    return pm


def _local(text) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))
    return s if s[:1].isalpha() or s[:1] == "_" else f"_{s}"


def _dt_ns(ns):
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc)


def _literal(v):
    if isinstance(v, (bool, int, float, str)):
        if isinstance(v, float) and v != v:
            return "NaN"
        return v
    return str(v)


class _Builder:
    def __init__(self, runs, g, lineage=None) -> None:
        pm = _prov()
        self.pm = pm
        self.doc = pm.ProvDocument()
        self.ns = self.doc.add_namespace("provhpc", NS_URI)
        self.data_ns = self.doc.add_namespace("data", DATA_NS_URI)
        self.runs = list(runs)
        self.g = g
        self.run_ns = {}
        for i, run in enumerate(self.runs):
            prefix = "run" if len(self.runs) == 1 else f"run{i}"
            self.run_ns[run.run_id] = self.doc.add_namespace(prefix,
                                                            f"{RUN_NS_URI}{run.run_id}/")
        self.keep = None
        if lineage is not None:
            self.keep = np.zeros(len(self.g.nodes), bool)
            self.keep[lineage.node_index] = True
        self.ids: dict[int, object] = {}
        # each activity's plan: the code entity of its run (lineage.CODE_ID), which it used
        nodes, edges = np.asarray(g.nodes), np.asarray(g.edges)
        is_code = (nodes["type"] == "entity") & (nodes["kind"] == "code")
        self.code_nodes = set(np.flatnonzero(is_code).tolist())
        to_code = (edges["relation"] == R.USED) & is_code[edges["dst"]] if len(edges) else \
            np.zeros(0, bool)
        self.plan_of = dict(zip(edges["src"][to_code].tolist(), edges["dst"][to_code].tolist()))
        self.run_of = {r.run_id: r for r in self.runs}

    def t(self, name):
        return self.ns[name]

    # -------------------------------------------------------------- agents
    def agents(self, run):
        ns = self.run_ns[run.run_id]
        meta = run.metadata()
        user = meta["job"]["user"] or "unknown"
        person = self.doc.agent(ns[_local(f"person_{user}")],
                                {"prov:type": self.pm.PROV["Person"], "prov:label": user})
        job_id = meta["job"]["id"] or run.run_id
        job = self.doc.agent(ns[_local(f"job_{job_id}")], {
            "prov:type": self.t("Job"), "prov:label": f"job {job_id}",
            self.t("launcher"): meta["launcher"] or "none",
            self.t("argv"): " ".join(meta["job"]["argv"])})
        self.doc.actedOnBehalfOf(job, person)
        nodes = {n: self.doc.agent(ns[_local(f"node_{n}")], {"prov:type": self.t("Node"),
                                                             "prov:label": n})
                 for n in meta["nodes"]}
        ranks = {}
        for r in run.ranks():
            if r["role"] != "rank" or r["rank"] in ranks:
                continue
            a = self.doc.agent(ns[f"rank_{r['rank']}"], {
                "prov:type": self.pm.PROV["SoftwareAgent"], self.t("kind"): "RankProcess",
                "prov:label": f"rank {r['rank']}", self.t("rank"): r["rank"],
                self.t("node"): r["node"], self.t("pid"): r["pid"],
                self.t("status"): r["status"]})
            self.doc.actedOnBehalfOf(a, job)
            ranks[r["rank"]] = a
        return person, job, nodes, ranks

    # -------------------------------------------------------------- nodes
    def node_id(self, i: int):
        if i in self.ids:
            return self.ids[i]
        n = self.g.nodes[i]
        ns = self.run_ns[n["run"]]
        if n["type"] == "activity":
            qn = ns[f"a{n['rank']}_{n['id']}"]
        else:
            ident = str(n["identity"])
            if ident.startswith("run:") and n["kind"] == "code":
                qn = ns["code"]
            elif ident.startswith("run:"):
                qn = ns[f"e{n['rank']}_{n['id']}"]
            else:
                digest = hashlib.sha1(ident.encode()).hexdigest()[:20]
                qn = self.data_ns[f"{_local(os.path.basename(str(n['name'])))}_{digest}"]
        self.ids[i] = qn
        return qn

    def add_nodes(self, attrs_by_owner, ranks, nodes, job, person):
        nodes_t = np.asarray(self.g.nodes)
        for i in range(len(nodes_t)):
            if self.keep is not None and not self.keep[i]:
                continue
            n = nodes_t[i]
            owner = attrs_by_owner.get((n["run"], int(n["rank"]), int(n["id"])), {})
            extra = {self.t(_local(k)): _literal(v) for k, v in owner.items()}
            if n["type"] == "activity":
                kind = str(n["kind"])
                attrs = {"prov:type": self.t(ACTIVITY_TYPES.get(kind, "TaskExecution")),
                         "prov:label": str(n["name"]), self.t("rank"): int(n["rank"]),
                         self.t("node"): str(n["host"]), self.t("status"): str(n["status"]),
                         **extra}
                end = _dt_ns(int(n["end"])) if n["end"] >= 0 else None
                act = self.doc.activity(self.node_id(i), _dt_ns(int(n["start"])), end, attrs)
                rank_agent = ranks.get(int(n["rank"]))
                plan = self.plan_of.get(i)
                if rank_agent is not None:  # the rank process ran it, following the code
                    self.doc.wasAssociatedWith(act, rank_agent,
                                               self.node_id(plan) if plan is not None else None)
                if kind == "run":
                    if str(n["host"]) in nodes:
                        self.doc.wasAssociatedWith(act, nodes[str(n["host"])])
                    self.doc.wasAssociatedWith(act, job)
                    self.doc.wasAssociatedWith(act, person)
            else:
                kind = str(n["kind"])
                attrs = {"prov:type": self.t(ENTITY_TYPES.get(kind, "Dataset")),
                         "prov:label": str(n["name"]), self.t("key"): str(n["name"]),
                         self.t("kind"): kind, **extra}
                if n["hash"]:
                    attrs[self.t("hash")] = str(n["hash"])
                if kind == "code":
                    self.doc.entity(self.node_id(i), [("prov:type", self.pm.PROV["Plan"]),
                                                      *attrs.items(),
                                                      *self.code_attributes(str(n["run"]))])
                    continue
                self.doc.entity(self.node_id(i), attrs)

    def code_attributes(self, run_id: str) -> list:
        """The code entity's attributes: script, command, git state, Python, packages."""
        run = self.run_of.get(run_id)
        if run is None:
            return []
        code, env = run.code(), run.environment()
        out = [(self.t("script"), code["script"]), (self.t("command"), " ".join(code["command"])),
               (self.t("cwd"), code["cwd"])]
        git = code["git"] or {}
        for k in ("commit", "branch", "dirty"):
            if git.get(k) is not None:
                out.append((self.t(f"git_{k}"), _literal(git[k])))
        out.append((self.t("python"), str((env["python"] or {}).get("version", ""))))
        out += [(self.t(f"version_{_local(k)}"), str(v)) for k, v in env["packages"].items()]
        return out

    def add_edges(self) -> None:
        e = np.asarray(self.g.edges)
        if self.keep is not None and len(e):
            e = e[self.keep[e["src"]] & self.keep[e["dst"]]]
        gen_by: dict[int, list] = {}
        for src, rel, dst, t in zip(e["src"].tolist(), e["relation"].tolist(),
                                    e["dst"].tolist(), e["t"].tolist()):
            if rel == R.USED and dst in self.code_nodes:
                continue  # stated as the plan of the activity's association
            s, d = self.node_id(src), self.node_id(dst)
            when = _dt_ns(t)
            if rel == R.USED:
                self.doc.used(s, d, when)
            elif rel == R.WAS_GENERATED_BY:
                self.doc.wasGeneratedBy(s, d, when)
                gen_by.setdefault(src, []).append(dst)
            elif rel == R.WAS_DERIVED_FROM:
                self.doc.wasDerivedFrom(s, d)
            elif rel == R.WAS_INFORMED_BY:
                self.doc.wasInformedBy(s, d)
            elif rel == R.HAD_MEMBER:
                self.doc.hadMember(s, d)
            elif rel == R.WAS_REVISION_OF:  # a newer version of the same path
                self.doc.wasDerivedFrom(s, d, other_attributes={
                    "prov:type": self.pm.PROV["Revision"]})
            else:
                self.doc.influence(s, d, other_attributes={self.t("relation"): rel})
        seen = set()
        for src, rel, dst in zip(e["src"].tolist(), e["relation"].tolist(), e["dst"].tolist()):
            if rel != R.USED or dst in self.code_nodes:
                continue
            for gen in gen_by.get(dst, ()):
                if gen != src and (src, gen) not in seen:
                    seen.add((src, gen))
                    self.doc.wasInformedBy(self.node_id(src), self.node_id(gen),
                                           other_attributes={self.t("inferred"): True})

    def add_metrics(self, run, ranks) -> None:
        """Per activity and metric name an entity; per rank and name a series collection."""
        ns = self.run_ns[run.run_id]
        m = np.asarray(run.metrics())
        if not len(m):
            return
        t_nodes = np.asarray(self.g.nodes)
        act_index = {(r, i): k for k, (r, i, ty, rid) in enumerate(zip(
            t_nodes["rank"].tolist(), t_nodes["id"].tolist(), t_nodes["type"].tolist(),
            t_nodes["run"].tolist())) if ty == "activity" and rid == run.run_id}
        names, inv = np.unique(m["name"].astype(str), return_inverse=True)
        key = np.stack([m["rank"].astype(np.int64), m["activity"].astype(np.int64), inv], 1)
        groups, gi = np.unique(key, axis=0, return_inverse=True)
        gi = gi.ravel()
        series: dict[tuple, object] = {}
        for g, (rank, act, ni) in enumerate(groups.tolist()):
            a = act_index.get((rank, act))
            if a is None or (self.keep is not None and not self.keep[a]):
                continue
            vals = m["value"][gi == g]
            steps = m["step"][gi == g]
            name = names[ni]
            ent = self.doc.entity(ns[_local(f"m{rank}_{act}_{name}")], {
                "prov:type": self.t("Metric"), "prov:label": name, self.t("rank"): rank,
                self.t("count"): len(vals), self.t("last"): _literal(float(vals[-1])),
                self.t("min"): _literal(float(np.nanmin(vals))),
                self.t("max"): _literal(float(np.nanmax(vals))),
                self.t("last_step"): int(steps[-1]) if steps[-1] != R.NO_STEP else -1})
            self.doc.wasGeneratedBy(ent, self.node_id(a))
            sk = (rank, name)
            if sk not in series:
                series[sk] = self.doc.collection(ns[_local(f"series_{rank}_{name}")], {
                    "prov:type": self.t("MetricSeries"), "prov:label": f"{name} rank {rank}"})
                if rank in ranks:
                    self.doc.wasAttributedTo(series[sk], ranks[rank])
            self.doc.hadMember(series[sk], ent)


def document(runs, g, lineage=None) -> ProvDocument:
    """A ``prov.model.ProvDocument`` of ``runs`` whose lineage graph is ``g`` (or, with
    ``lineage``, of that subgraph of ``g`` only)."""
    runs = list(runs)
    b = _Builder(runs, g, lineage)
    attrs_by_owner: dict[tuple, dict] = {}
    for run in runs:
        a = np.asarray(run.attributes())
        for rank, owner, key, value in zip(a["rank"].tolist(), a["owner"].tolist(),
                                           a["key"].tolist(), a["value"].tolist()):
            if key != "hash" and value is not None:
                attrs_by_owner.setdefault((run.run_id, rank, owner), {})[key] = value
    agents = {}
    for run in runs:
        agents[run.run_id] = b.agents(run)
    merged_ranks, merged_nodes = {}, {}
    person, job = None, None
    for run in runs:
        p, j, nodes, ranks = agents[run.run_id]
        person, job = person or p, job or j
    # associations per run: each activity with its own run's agents
    for run in runs:
        p, j, nodes, ranks = agents[run.run_id]
        sub_keep = b.keep
        run_mask = np.asarray(b.g.nodes)["run"] == run.run_id
        b.keep = run_mask if sub_keep is None else (sub_keep & run_mask)
        b.add_nodes(attrs_by_owner, ranks, nodes, j, p)
        b.keep = sub_keep
        merged_ranks.update(ranks)
        merged_nodes.update(nodes)
    b.add_edges()
    for run in runs:
        b.add_metrics(run, agents[run.run_id][3])
    return b.doc


def _text(doc: ProvDocument, **options) -> str:
    text = doc.serialize(**options)
    assert text is not None  # prov returns the text when given no destination
    return text


def serialize(doc: ProvDocument, fmt: str) -> str:
    if fmt == "prov-json":
        return _text(doc, format="json", indent=1)
    if fmt == "prov-n":
        return doc.get_provn()
    if fmt == "prov-o":
        try:
            import rdflib  # noqa: F401
        except ImportError as exc:
            raise ImportError("PROV-O export needs rdflib: pip install rdflib") from exc
        return _text(doc, format="rdf", rdf_format="turtle")
    raise ValueError(f"unknown PROV format {fmt!r}")
