"""``provhpc report``: one self-contained HTML page about a run (needs matplotlib).

The page is readable offline and sent as one file: plots are PNGs embedded as
``data:`` URIs (also written beside it for reuse), the lineage graphs are inline SVG,
and nothing is fetched.  It shows the run card (who, when, job, nodes, ranks, how it
ended, code version, hyperparameters), the inputs and outputs with their identities,
the lineage of each model as a graph, ML metric curves per rank (telemetry apart, per
node), a labelled timeline per rank, failures and stragglers, and capture statistics
with the drops (or a "no drops" note).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os

import numpy as np

from .._progress import track
from ..format import records as R
from . import questions as Q
from .lineage import code_label, graph, lineage
from .questions import MODEL_KINDS, io_entities
from .reader import summary

__all__ = ["io_entities", "lineage_svg", "plot_metrics", "plot_records", "plot_runs",
           "plot_timeline", "report", "report_runs", "x_axis"]

_LANES = ("run", "stage", "epoch", "task")
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c", "#ccb974", "#64b5cd"]
MAX_MODELS = 4  # lineage graphs drawn (the page lists the others)
MAX_GRAPH_NODES = 40


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("provhpc report needs matplotlib: pip install 'provhpc[report]'") \
            from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


# ---------------------------------------------------------------------- timeline
def plot_timeline(run, path: str) -> str:
    """Per rank, one lane per activity type (run, stage, epoch, task); bars are coloured by
    name with a legend by name, and wide bars carry their name (epochs their index)."""
    plt = _plt()
    t = np.asarray(run.tasks())
    t0, t_end = run.time_range()
    ranks = sorted(set(t["rank"].tolist()))
    names = list(dict.fromkeys(t["name"][np.isin(t["type"], ["stage", "task"])].tolist()))
    colour = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(11, 1.2 + 1.1 * len(ranks)), layout="constrained")
    span = max((t_end - t0) / 1e9, 1e-9)
    start_s = (t["start"].astype(np.int64) - t0) / 1e9
    end_s = (np.where(t["end"] >= 0, t["end"], t_end).astype(np.int64) - t0) / 1e9
    lane_of = {k: i for i, k in enumerate(_LANES)}
    y_of = {r: i for i, r in enumerate(ranks)}
    lane = np.array([lane_of.get(k, 3) for k in t["type"].tolist()])
    top = np.array([y_of[r] for r in t["rank"].tolist()]) - 0.42 + lane * 0.21
    face = np.array([{"run": "#e5e5e5", "epoch": "#b7d7b0"}.get(k) or colour.get(n, "#999")
                     for k, n in zip(t["type"].tolist(), t["name"].tolist())], object)
    width = np.maximum(end_s - start_s, span / 400)  # a 0.1 ms stage still shows
    # a stage inside a stage or an epoch (validate in each epoch of train) is drawn in
    # the lower half of the lane, over the stage that holds it, so that both show
    inner = {(r, i) for r, i, k in zip(t["rank"].tolist(), t["id"].tolist(),
                                       t["type"].tolist()) if k in ("stage", "epoch")}
    nested = np.array([k == "stage" and (r, p) in inner for r, p, k in
                       zip(t["rank"].tolist(), t["parent"].tolist(), t["type"].tolist())],
                      bool)
    height = np.where(nested, 0.095, 0.19)
    top = np.where(nested, top + 0.095, top)
    # one call per (lane top, height, colour): a million tasks draw as a few hundred calls
    groups: dict[tuple, list] = {}
    for i, key in enumerate(zip(top.round(3).tolist(), height.tolist(), face.tolist())):
        groups.setdefault(key, []).append(i)
    for (y0, h, fc), idx in groups.items():
        ax.broken_barh(list(zip(start_s[idx].tolist(), width[idx].tolist())), (y0, h),
                       facecolors=fc, edgecolor="white", linewidth=0.3 if h > 0.1 else 0)
    labels = [f"e{i}" if k == "epoch" and i != R.NO_STEP else str(n)
              for k, n, i in zip(t["type"].tolist(), t["name"].tolist(), t["index"].tolist())]
    wide = np.flatnonzero((lane < 3) & ~nested & ((end_s - start_s) > span * 0.012 *
                                        np.maximum([len(x) for x in labels], 2)))
    for i in wide[:400].tolist():  # names on the bars wide enough to hold them
        ax.text((start_s[i] + end_s[i]) / 2, top[i] + 0.095, labels[i], ha="center",
                va="center", fontsize=7, clip_on=True)
    bad = np.flatnonzero(~np.isin(t["status"], ["ok", "running"]))
    ax.plot(end_s[bad], top[bad] + 0.095, "kx", ms=6, linestyle="none")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    last = max([int(x) for x in t["end"].tolist() if x >= 0] or [t_end])
    ax.set_xlim(0, max((last - t0) / 1e9, 1e-9) * 1.01)
    ax.set_xlabel("seconds since the run's first record (lanes: run, stage, epoch, task; "
                  "x: not ok)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in names[:12]]
    if handles:
        ax.legend(handles, names[:12], loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  fontsize=8, title="stage / task", title_fontsize=8)
    ax.set_title("Timeline per rank", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------- metrics
def x_axis(name: str, steps: np.ndarray) -> str:
    """``"step"`` when every point of a metric has a step, else ``"t"`` (time).

    Telemetry (``telemetry.*``) always plots against time: its step is the
    aggregator's sample number, which says nothing about the training."""
    if name.startswith("telemetry.") or not len(steps):
        return "t"
    return "step" if (np.asarray(steps) != R.NO_STEP).all() else "t"


