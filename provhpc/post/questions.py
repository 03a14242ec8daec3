"""The questions provhpc answers about a run (or a directory of runs).

Each is a function of a ``Run`` (``best`` of a ``Collection``) returning
plain data — dicts and ``Table`` rows — so the CLI prints the same thing as
JSON or text.  docs/queries.md shows each on the demo run.
"""

from __future__ import annotations

import os

import numpy as np

from ..format import records as R
from .lineage import graph, lineage
from .query import attributes_of
from .tables import as_table, field_names, pair_keys

__all__ = [
    "CODE_KINDS", "MODEL_KINDS", "best", "capture_stats", "check_metrics", "derivation",
    "epoch_metrics", "failures", "hyperparameters_for", "io_entities", "lagging_ranks",
    "produced", "stage_times", "stragglers"
]

CODE_KINDS = ("code", "script", "software", "source")


def _runs(source):
    """The runs of a Run, a Collection or a list of runs."""
    if isinstance(source, (list, tuple)):
        return list(source)
    return getattr(source, "runs", None) or [source]


def check_metrics(source, names) -> None:
    """Raise ValueError naming the known metrics when a name in ``names`` is in no run:
    a typo is an error, never an empty answer."""
    known: set = set()
    for run in _runs(source):
        known.update(np.unique(np.asarray(run.metrics()["name"], object).astype(str)).tolist())
    for name in names or ():
        if name not in known:
            listed = ", ".join(sorted(known)) or "none (the run has no metrics)"
            raise ValueError(f"unknown metric {name!r}; the metrics of this run: {listed}")


# ---------------------------------------------------------------------- 1. produced
def produced(source, spec) -> dict:
    """Which hyperparameters, data and code produced ``spec``, on which ranks and nodes."""
    lin = lineage(source, spec)
    runs = {r.run_id: r for r in _runs(source)}
    hyper, data, code = [], [], []
    for n in lin.entities().to_dicts():
        if n["level"] == 0:
            continue
        run = runs[n["run"]]
        item = {"key": n["name"], "kind": n["kind"], "run": n["run"],
                "id": f"{n['rank']}:{n['id']}", "level": n["level"]}
        if n["hash"]:
            item["hash"] = n["hash"]
        if n["kind"] == "hyperparameters":
            item["values"] = attributes_of(run, n["rank"], n["id"])
            hyper.append(item)
        elif n["kind"] in CODE_KINDS:
            code.append(item)
        else:
            data.append(item)
    acts = lin.activities()
    params: dict[str, dict] = {}
    for a in acts.to_dicts():
        p = attributes_of(runs[a["run"]], a["rank"], a["id"], role="parameter")
        if p:
            params.setdefault(a["name"], p)
    for run_id in sorted(set(acts["run"].tolist()) | set(lin.nodes["run"].tolist())):
        meta = runs[run_id].metadata()
        argv = meta["job"]["argv"]
        script = next((a for a in argv[1:] if a.endswith(".py")), argv[0] if argv else "")
        code.append({"run": run_id, "program": script, "argv": argv, "cwd": meta["job"]["cwd"],
                     "versions": meta["versions"]})
    target = lin.nodes[0]
    return {
        "target": {"key": target["name"], "kind": target["kind"], "run": target["run"],
                   "hash": target["hash"]},
        "hyperparameters": hyper, "data": data, "code": code, "parameters": params,
        "activities": [{"run": a["run"], "type": a["kind"], "name": a["name"],
                        "rank": a["rank"], "node": a["host"], "id": f"{a['rank']}:{a['id']}"}
                       for a in acts.to_dicts()],
        "ranks": lin.ranks, "nodes": lin.hosts,
    }


