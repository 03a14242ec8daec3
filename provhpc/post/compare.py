"""``provhpc compare``: what differs between runs.

Sections, each a list of ``{"key", "values": [one per run], "differs"}`` rows:

* ``hyperparameters`` (``set.key`` when a run logs several sets) and ``configuration``;
* ``code``: script, git commit, branch, dirty state and the changed files;
* ``environment``: Python and package versions;
* ``launch``: launcher, nodes and ranks;
* ``inputs``: each input by key, with its identity (content hash, else absolute path, size
  and mtime) per run, and
  ``same``, ``changed`` or ``new`` against the first run;
* ``end``: how each run ended;
* ``stages``: wall time per stage (the slowest rank, stages of one name summed);
* ``metrics``: final (mean over ranks of each rank's last value) and best value of each
  metric (min for a loss, an error or a time, else max).

Stage times and metrics are measurements: they are always shown.  The other sections
show only what differs unless ``everything``.
"""

from __future__ import annotations

import json

import numpy as np

from .questions import io_entities

__all__ = ["MEASURED", "compare"]

MEASURED = ("stages", "metrics")


def _flat(prefix: str, d: dict, out: dict) -> None:
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flat(key + ".", v, out)
        else:
            out[key] = v


def _hyper(run) -> dict:
    sets = run.hyperparameters()
    out: dict = {}
    for h in sets:
        _flat("" if len({s["key"] for s in sets}) == 1 else f"{h['key']}.", h["values"], out)
    return out


def _code(run) -> dict:
    c = run.code()
    git = c["git"] or {}
    return {"script": c["script"], "command": " ".join(c["command"]),
            "git commit": git.get("commit"), "git branch": git.get("branch"),
            "git dirty": git.get("dirty"), "changed files": ", ".join(git.get("changed", []))
            or None}


def _env(run) -> dict:
    e = run.environment()
    return {"python": (e["python"] or {}).get("version"),
            **{k: v for k, v in (e["packages"] or {}).items()}}


def _launch(run) -> dict:
    m = run.metadata()
    return {"launcher": m["launcher"] or None, "nodes": len(m["nodes"]),
            "node names": ", ".join(m["nodes"]), "ranks": m["world_size"] or len(m["ranks"]),
            "job id": m["job"]["id"] or None}


def _inputs(run) -> dict:
    inputs, _ = io_entities(run)
    # the key names the file; its identity is what can change: the content hash, else
    # the absolute path with size and mtime (file:PATH@SIZE:MTIME_NS), else a URI-like id
    return {f"{i['kind']} {i['key']}": i["hash"] or _fingerprint(i["identity"])
            for i in inputs}


def _fingerprint(identity: str) -> str:
    if identity.startswith("file:") and "@" in identity:
        path, _, fp = identity[5:].rpartition("@")
        size, _, mtime = fp.partition(":")
        return f"{path} size {size} mtime_ns {mtime}"
    return identity if identity.startswith("id:") else "(key only)"


def _stages(run) -> dict:
    t = np.asarray(run.tasks())
    t = t[(t["type"] == "stage") & (t["end"] >= 0)]
    per: dict[str, dict[int, float]] = {}
    for name, rank, d in zip(t["name"].tolist(), t["rank"].tolist(),
                             t["duration_s"].tolist()):
        per.setdefault(name, {})
        per[name][rank] = per[name].get(rank, 0.0) + d
    return {f"{n} (s)": round(max(v.values()), 4) for n, v in per.items()}


def _metrics(run) -> dict:
    m = np.asarray(run.metrics())
    if not len(m):
        return {}
    m = m[~np.char.startswith(m["name"].astype(str), "telemetry.")]
    out: dict = {}
    for name in sorted(set(m["name"].tolist())):
        sel = m[m["name"] == name]
        last = []
        for rank in sorted(set(sel["rank"].tolist())):
            r = sel[sel["rank"] == rank]
            last.append(float(r["value"][np.argmax(r["t"])]))
        lower = any(w in name.lower() for w in ("loss", "error", "err", "seconds", "time"))
        values = sel["value"][np.isfinite(sel["value"])]
        out[f"{name} final"] = round(float(np.mean(last)), 6)
        if len(values):
            out[f"{name} best ({'min' if lower else 'max'})"] = round(
                float(values.min() if lower else values.max()), 6)
    return out


def _config(run) -> dict:
    out: dict = {}
    _flat("", run.metadata()["config"], out)
    out.pop("run_id", None)  # each run's own name: the header lists them
    return out


SECTIONS = {"hyperparameters": _hyper, "configuration": _config, "code": _code,
            "environment": _env, "launch": _launch, "inputs": _inputs,
            "end": lambda r: dict(r.end()), "stages": _stages, "metrics": _metrics}


def _same(values: list) -> bool:
    keyed = [json.dumps(v, sort_keys=True, default=str) for v in values]
    return len(set(keyed)) == 1


def compare(runs, everything: bool = False) -> dict:
    """What differs between ``runs`` (two or more ``Run``), section by section."""
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError("compare needs two runs or more (a directory of runs, or RUN RUN)")
    out: dict = {"runs": [r.run_id for r in runs], "sections": {}}
    for name, fn in SECTIONS.items():
        per = [fn(r) for r in runs]
        keys = list(dict.fromkeys(k for p in per for k in p))
        rows = []
        for k in keys:
            values = [p.get(k) for p in per]
            row = {"key": k, "values": values, "differs": not _same(values)}
            if name == "inputs":
                row["vs_first"] = ["" if i == 0 else
                                   ("new" if values[0] is None else
                                    "gone" if v is None else
                                    "same" if v == values[0] else "changed")
                                   for i, v in enumerate(values)]
            if everything or row["differs"] or name in MEASURED:
                rows.append(row)
        out["sections"][name] = rows
    out["differences"] = sum(r["differs"] for n, rows in out["sections"].items()
                             if n not in MEASURED for r in rows)
    return out