def _curves(m: np.ndarray) -> tuple[list[str], list[str]]:
    """Metric names worth a curve (some rank has 2+ points) and the single-valued rest."""
    curves: list[str] = []
    single: list[str] = []
    for name in sorted(set(m["name"].tolist())):
        sel = m[m["name"] == name]
        _, counts = np.unique(sel["rank"], return_counts=True)
        (curves if counts.max() > 1 else single).append(name)
    return curves, single


def plot_metrics(run, path: str, names=None, t0=None, title="Metrics per rank") -> str | None:
    """One panel per metric name: value against step (or time) per rank."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    m = np.asarray(run.metrics()) if not isinstance(run, np.ndarray) else run
    if names is None:
        names = _curves(m)[0]
    if not len(m) or not names:
        return None
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False,
                             layout="constrained")
    t0 = t0 if t0 is not None else int(m["t"].min())
    for ax, name in zip(axes.ravel(), names):
        sel = m[m["name"] == name]
        axis = x_axis(name, sel["step"])
        for rank in sorted(set(sel["rank"].tolist())):
            r = sel[sel["rank"] == rank]
            r = r[np.argsort(r[axis], kind="stable")]
            x = r["step"] if axis == "step" else (r["t"] - t0) / 1e9
            ax.plot(x, r["value"], marker="o" if len(r) < 30 else None, ms=3,
                    label=f"rank {rank}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step" if axis == "step" else "seconds")
        if axis == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------- records
def plot_records(run, path: str, s: dict) -> str:
    """Records by kind (stacked) and dropped records per rank."""
    plt = _plt()
    ranks = [r for r in s["ranks"] if r["role"] == "rank"]
    kinds = ["activity_start", "activity_end", "entity", "relation", "attribute", "metric"]
    by_rank: dict[int, dict] = {}  # a rank's processes together (its children, workers)
    for r in s["ranks"]:
        mine = by_rank.setdefault(r["rank"], {})
        for k, v in [*r["records_by_kind"].items(), ("dropped", r["dropped"])]:
            mine[k] = mine.get(k, 0) + v
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2), layout="constrained")
    x = np.arange(len(ranks))
    bottom = np.zeros(len(ranks))
    for k in kinds:
        v = np.array([by_rank[r["rank"]].get(k, 0) for r in ranks], float)
        ax1.bar(x, v, bottom=bottom, label=k)
        bottom += v
    ax1.set_xticks(x, [str(r["rank"]) for r in ranks])
    ax1.set_xlabel("rank")
    ax1.set_ylabel("records")
    ax1.legend(fontsize=7)
    ax1.set_title("Records per rank", fontsize=10)
    drops = np.array([by_rank[r["rank"]]["dropped"] for r in ranks], float)
    ax2.bar(x, drops, color="#c44e52")
    ax2.set_xticks(x, [str(r["rank"]) for r in ranks])
    ax2.set_xlabel("rank")
    ax2.set_ylabel("dropped records")
    ax2.set_ylim(0, max(1.0, drops.max() * 1.2 if len(drops) else 1.0))
    ax2.set_title("Dropped per rank" if drops.any() else "Dropped per rank: none",
                  fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------- provenance
def _short(text: str, n: int = 30, keep_start: bool = False) -> str:
    if len(text) <= n:
        return text
    return text[:n - 1] + "…" if keep_start else "…" + text[-(n - 1):]


def _pivot(rows: np.ndarray) -> tuple[list[dict], list[str]]:
    """Single-valued metrics as one row per metric and one column per rank."""
    ranks = sorted(set(rows["rank"].tolist()))
    table: dict[str, dict] = {}
    for r in rows:
        table.setdefault(str(r["name"]), {"metric": str(r["name"])})[f"rank {r['rank']}"] = \
            float(r["value"])
    return list(table.values()), ["metric", *[f"rank {k}" for k in ranks]]


def lineage_svg(run, spec: str, g=None) -> str:
    """The backward lineage of ``spec`` as an inline SVG: columns by distance (the model at
    the right, its origins at the left), one box per node, arrows for the relations."""
    g = g or graph(run)
    lin = lineage(run, spec)
    nodes, edges = lin.nodes.to_dicts(), lin.edges.to_dicts()
    cut = len(nodes) > MAX_GRAPH_NODES
    nodes = sorted(nodes, key=lambda n: n["level"])[:MAX_GRAPH_NODES]
    keep = {n["node"] for n in nodes}
    levels: dict[int, list] = {}
    for n in nodes:
        levels.setdefault(n["level"], []).append(n)
    depth = max(levels) if levels else 0
    w, h, gap_x, gap_y = 190, 34, 60, 14
    height = max(len(v) for v in levels.values()) * (h + gap_y) + 20 if levels else 60
    width = (depth + 1) * (w + gap_x) + 20
    pos = {}
    for level, group in levels.items():
        x = 10 + (depth - level) * (w + gap_x)
        for k, n in enumerate(sorted(group, key=lambda n: (n["type"], str(n["name"])))):
            pos[n["node"]] = (x, 10 + k * (h + gap_y))
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='11'>",
           "<defs><marker id='arr' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='6' "
           "markerHeight='6' orient='auto'><path d='M0,0L10,5L0,10z' fill='#777'/></marker>"
           "</defs>"]
    for e in edges:  # "src depends on dst": the arrow points from the origin to its product
        if e["src"] not in keep or e["dst"] not in keep:
            continue
        (x1, y1), (x2, y2) = pos[e["dst"]], pos[e["src"]]
        if x1 == x2:
            continue
        out.append(f"<line x1='{x1 + w}' y1='{y1 + h / 2}' x2='{x2}' y2='{y2 + h / 2}' "
                   f"stroke='#999' marker-end='url(#arr)'><title>{html.escape(e['relation'])}"
                   "</title></line>")
    for n in nodes:
        x, y = pos[n["node"]]
        act = n["type"] == "activity"
        fill = {"code": "#f3e3b3", "hyperparameters": "#e3d7f3"}.get(
            n["kind"], "#dce9f7" if act else "#e4f2df")
        kind = n["kind"] if not act else f"{n['kind']} · rank {n['rank']}"
        tip = n["name"] + (f"  {n['hash']}" if n.get("hash") else "")
        out.append(f"<g><title>{html.escape(tip)}</title><rect x='{x}' y='{y}' width='{w}' "
                   f"height='{h}' rx='{10 if act else 2}' fill='{fill}' stroke='#888'/>"
                   f"<text x='{x + 6}' y='{y + 13}' fill='#555' font-size='9'>"
                   f"{html.escape(kind)}</text><text x='{x + 6}' y='{y + 27}'>"
                   f"{html.escape(_short(str(n['name']), keep_start=n['kind'] == 'code'))}"
                   "</text></g>")
    out.append("</svg>")
    note = (f"<p class='note'>The first {MAX_GRAPH_NODES} of {len(lin.nodes)} nodes, nearest "
            "first (<code>provhpc lineage</code> lists them all).</p>" if cut else "")
    return "".join(out) + note


# ---------------------------------------------------------------------- page
def _img(path: str, alt: str) -> str:
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'>"


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


def _when(ns) -> str:
    if not ns:
        return "?"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _card(run, s: dict, meta: dict) -> list[str]:
    code, env = meta["code"], meta["environment"]
    git = code["git"] or {}
    version = (f"{html.escape(code_label(code)[0])} on branch {html.escape(str(git.get('branch')))}"
               f" — commit <code>{html.escape(git['commit'])}</code>"
               + (" <b>with uncommitted changes</b>" if git.get("dirty") else "")
               if git.get("commit") else
               f"{html.escape(os.path.basename(code['script'] or '?'))} (not in a git work "
               "tree: no code version)")
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    status = str(s["status"] or "?")
    code_txt = f" (exit code {meta['exit_code']})" if meta.get("exit_code") is not None else ""
    ended = {"ok": f"finished{code_txt or ' (exit 0)'}",
             "running": "running (an aggregator still writes it)"}.get(status,
                                                                   f"{status}{code_txt}")
    if s.get("status_note"):
        ended += f" — {s['status_note']}"
    job = meta["job"]
    rows = [("who", job["user"] or "?"),
            ("when", f"{_when(meta['start'])} → "
                     f"{_when(meta['end']) if meta['end'] else 'no end recorded'} "
                     f"({s['duration_s']:.2f} s of records)"),
            ("job", f"{meta['launcher'] or 'no launcher'}"
                    + (f", job {job['id']}" if job["id"] else "")
                    + (f" step {job['step']}" if job["step"] else "")),
            ("nodes", f"{len(s['nodes'])}: {', '.join(s['nodes'])}"),
            ("ranks", str(s["world_size"] or len(meta["ranks"]))),
            ("how it ended", ended),
            ("command", " ".join(code["command"]) + f"   (in {code['cwd']})"),
            ("python", f"{(env['python'] or {}).get('version', '?')} — {pkgs}")]
    out = ["<table class='card'>"]
    out += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows]
    out.append(f"<tr><th>code version</th><td>{version}</td></tr></table>")
    hp = run.hyperparameters()
    out.append("<h3>Hyperparameters</h3>")
    if hp:
        keys = list(dict.fromkeys(k for h in hp for k in h["values"]))
        out.append(_table_html([{"set": h["key"], "ranks": ", ".join(map(str, h["ranks"])),
                                 **h["values"]} for h in hp], ["set", "ranks", *keys]))
    else:
        out.append("<p class='note'>none recorded</p>")
    return out


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1250px;color:#222}"
        "table{border-collapse:collapse;font-size:85%;margin:.4em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
        "table.card th{background:#f4f4f4;width:9em}img{max-width:100%}"
        ".note{color:#666;font-size:90%}.partial{color:#b00;font-weight:bold}"
        "h2{border-bottom:1px solid #ddd;margin-top:1.6em}svg{max-width:100%;height:auto}"
        ".graph{overflow-x:auto;border:1px solid #eee;padding:4px}")


def report(run, out_dir: str, missing=()) -> dict:
    """Write ``out_dir/index.html`` (self-contained) and, beside it, its PNGs; returns the
    paths.  ``missing``: the partitions that could not be read (a partial report says so
    at its top)."""
    os.makedirs(out_dir, exist_ok=True)
    s = summary(run)
    meta = run.metadata()
    g = graph(run)
    t0 = run.time_range()[0]
    m = np.asarray(run.metrics())
    is_tel = np.char.startswith(m["name"].astype(str), "telemetry.") if len(m) else \
        np.zeros(0, bool)
    ml_curves, ml_single = _curves(m[~is_tel]) if len(m) else ([], [])
    tel_nodes = sorted(set(m["node"][is_tel].tolist())) if len(m) else []
    images: dict[str, str] = {}
    mp = None
    for step in track(["timeline", "metrics", *tel_nodes, "records"],
                      f"report {run.run_id}: plots"):
        if step == "timeline":
            images["timeline"] = plot_timeline(run, os.path.join(out_dir, "timeline.png"))
        elif step == "metrics":
            mp = plot_metrics(m[~is_tel], os.path.join(out_dir, "metrics.png"), ml_curves,
                              t0, "ML metrics per rank") if ml_curves else None
            if mp:
                images["metrics"] = mp
        elif step == "records":
            images["records"] = plot_records(run, os.path.join(out_dir, "records.png"), s)
        else:
            sel = m[is_tel & (m["node"] == step)]
            p = plot_metrics(sel, os.path.join(out_dir, f"telemetry-{step}.png"),
                             _curves(sel)[0], t0, f"Telemetry on node {step}")
            if p:
                images[f"telemetry-{step}"] = p
    stats = Q.capture_stats(run)
    fails = Q.failures(run)
    slow = Q.stragglers(run)[:10]
    inputs, outputs = io_entities(run, g)
    models = [o for o in outputs if o["kind"] in MODEL_KINDS] or outputs[:1]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>provhpc report {html.escape(run.run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Run {html.escape(run.run_id)}</h1>",
        *([f"<p class='partial'>Partial report: {len(missing)} partition(s) could not be "
           "read and are not in it: " + ", ".join(html.escape(x) for x in missing) + "</p>"]
          if missing else []),
        *_card(run, s, meta),
        "<h2>Inputs and outputs</h2>",
        "<p class='note'>Inputs: what the run used and did not make.  Outputs: what it made "
        "that nothing later used, and every checkpoint and model.  The identity links a "
        "file across runs (its path and content hash).</p>",
        "<h3>Inputs</h3>",
        _table_html(inputs, ["kind", "key", "hash", "id"]) if inputs else
        "<p class='note'>none recorded</p>",
        "<h3>Outputs</h3>",
        _table_html(outputs, ["kind", "key", "hash", "id"]) if outputs else
        "<p class='note'>none recorded</p>",
        "<h2>Lineage</h2>",
    ]
    if models:
        for o in models[:MAX_MODELS]:
            parts += [f"<h3>{html.escape(o['kind'])} {html.escape(o['key'])}</h3>",
                      "<div class='graph'>", lineage_svg(run, o["id"], g), "</div>"]
        if len(models) > MAX_MODELS:
            parts.append(f"<p class='note'>{len(models) - MAX_MODELS} more models: "
                         "<code>provhpc lineage RUN KEY</code>.</p>")
    else:
        parts.append("<p class='note'>no model or output recorded</p>")
    parts += ["<h2>Metrics</h2>"]
    if mp:
        parts.append(_img(mp, "ML metrics per rank"))
    if ml_single:
        sel = m[~is_tel]
        parts += ["<h3>Single values</h3>",
                  _table_html(*_pivot(sel[np.isin(sel["name"], ml_single)]))]
    if not mp and not ml_single:
        parts.append("<p class='note'>no ML metrics recorded</p>")
    parts.append("<h2>Telemetry per node</h2>")
    for node in tel_nodes:
        key = f"telemetry-{node}"
        parts.append(f"<h3>Node {html.escape(str(node))}</h3>")
        if key in images:
            parts.append(_img(images[key], f"telemetry on node {node}"))
        sel = m[is_tel & (m["node"] == node)]
        single = _curves(sel)[1]
        if single:
            parts.append(_table_html(*_pivot(sel[np.isin(sel["name"], single)])))
    if not tel_nodes:
        parts.append("<p class='note'>no telemetry recorded</p>")
    parts += ["<h2>Timeline</h2>", _img(images["timeline"], "timeline per rank"),
              "<h2>Failures</h2>",
              _table_html(fails, ["rank", "node", "type", "name", "status", "exception",
                                  "message"])
              if fails else "<p class='note'>no failed activities</p>",
              "<h2>Stragglers</h2>",
              _table_html(slow, ["rank", "type", "name", "duration_s", "median_s", "slower_by"])
              if slow else "<p class='note'>no stragglers (20% over the median)</p>",
              "<h2>Capture statistics and drops</h2>",
              f"<p>{s['records_total']} records stored, {s['dropped_total']} dropped"
              + (" — <b>no drops</b>: every emitted record is stored" if not
                 s["dropped_total"] else
                 f" — reasons: {html.escape(json.dumps(s['dropped_by_reason']))}")
              + f"; {stats['file_bytes_per_record']} file bytes per record.</p>",
              _img(images["records"], "records and drops per rank"),
              _table_html(stats["ranks"], ["rank", "role", "node", "records", "seconds",
                                           "records_per_s", "dropped", "drops"])]
    for err in s["partition_errors"].values():
        parts.append(f"<p class='partial'>error: {html.escape(err)}</p>")
    parts.append(f"<p class='note'>provhpc report of {html.escape(run.path)}, written "
                 f"{_when(int(datetime.datetime.now().timestamp() * 1e9))}.</p></body></html>")
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w") as fh:
        fh.write("\n".join(parts))
    return {"html": html_path, "images": list(images.values())}


# ---------------------------------------------------------------------- several runs
def _label(row: dict) -> str:
    hp = ", ".join(f"{k}={v}" for k, v in row["varying"].items())
    return f"{row['run']}" + (f" ({hp})" if hp else "")


def plot_runs(runs, path: str, labels: dict) -> str | None:
    """One panel per ML metric with steps: the mean over ranks per step, a line per run."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    data = {}
    for run in runs:
        m = np.asarray(run.metrics())
        if len(m):
            m = m[~np.char.startswith(m["name"].astype(str), "telemetry.")
                  & (m["step"] != R.NO_STEP)]
        data[run.run_id] = m
    names = sorted({n for m in data.values() for n in _curves(m)[0]}) if data else []
    if not names:
        return None
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.ravel(), names):
        for run_id, m in data.items():
            sel = m[m["name"] == name]
            if not len(sel):
                continue
            steps = np.unique(sel["step"])
            mean = [float(sel["value"][sel["step"] == k].mean()) for k in steps]
            ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, ms=3,
                    label=labels.get(run_id, run_id))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("Metrics of every run (mean over ranks per step)", fontsize=11)
    return _save(fig, path)