# ---------------------------------------------------------------------- 2. derivation
def derivation(source, target, origin=None) -> dict:
    """The derivation chain of ``target`` back to ``origin`` (default: every raw origin).

    The closure follows wasDerivedFrom, used and wasGeneratedBy backwards;
    ``chains`` lists one shortest chain per origin entity (an entity with
    nothing further back).
    """
    lin = lineage(source, target)
    g = graph(source)
    if origin is not None:
        origins = [origin]
    else:
        has_back = np.zeros(g.n_nodes, bool)
        has_back[g.edge_column("src")] = True
        ents = lin.entities()
        origins = [int(n) for n in ents["node"] if not has_back[n]]
    chains = []
    for o in origins:
        steps = lin.path(o)
        if steps or origin is not None:
            chains.append([{"from": g.label(a), "relation": rel, "to": g.label(b)}
                           for a, rel, b in steps])
    return {"target": g.label(lin.start[0]), "closure_nodes": len(lin.nodes),
            "closure_edges": len(lin.edges), "chains": chains}


# ---------------------------------------------------------------------- 3. metrics per epoch
def _activity_info(run, m):
    """Type, name, index and parent of each metric row's activity (vectorised join)."""
    t = np.asarray(run.tasks())
    km, kt = pair_keys((m["rank"], m["activity"]), (t["rank"], t["id"]))
    order = np.argsort(kt, kind="stable")
    pos = np.clip(np.searchsorted(kt[order], km), 0, max(len(kt) - 1, 0))
    ok = (kt[order][pos] == km) if len(kt) else np.zeros(len(km), bool)
    j = order[pos]
    return t, j, ok


def epoch_metrics(run, names=None) -> np.ndarray:
    """Per rank, epoch and metric: last value, mean and count of the points.

    The epoch of a point is the index of its epoch activity; a point logged
    under another activity (a validate stage) with a step counts at that step.
    """
    check_metrics(run, names)
    m = np.asarray(run.metrics())
    if names:
        m = m[np.isin(m["name"], list(names))]
    t, j, ok = _activity_info(run, m)
    is_epoch = ok & (t["type"][j] == "epoch") if len(t) else np.zeros(len(m), bool)
    epoch = np.where(is_epoch, t["index"][j] if len(t) else 0,
                     np.where(m["step"] != R.NO_STEP, m["step"], -1))
    keep = epoch >= 0
    m, epoch = m[keep], epoch[keep]
    out_dtype = [("rank", "<i4"), ("epoch", "<i8"), ("name", "O"), ("last", "<f8"),
                 ("mean", "<f8"), ("count", "<i8")]
    if not len(m):
        return as_table(np.zeros(0, out_dtype))
    names_u, name_i = np.unique(m["name"].astype(str), return_inverse=True)
    order = np.lexsort((m["t"], name_i, epoch, m["rank"]))
    key = np.stack([m["rank"][order], epoch[order], name_i[order]], 1)
    starts = np.flatnonzero(np.r_[True, np.any(key[1:] != key[:-1], axis=1)])
    ends = np.r_[starts[1:], len(order)]
    vals = m["value"][order]
    out = np.zeros(len(starts), out_dtype)
    out["rank"], out["epoch"] = key[starts, 0], key[starts, 1]
    out["name"] = names_u[key[starts, 2]].astype(object)
    out["last"] = vals[ends - 1]
    out["count"] = ends - starts
    out["mean"] = np.add.reduceat(vals, starts) / out["count"]
    return as_table(out)


def lagging_ranks(run, metric="epoch_loss", higher_is_better=False, tolerance=0.05) -> list:
    """Ranks whose ``metric`` in the last epoch is worse than the median of all ranks.

    Worse by more than ``tolerance`` (relative): these ranks' shards or
    replicas lag behind the others.
    """
    em = np.asarray(epoch_metrics(run, [metric]))
    if not len(em):
        return []
    last = em[em["epoch"] == em["epoch"].max()]
    med = float(np.median(last["last"]))
    sign = -1.0 if higher_is_better else 1.0
    gap = sign * (last["last"] - med) / (abs(med) or 1.0)
    lag = last[gap > tolerance]
    return [{"rank": int(r["rank"]), "epoch": int(r["epoch"]), "metric": metric,
             "value": float(r["last"]), "median": med, "worse_by": float(g)}
            for r, g in zip(lag, gap[gap > tolerance])]


