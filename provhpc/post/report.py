"""``provhpc report``: a static HTML page with PNG plots of one run (needs matplotlib)."""

from __future__ import annotations

import html
import json
import os

import numpy as np

from ..format import records as R
from . import questions as Q
from .reader import summary

__all__ = ["plot_metrics", "plot_records", "plot_timeline", "report", "x_axis"]

_COLORS = {"run": "#dddddd", "stage": "#4c72b0", "epoch": "#55a868", "task": "#c44e52"}
_ROW = {"run": 0, "stage": 1, "epoch": 2, "task": 3}


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("provhpc report needs matplotlib: pip install 'provhpc[report]'") \
            from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(run, path: str) -> str:
    """Per rank, one lane per activity type: bars from start to end."""
    plt = _plt()
    t = np.asarray(run.tasks())
    t0 = run.time_range()[0]
    ranks = sorted(set(t["rank"].tolist()))
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.9 * len(ranks)))
    end_default = run.time_range()[1]
    for y, rank in enumerate(ranks):
        rows = t[t["rank"] == rank]
        for kind, lane in _ROW.items():
            sel = rows[rows["type"] == kind]
            if not len(sel):
                continue
            start = (sel["start"] - t0) / 1e9
            end = (np.where(sel["end"] >= 0, sel["end"], end_default) - t0) / 1e9
            ax.broken_barh(list(zip(start.tolist(), (end - start).tolist())),
                           (y - 0.4 + lane * 0.2, 0.18), facecolors=_COLORS[kind],
                           edgecolor="white", linewidth=0.3)
        bad = rows[rows["status"] != "ok"]
        for r in bad:
            ax.plot((r["start"] - t0) / 1e9, y, "kx")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first record")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), loc="upper right", ncol=4, fontsize=8)
    ax.set_title(f"Timeline per rank — run {run.run_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def x_axis(name: str, steps: np.ndarray) -> str:
    """``"step"`` when every point of a metric has a step, else ``"t"`` (time).

    Telemetry (``telemetry.*``) always plots against time: its step is the
    aggregator's sample number, which says nothing about the training."""
    if name.startswith("telemetry.") or not len(steps):
        return "t"
    return "step" if (np.asarray(steps) != R.NO_STEP).all() else "t"


def plot_metrics(run, path: str) -> str | None:
    """One panel per metric name: value against step (or time) per rank."""
    plt = _plt()
    m = np.asarray(run.metrics())
    if not len(m):
        return None
    names = sorted(set(m["name"].tolist()))
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    t0 = run.time_range()[0]
    for ax, name in zip(axes.ravel(), names):
        sel = m[m["name"] == name]
        axis = x_axis(name, sel["step"])
        for rank in sorted(set(sel["rank"].tolist())):
            r = sel[sel["rank"] == rank]
            r = r[np.argsort(r[axis], kind="stable")]
            x = r["step"] if axis == "step" else (r["t"] - t0) / 1e9
            ax.plot(x, r["value"], marker="o" if len(r) < 30 else None, ms=3,
                    label=f"rank {rank}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step" if axis == "step" else "seconds")
        ax.grid(alpha=0.3)
    axes.ravel()[0].legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Metrics per rank — run {run.run_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_records(run, path: str, s: dict) -> str:
    """Records by kind (stacked) and dropped records per rank."""
    plt = _plt()
    ranks = [r for r in s["ranks"] if r["role"] == "rank"]
    kinds = ["activity_start", "activity_end", "entity", "relation", "attribute", "metric"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(len(ranks))
    bottom = np.zeros(len(ranks))
    for k in kinds:
        v = np.array([r["records_by_kind"].get(k, 0) for r in ranks], float)
        ax1.bar(x, v, bottom=bottom, label=k)
        bottom += v
    ax1.set_xticks(x, [str(r["rank"]) for r in ranks])
    ax1.set_xlabel("rank")
    ax1.set_ylabel("records")
    ax1.legend(fontsize=7)
    ax1.set_title("Records per rank")
    drops = np.array([r["dropped"] for r in ranks], float)
    ax2.bar(x, drops, color="#c44e52")
    ax2.set_xticks(x, [str(r["rank"]) for r in ranks])
    ax2.set_xlabel("rank")
    ax2.set_ylabel("dropped records")
    ax2.set_ylim(0, max(1.0, drops.max() * 1.2 if len(drops) else 1.0))
    reasons = ", ".join(f"{k}: {v}" for k, v in s["dropped_by_reason"].items()) or "none"
    ax2.set_title(f"Dropped per rank (reasons: {reasons})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table_html(rows, columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else str(v)


def report(run, out_dir: str, missing=()) -> dict:
    """Write ``out_dir/index.html`` and its PNGs; returns the paths.  ``missing``: the
    partitions that could not be read (a partial report says so at its top)."""
    os.makedirs(out_dir, exist_ok=True)
    s = summary(run)
    images = [plot_timeline(run, os.path.join(out_dir, "timeline.png"))]
    mp = plot_metrics(run, os.path.join(out_dir, "metrics.png"))
    if mp:
        images.append(mp)
    images.append(plot_records(run, os.path.join(out_dir, "records.png"), s))
    stats = Q.capture_stats(run)
    fails = Q.failures(run)
    slow = Q.stragglers(run)[:10]
    meta = run.metadata()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>provhpc report {html.escape(run.run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
        "</style></head><body>",
        f"<h1>Run {html.escape(run.run_id)}</h1>",
        *([f"<p style='color:red'><b>Partial report</b>: {len(missing)} partition(s) could "
           "not be read and are not in it: " + ", ".join(html.escape(m) for m in missing)
           + "</p>"] if missing else []),
        f"<p>status {html.escape(str(s['status']))} · {len(s['nodes'])} node(s) · "
        f"{s['world_size']} rank(s) · {s['records_total']} records · "
        f"{s['dropped_total']} dropped · {s['duration_s']:.2f} s · launcher "
        f"{html.escape(meta['launcher'] or 'none')} · "
        f"{html.escape(' '.join(meta['job']['argv']))}</p>",
        "<h2>Timeline</h2>", "<img src='timeline.png' alt='timeline per rank'>",
    ]
    if mp:
        parts += ["<h2>Metrics</h2>", "<img src='metrics.png' alt='metrics per rank'>"]
    parts += ["<h2>Records and drops</h2>", "<img src='records.png' alt='records per rank'>",
              "<h2>Capture statistics</h2>",
              _table_html(stats["ranks"], ["rank", "role", "node", "records", "seconds",
                                           "records_per_s", "dropped", "drops"]),
              f"<p>file bytes per record: {stats['file_bytes_per_record']}</p>",
              "<h2>Failures</h2>",
              _table_html(fails, ["rank", "node", "name", "exception", "message"])
              if fails else "<p>none</p>",
              "<h2>Stragglers</h2>",
              _table_html(slow, ["rank", "type", "name", "duration_s", "median_s", "slower_by"])
              if slow else "<p>none</p>"]
    for err in s["partition_errors"].values():
        parts.append(f"<p style='color:red'>error: {html.escape(err)}</p>")
    parts.append("</body></html>")
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w") as fh:
        fh.write("\n".join(parts))
    return {"html": html_path, "images": images}