def plot_best_vs(rows: list, metric: str, path: str) -> str | None:
    """The best ``metric`` of each run against each numeric hyperparameter that varies."""
    plt = _plt()
    keys = [k for k in (rows[0]["varying"] if rows else {})
            if all(isinstance(r["varying"].get(k), (int, float)) and
                   not isinstance(r["varying"].get(k), bool) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 4.4 * len(keys)), 3.2), squeeze=False,
                             layout="constrained")
    for ax, k in zip(axes.ravel(), keys):
        x = np.array([r["varying"][k] for r in rows], float)
        y = np.array([r["value"] for r in rows], float)
        ax.plot(x, y, "o")
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(r["run"][-6:], (xi, yi), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        if (x > 0).all() and x.max() / x.min() >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Best {metric} against each hyperparameter that varies", fontsize=11)
    return _save(fig, path)


def report_runs(runs, out_dir: str, metric: str | None = None, mode: str = "max",
                title: str = "") -> dict:
    """One self-contained page about several runs: the metric curves of all runs
    overlaid, the best ``metric`` against each varying hyperparameter, and the run table
    (best value, its epoch, the differing hyperparameters, how each run ended)."""
    runs = list(runs)
    os.makedirs(out_dir, exist_ok=True)
    names = {str(n) for r in runs for n in np.asarray(r.metrics())["name"].tolist()}
    metric = metric or next((m for m in ("val_accuracy", "accuracy", "val_loss", "loss")
                             if m in names), sorted(names)[0] if names else "")
    if metric and mode == "max" and "loss" in metric:
        mode = "min"
    rows = Q.best(runs, metric, mode) if metric else []
    labels = {r["run"]: _label(r) for r in rows}
    images: dict[str, str] = {}
    for step in track(["curves", "best"], "report: plots of every run"):
        if step == "curves":
            p = plot_runs(runs, os.path.join(out_dir, "runs-metrics.png"), labels)
        else:
            p = plot_best_vs(rows, metric, os.path.join(out_dir, "runs-best.png"))
        if p:
            images[step] = p
    ends = {r.run_id: r.end()["state"] for r in runs}
    keys = list(rows[0]["varying"]) if rows else []
    table = [{"run": r["run"], f"best {metric}": r["value"], "epoch": r["epoch"],
              "rank": r["rank"], **r["varying"], "ended": ends.get(r["run"], "?")}
             for r in rows]
    missing = [r.run_id for r in runs if r.run_id not in labels]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>provhpc report of {len(runs)} runs</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{len(runs)} runs{(' in ' + html.escape(title)) if title else ''}</h1>",
        f"<p class='note'>Best {html.escape(metric)} ({mode}) per run, best first; the "
        "columns after the rank are the hyperparameters that differ between the runs.</p>",
        _table_html(table, ["run", f"best {metric}", "epoch", "rank", *keys, "ended"])
        if table else "<p class='note'>no run recorded this metric</p>",
        *([f"<p class='note'>without {html.escape(metric)}: "
           + ", ".join(html.escape(m) for m in missing) + "</p>"] if missing else []),
        "<h2>Metrics of every run</h2>",
        _img(images["curves"], "metrics of every run") if "curves" in images else
        "<p class='note'>no metric with steps</p>",
        f"<h2>Best {html.escape(metric)} against the hyperparameters</h2>",
        _img(images["best"], "best metric against each varying hyperparameter")
        if "best" in images else
        "<p class='note'>no numeric hyperparameter varies between the runs</p>",
        f"<p class='note'>provhpc report, written "
        f"{_when(int(datetime.datetime.now().timestamp() * 1e9))}.</p></body></html>"]
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w") as fh:
        fh.write("\n".join(parts))
    return {"html": html_path, "images": list(images.values()), "runs": len(runs),
            "metric": metric}