# ---------------------------------------------------------------------- 4. best across runs
def best(collection, metric="val_accuracy", mode="max") -> list:
    """For each run: its best ``metric`` and the hyperparameters that produced it, best first."""
    if mode not in ("max", "min"):
        raise ValueError(f"bad mode {mode!r}: expected max or min")
    check_metrics(collection, [metric])
    rows = []
    for run in _runs(collection):
        m = np.asarray(run.metrics())
        m = m[m["name"] == metric]
        if not len(m):
            continue
        i = int(np.argmax(m["value"]) if mode == "max" else np.argmin(m["value"]))
        row = m[i]
        hp = hyperparameters_for(run, int(row["rank"]), int(row["activity"]))
        rows.append({"run": run.run_id, "metric": metric, "value": float(row["value"]),
                     "epoch": _epoch_of(run, int(row["rank"]), int(row["activity"]),
                                        int(row["t"])),
                     "step": None if row["step"] == R.NO_STEP else int(row["step"]),
                     "rank": int(row["rank"]), "hyperparameters": hp})
    rows.sort(key=lambda r: r["value"], reverse=mode == "max")
    flat = [_flatten(r["hyperparameters"]) for r in rows]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    for r, f in zip(rows, flat):  # the settings that tell the runs apart
        r["varying"] = {k: f.get(k) for k in varying}
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _epoch_of(run, rank: int, activity: int, when: int) -> int | None:
    """The index of the epoch ``activity`` is (or is in); else of the rank's last epoch
    that started before ``when`` (a validation stage beside the epochs); else None."""
    t = np.asarray(run.tasks())
    t = t[t["rank"] == rank]
    rows = {int(i): (str(ty), int(ix), int(p)) for i, ty, ix, p in
            zip(t["id"].tolist(), t["type"].tolist(), t["index"].tolist(),
                t["parent"].tolist())}
    cur, seen = activity, set()
    while cur in rows and cur not in seen:
        seen.add(cur)
        kind, index, parent = rows[cur]
        if kind == "epoch" and index != R.NO_STEP:
            return index
        cur = parent
    ep = t[(t["type"] == "epoch") & (t["start"] <= when) & (t["index"] != R.NO_STEP)]
    return int(ep["index"][np.argmax(ep["start"])]) if len(ep) else None


def hyperparameters_for(run, rank: int, activity: int) -> dict:
    """The hyperparameters used by ``activity`` or its nearest ancestor that used some."""
    t = np.asarray(run.tasks())
    t = t[t["rank"] == rank]
    parents = dict(zip(t["id"].tolist(), t["parent"].tolist()))
    rel = np.asarray(run.relations())
    rel = rel[(rel["rank"] == rank) & (rel["relation"] == R.USED)]
    e = np.asarray(run.entities())
    hps = set(e["id"][(e["rank"] == rank) & (e["kind"] == "hyperparameters")].tolist())
    cur, seen = activity, set()
    while cur and cur not in seen:
        seen.add(cur)
        used = [o for o in rel["object"][rel["subject"] == cur].tolist() if o in hps]
        if used:
            out = {}
            for h in used:
                out.update(attributes_of(run, rank, h))
            return out
        cur = parents.get(cur, 0)
    return {}


# ---------------------------------------------------------------------- 5. wall time
def stage_times(run, types=("stage", "epoch")) -> np.ndarray:
    """Wall time of each learning stage and epoch per rank (seconds), in start order."""
    t = np.asarray(run.tasks())
    t = t[np.isin(t["type"], list(types))]
    t = t[np.lexsort((t["start"], t["rank"]))]
    out = np.zeros(len(t), [("rank", "<i4"), ("node", "O"), ("type", "O"), ("name", "O"),
                            ("index", "<i8"), ("duration_s", "<f8"), ("status", "O")])
    for col in field_names(out):
        out[col] = t[col]
    out["index"] = np.where(t["index"] == R.NO_STEP, -1, t["index"])
    return as_table(out)


