"""The live view of a run: ``provhpc watch`` and ``Run.snapshot()``.

A snapshot is read from the partitions alone (SWMR: they are consistent at every
flush), so it needs no socket to the job and works from a login node on the shared
file system.  Per rank: its node, the stage it is in (or was in last), its epoch and
step, the latest value of each metric, its records, drops, step rate and the seconds
since its last record; ranks that lag (behind the median step) or have gone silent
(no record for ``SILENT_S``) are marked.  Job-wide: progress, drops and the nodes'
telemetry.
"""

from __future__ import annotations

import time

import numpy as np

from ..format import records as R

__all__ = ["SILENT_S", "snapshot", "text"]

SILENT_S = 60.0  # a running rank without a record for this long is marked silent


def _latest(rows: np.ndarray, key: str) -> dict:
    """The row with the largest ``key`` of each rank."""
    out: dict[int, np.void] = {}
    if not len(rows):
        return out
    order = np.lexsort((rows[key], rows["rank"]))
    rows = rows[order]
    last = np.flatnonzero(np.append(rows["rank"][1:] != rows["rank"][:-1], True))
    for i in last.tolist():
        out[int(rows["rank"][i])] = rows[i]
    return out


def snapshot(run, now_ns: int | None = None) -> dict:
    """What each rank of ``run`` is doing, as of its partitions' last flush."""
    now_ns = now_ns or time.time_ns()
    tasks = np.asarray(run.tasks())
    metrics = np.asarray(run.metrics())
    ranks_meta = {r["rank"]: r for r in run.ranks() if r["role"] == "rank"}
    stages = tasks[tasks["type"] == "stage"]
    epochs = tasks[tasks["type"] == "epoch"]
    open_stage = _latest(stages[stages["end"] < 0], "start")
    last_stage = _latest(stages, "start")
    last_epoch = _latest(epochs, "start")
    tel = np.char.startswith(metrics["name"].astype(str), "telemetry.") if len(metrics) \
        else np.zeros(0, bool)
    ml = metrics[~tel]
    stepped = ml[ml["step"] != R.NO_STEP]
    last_step = _latest(stepped, "step")
    stored: dict[int, int] = {}  # records stored per rank (a killed rank's count is 0)
    for p in run.partitions:
        try:
            ranks, counts = np.unique(p.column("rank"), return_counts=True)
        except Exception:  # noqa: BLE001 - the partition is named in run.errors
            continue
        for k, c in zip(ranks.tolist(), counts.tolist()):
            stored[k] = stored.get(k, 0) + c
    rows = []
    all_ranks = sorted(set(ranks_meta) | set(tasks["rank"].tolist()) | set(ml["rank"].tolist()))
    for rank in all_ranks:
        meta = ranks_meta.get(rank, {})
        mine = ml[ml["rank"] == rank]
        latest: dict[str, float] = {}
        if len(mine):
            order = np.lexsort((mine["t"], mine["name"]))
            m = mine[order]
            ends = np.flatnonzero(np.append(m["name"][1:] != m["name"][:-1], True))
            latest = {str(m["name"][i]): float(m["value"][i]) for i in ends.tolist()}
        stage = open_stage.get(rank, last_stage.get(rank))
        epoch = last_epoch.get(rank)
        step_row = last_step.get(rank)
        t_last = max([int(x) for x in (mine["t"].max() if len(mine) else -1,
                                       tasks["start"][tasks["rank"] == rank].max()
                                       if (tasks["rank"] == rank).any() else -1,
                                       tasks["end"][tasks["rank"] == rank].max()
                                       if (tasks["rank"] == rank).any() else -1)])
        rate = None
        s = stepped[stepped["rank"] == rank]
        if len(s) > 1:
            span = (int(s["t"].max()) - int(s["t"].min())) / 1e9
            n_steps = int(s["step"].max()) - int(s["step"].min())
            rate = n_steps / span if span > 0 else None
        rows.append({
            "rank": int(rank), "node": meta.get("node") or (
                str(tasks["node"][tasks["rank"] == rank][0])
                if (tasks["rank"] == rank).any() else ""),
            "status": meta.get("status", "?"),
            "stage": str(stage["name"]) if stage is not None else None,
            "epoch": int(epoch["index"]) if epoch is not None and
            epoch["index"] != R.NO_STEP else None,
            "step": int(step_row["step"]) if step_row is not None else None,
            "steps_per_s": round(rate, 3) if rate is not None else None,
            "metrics": latest,
            "records": int(stored.get(rank, 0)), "dropped": int(meta.get("dropped", 0)),
            "idle_s": round((now_ns - t_last) / 1e9, 3) if t_last > 0 else None,
        })
    steps: list[int] = [r["step"] for r in rows if r["step"] is not None]
    median = float(np.median(steps)) if steps else None
    for r in rows:
        r["lagging"] = bool(median is not None and r["step"] is not None
                            and r["step"] < median * 0.8)
        r["silent"] = bool(r["status"] == "running" and r["idle_s"] is not None
                           and r["idle_s"] > SILENT_S)
    telemetry: dict[str, dict] = {}  # per node: each rank's latest value, summed (a mean
    if tel.any():                    # for percentages and utilisation)
        t = metrics[tel]
        order = np.lexsort((t["t"], t["rank"], t["name"], t["node"]))
        t = t[order]
        key = np.char.add(np.char.add(t["node"].astype(str), "\0"),
                          np.char.add(t["name"].astype(str), t["rank"].astype(str)))
        ends = np.flatnonzero(np.append(key[1:] != key[:-1], True))
        per: dict[tuple, list] = {}
        for i in ends.tolist():
            per.setdefault((str(t["node"][i]), str(t["name"][i])[len("telemetry."):]),
                           []).append(float(t["value"][i]))
        for (node, name), values in per.items():
            mean = "percent" in name or "util" in name
            telemetry.setdefault(node, {})[name] = (sum(values) / len(values) if mean
                                                    else sum(values))
    epochs_done: list[int] = [r["epoch"] for r in rows if r["epoch"] is not None]
    return {
        "run": run.run_id, "status": run.status, "end": run.end(), "updated": now_ns,
        "live": bool(run.live),
        "ranks": rows,
        "progress": {"ranks": len(rows),
                     "epoch_min": min(epochs_done) if epochs_done else None,
                     "epoch_max": max(epochs_done) if epochs_done else None,
                     "step_min": min(steps) if steps else None,
                     "step_max": max(steps) if steps else None,
                     "records": sum(r["records"] for r in rows),
                     "dropped": sum(r["dropped"] for r in rows)},
        "telemetry": telemetry,
        "partition_errors": dict(run.errors),
    }