def stragglers(run, threshold=0.2, min_s=0.001, types=("stage", "epoch", "task")) -> list:
    """Ranks that took longer than the median rank by more than ``threshold`` (relative).

    Activities are compared across ranks by (type, name, index, occurrence);
    ``min_s`` ignores gaps too small to matter.
    """
    t = np.asarray(run.tasks())
    t = t[np.isin(t["type"], list(types)) & (t["end"] >= 0)]
    if not len(t):
        return []
    t = t[np.lexsort((t["start"], t["rank"]))]
    label = (t["type"].astype(str) + "\0" + t["name"].astype(str) + "\0"
             + t["index"].astype(str))
    # occurrence number of each label within its rank (validate #0, #1, ...)
    key = t["rank"].astype(str).astype(object) + "\0" + label
    _, inv = np.unique(key.astype(str), return_inverse=True)
    occ = np.zeros(len(t), np.int64)
    counts: dict[int, int] = {}
    for i, g in enumerate(inv.tolist()):  # per activity row, not per record
        occ[i] = counts.get(g, 0)
        counts[g] = occ[i] + 1
    group_key = label + "\0" + occ.astype(str)
    groups, gi = np.unique(group_key.astype(str), return_inverse=True)
    out = []
    for g in range(len(groups)):
        rows = t[gi == g]
        if len(rows) < 2:
            continue
        med = float(np.median(rows["duration_s"]))
        slow = rows[(rows["duration_s"] > med * (1 + threshold))
                    & (rows["duration_s"] - med > min_s)]
        for r in slow:
            out.append({"rank": int(r["rank"]), "node": r["node"], "type": r["type"],
                        "name": r["name"],
                        "index": None if r["index"] == R.NO_STEP else int(r["index"]),
                        "duration_s": float(r["duration_s"]), "median_s": med,
                        "slower_by": float(r["duration_s"] / med - 1) if med else None})
    out.sort(key=lambda r: -(r["duration_s"] - r["median_s"]))
    return out


# ---------------------------------------------------------------------- 6. failures
def failures(run) -> list:
    """Failed (or never ended) activities: rank, node, exception type and message, last inputs.

    While the run is live, an open activity of a running rank is running, not a failure."""
    t = np.asarray(run.tasks())
    bad = t[t["status"] != "ok"]
    if not len(bad):
        return []
    e = np.asarray(run.entities())
    rel = np.asarray(run.relations())
    rel = rel[rel["relation"] == R.USED]
    rank_status = {r["rank"]: r["status"] for r in run.ranks() if r["role"] == "rank"}
    live = bool(getattr(run, "live", False))
    out = []
    for row in bad:  # one per failed activity
        rank = int(row["rank"])
        status = row["status"]
        if status == "open" and live and rank_status.get(rank) == "running":
            continue  # still running, not a failure
        if status == "open" and rank_status.get(rank) in ("killed", "error", "lost"):
            status = f"open, rank {rank_status[rank]}"
        mine = t[t["rank"] == rank]
        parents = dict(zip(mine["id"].tolist(), mine["parent"].tolist()))
        msg = attributes_of(run, rank, int(row["id"])).get("exception", "")
        inputs: list[dict[str, str]] = []
        cur, via = int(row["id"]), None
        while cur and not inputs:
            objs = rel["object"][(rel["rank"] == rank) & (rel["subject"] == cur)]
            ents = e[(e["rank"] == rank) & np.isin(e["id"], objs)]
            inputs = [{"key": k, "kind": kd} for k, kd in zip(ents["key"], ents["kind"])]
            via = cur if inputs else None
            cur = parents.get(cur, 0)
        via_name = mine["name"][mine["id"] == via][0] if via else None
        out.append({"rank": rank, "node": row["node"], "type": row["type"],
                    "name": row["name"], "id": f"{rank}:{row['id']}", "status": status,
                    "exception": row["error"], "message": msg, "last_inputs": inputs,
                    "inputs_of": via_name})
    return out


# ---------------------------------------------------------------------- 7. capture statistics
def capture_stats(run) -> dict:
    """Records/s per rank, bytes per record, drops and their reasons."""
    drops = run.drops()
    by_proc: dict[tuple, dict] = {}
    for d in drops:
        mine = by_proc.setdefault((d["rank"], d["pid"]), {})
        mine[d["reason"]] = mine.get(d["reason"], 0) + d["count"]
    ranks = []
    for r in run.ranks():
        dur = (r["end"] - r["start"]) / 1e9 if r["end"] > r["start"] else 0.0
        ranks.append({"rank": r["rank"], "pid": r["pid"], "role": r["role"], "node": r["node"],
                      "records": r["records"], "seconds": round(dur, 6),
                      "records_per_s": round(r["records"] / dur, 1) if dur else None,
                      "dropped": r["dropped"], "salvaged": r["salvaged"],
                      "drops": by_proc.get((r["rank"], r["pid"]), {})})
    parts = []
    total_records = total_file = 0
    for p in run.partitions:
        size = os.path.getsize(p.path)
        n = len(p)
        c = p.counters()
        senders = p.senders(n)  # the records no process sent: the aggregator's samples
        parts.append({"node": p.node, "path": p.path, "records": n,
                      "telemetry_records": int((senders[1] < 0).sum()) if senders else None,
                      "file_bytes": size,
                      "file_bytes_per_record": round(size / n, 2) if n else None,
                      "record_bytes": R.RECORD_SIZE, "strings": c.get("strings", 0),
                      "string_heap_bytes": int(p.f["string_heap"].shape[0]),
                      "sequence_gaps": c.get("sequence_gaps", 0),
                      "malformed_frames": c.get("malformed_frames", 0)})
        total_records += n
        total_file += size
    reasons: dict[str, int] = {}
    for d in drops:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + d["count"]
    return {"ranks": ranks, "partitions": parts, "records": total_records,
            "file_bytes_per_record": round(total_file / total_records, 2) if total_records
            else None,
            "dropped_total": sum(reasons.values()), "dropped_by_reason": reasons}


# ---------------------------------------------------------------------- inputs, outputs
MODEL_KINDS = ("checkpoint", "model")


def io_entities(run, g=None) -> tuple[list[dict], list[dict]]:
    """The run's inputs (entities it used and did not generate) and outputs (entities it
    generated and nothing of it used, plus every checkpoint and model), with identities."""
    g = g or graph(run)
    nodes, edges = np.asarray(g.nodes), np.asarray(g.edges)
    is_ent = (nodes["type"] == "entity") & (nodes["kind"] != "code")
    generated = np.zeros(len(nodes), bool)
    used = np.zeros(len(nodes), bool)
    if len(edges):
        generated[edges["src"][edges["relation"] == R.WAS_GENERATED_BY]] = True
        used[edges["dst"][edges["relation"] == R.USED]] = True
        used[edges["dst"][edges["relation"] == R.WAS_DERIVED_FROM]] = True
    inputs = np.flatnonzero(is_ent & ~generated & used)
    outputs = np.flatnonzero(is_ent & generated & (~used | np.isin(nodes["kind"],
                                                                    MODEL_KINDS)))

    def rows(idx):
        return [{"kind": str(nodes["kind"][i]), "key": str(nodes["name"][i]),
                 "hash": str(nodes["hash"][i]), "id": f"{nodes['rank'][i]}:{nodes['id'][i]}",
                 "identity": str(nodes["identity"][i]), "node": int(i)} for i in idx]

    return rows(inputs), rows(outputs)