def text(s: dict) -> str:
    """The snapshot as plain text (the view without ``rich``)."""
    p = s["progress"]
    state = s.get("end", {}).get("state", "")
    if s.get("end", {}).get("cause"):
        state += f" ({s['end']['cause']})"
    head = (f"run {s['run']}  status {s['status']}{' (live)' if s['live'] else ''}"
            f"{'  ended ' + state if state and state != 'running' else ''}  "
            f"ranks {p['ranks']}  epochs {p['epoch_min']}..{p['epoch_max']}  "
            f"steps {p['step_min']}..{p['step_max']}  records {p['records']}  "
            f"dropped {p['dropped']}")
    names = sorted({k for r in s["ranks"] for k in r["metrics"]})[:6]
    cols = ["rank", "node", "stage", "epoch", "step", "steps/s", "idle_s", *names, "mark"]
    rows = []
    for r in s["ranks"]:
        mark = " ".join(m for m, on in (("LAG", r["lagging"]), ("SILENT", r["silent"])) if on)
        rows.append([str(r["rank"]), r["node"], r["stage"] or "", _s(r["epoch"]),
                     _s(r["step"]), _s(r["steps_per_s"]), _s(r["idle_s"]),
                     *[_s(r["metrics"].get(n)) for n in names], mark])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines = [head, "", "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    for node, values in s["telemetry"].items():
        lines.append(f"node {node}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                  sorted(values.items())))
    for path in s["partition_errors"]:
        lines.append(f"unreadable: {path} (this view lacks it)")
    return "\n".join(lines)


def _s(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
