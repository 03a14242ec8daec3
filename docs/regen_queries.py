"""Regenerate docs/queries.md from real output.

    .venv/bin/python docs/regen_queries.py            # rewrites docs/queries.md in place
    .venv/bin/python docs/regen_queries.py --check    # exit 1 if a command failed

It makes the runs the page describes in a fresh work directory (default /tmp/demo:
three ``examples/train_mlp.py`` runs under ``mpiexec -n 4``, the lr 0.2 one second and
the third with rank 2 raising; ``examples/multi_workflow.py``; a two-node run with one
partition cut short; ``ends/``, one small job per end state, ended by real signals), then runs every ``$ command`` of every ``console`` block there
with bash and every ``python`` block in one namespace, and replaces what follows each
(a ``text`` block after a ``python`` block) with what it printed.  Run ids of the old
page are replaced by the new ones wherever they appear.  Outputs longer than
``MAX_LINES`` are cut to the length they had, with a line saying so.  Where
``chromium`` is installed (Debian's package), docs/report.png is taken again from the
report the page writes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
RUN_ID = re.compile(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b")
MAX_LINES = 40
STRIP = ("PMI", "PMIX", "OMPI_", "HYDRA", "PRTE", "MPIR", "SLURM_", "PROVHPC_")


def env(work: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(STRIP)}
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e["PROVHPC_PROGRESS"] = "0"
    e["COLUMNS"] = "200"
    e["PYTHONPATH"] = os.path.join(ROOT, "tests")
    return e


def sh(cmd: str, work: str, e: dict, check: bool = True) -> str:
    p = subprocess.run(["bash", "-c", cmd], cwd=work, env=e, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    if check and p.returncode != 0:
        raise SystemExit(f"regen: `{cmd}` failed ({p.returncode}):\n{p.stdout}")
    return p.stdout


def make_runs(work: str, e: dict) -> dict:
    """The runs of the page, and the variables its commands use."""
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    train = os.path.join(ROOT, "examples", "train_mlp.py")
    for lr in ("0.05", "0.2"):
        sh(f"mpiexec -n 4 provhpc run -o provenance -- python {train} --epochs 3 --lr {lr}",
           work, e)
    sh(f"mpiexec -n 4 provhpc run -o provenance -- python {train} --epochs 3 --fail-rank 2 "
       "--checkpoint checkpoints/failed.npz", work, e, check=False)  # it fails on purpose
    sh(f"python {os.path.join(ROOT, 'examples', 'multi_workflow.py')} --out provenance-mw",
       work, e)
    # a two-node run (one rank per node) whose node-b partition is cut to 3000 bytes
    sh("python -c \"from _post_runs import build_run; build_run('.', 'run-1')\" && "
       "truncate -s 3000 run-1/node-b.h5", work, e)
    end_runs(work, e)
    runs = sorted(d for d in os.listdir(os.path.join(work, "provenance")) if RUN_ID.match(d))
    return {"RUN": f"provenance/{runs[0]}", "LR2": f"provenance/{runs[1]}",
            "FAILED": f"provenance/{runs[2]}", "ids": runs,
            "mw": sorted(d for d in os.listdir(os.path.join(work, "provenance-mw"))
                         if RUN_ID.match(d))}


def end_runs(work: str, e: dict) -> None:
    """ends/<state>: one ``mpiexec -n 2`` job per end state, ended the way it names (the
    program of tests/test_end_states.py; terminated: SIGTERM to mpiexec; lost: SIGKILL
    to the aggregator and every process of the job)."""
    import signal
    import time

    import h5py

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_end_states import PROG

    prog = os.path.join(work, "ends.py")
    with open(prog, "w") as fh:
        fh.write(PROG)
    for how in ("completed", "failed", "killed", "terminated", "lost"):
        mode = "lost" if how in ("terminated", "lost") else how  # both wait to be stopped
        ee = {**e, "PROVHPC_RUN_ID": how, "PROVHPC_FLUSH_INTERVAL": "0.2"}
        cmd = ["mpiexec", "-n", "2", "provhpc", "run", "-o", "ends", "--", "python", prog,
               mode, os.path.join(work, f"mark-{how}")]
        p = subprocess.Popen(cmd, cwd=work, env=ee, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if mode != "lost":
            p.wait(120)
            continue
        deadline = time.monotonic() + 60
        while not all(os.path.exists(os.path.join(work, f"mark-{how}.{r}")) for r in (0, 1)):
            if time.monotonic() > deadline:
                raise SystemExit(f"regen: the {how} job did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        if how == "terminated":
            p.send_signal(signal.SIGTERM)  # mpiexec passes it to the ranks
            p.wait(60)
            continue
        (part,) = [f for f in os.listdir(os.path.join(work, "ends", how)) if f.endswith(".h5")]
        with h5py.File(os.path.join(work, "ends", how, part), "r", swmr=True,
                       locking=False) as f:
            agg = int(f.attrs["writer_pid"])
        os.kill(agg, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def old_ids(text: str) -> tuple[list[str], list[str]]:
    """The run ids of the old page's `provhpc ls provenance` and `ls provenance-mw` blocks."""
    def listed(cmd):
        m = re.search(r"\$ " + re.escape(cmd) + r"\n(.*?)```", text, re.S)
        return RUN_ID.findall(m.group(1)) if m else []
    return listed("provhpc ls provenance"), listed("provhpc ls provenance-mw")


def cut(new: list[str], old_len: int) -> list[str]:
    if len(new) <= MAX_LINES or len(new) <= old_len:
        return new
    keep = max(old_len, 12)
    return new[:keep] + [f"… ({len(new) - keep} more lines)"]


def regen(text: str, work: str, e: dict, v: dict) -> tuple[str, list[str]]:
    failures: list[str] = []
    lines = text.split("\n")
    out: list[str] = []
    ns: dict = {}
    i = 0
    pending_python: list[str] | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("```console") and lines[i + 1].startswith("$ cd "):
            j = i + 1  # how the runs were made (make_runs did it): kept as written
            while not lines[j].startswith("```"):
                j += 1
            out += lines[i:j + 1]
            i = j + 1
        elif line.startswith("```console"):
            out.append(line)
            i += 1
            while not lines[i].startswith("```"):
                if lines[i].startswith("$ "):
                    cmd = lines[i][2:]
                    j = i + 1
                    while not lines[j].startswith("```") and not lines[j].startswith("$ "):
                        j += 1
                    old_len = j - i - 1
                    out.append(lines[i])
                    printed = sh(cmd, work, e, check=False).rstrip("\n")
                    out += cut(printed.split("\n") if printed else [], old_len)
                    i = j
                else:
                    out.append(lines[i])
                    i += 1
            out.append(lines[i])
            i += 1
        elif line.startswith("```python"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            pending_python = lines[i + 1:j]
            out += lines[i:j + 1]
            i = j + 1
            buf = io.StringIO()
            cwd = os.getcwd()
            ok = True
            try:
                os.chdir(work)
                with contextlib.redirect_stdout(buf):
                    exec("\n".join(pending_python), ns)  # noqa: S102 - the page's own code
            except Exception as exc:  # noqa: BLE001 - reported, the page keeps the old text
                failures.append(f"python block at line {i}: {exc!r}")
                ok = False
            finally:
                os.chdir(cwd)
            if i < len(lines) and lines[i].startswith("```text"):
                j = i + 1
                while not lines[j].startswith("```"):
                    j += 1
                printed = buf.getvalue().rstrip("\n")
                out.append(lines[i])
                out += cut(printed.split("\n"), j - i - 1) if printed and ok \
                    else lines[i + 1:j]  # a block that failed keeps its text (reported)
                out.append(lines[j])
                i = j + 1
        else:
            out.append(line)
            i += 1
    return "\n".join(out), failures


def screenshot(work: str, e: dict) -> str | None:
    """docs/report.png: the report of the failed run (written by the page's report
    command) in headless Chromium, cropped, scaled to 60 % and quantised; None without
    chromium or Pillow."""
    page = os.path.join(work, "repf", "index.html")
    if not shutil.which("chromium") or not os.path.exists(page):
        return None
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    shot = os.path.join(work, "report-full.png")
    sh(f"chromium --headless --no-sandbox --disable-gpu --hide-scrollbars "
       f"--window-size=1100,5200 --screenshot={shot} file://{page}", work, e, check=False)
    im = Image.open(shot).convert("RGB")
    rows = np.flatnonzero((np.asarray(im) < 250).any(axis=(1, 2)))
    im = im.crop((0, 0, im.width, int(rows.max()) + 20))
    im = im.resize((im.width * 6 // 10, im.height * 6 // 10), Image.LANCZOS)
    out = os.path.join(ROOT, "docs", "report.png")
    im.quantize(colors=192, method=Image.Quantize.MEDIANCUT,
                dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/demo", help="where the runs are made (wiped)")
    ap.add_argument("--page", default=os.path.join(ROOT, "docs", "queries.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 when a block failed")
    args = ap.parse_args()
    e = env(args.work)
    with open(args.page) as fh:
        text = fh.read()
    old, old_mw = old_ids(text)
    v = make_runs(args.work, e)
    for a, b in list(zip(old, v["ids"])) + list(zip(old_mw, v["mw"])):
        text = text.replace(a, b)
    e.update({"RUN": v["RUN"], "LR2": v["LR2"], "FAILED": v["FAILED"],
              "TRAIN": os.path.join(ROOT, "examples", "train_mlp.py")})
    os.environ.update({"RUN": v["RUN"], "FAILED": v["FAILED"]})
    text, failures = regen(text, args.work, e, v)
    with open(args.page, "w") as fh:
        fh.write(text)
    shot = screenshot(args.work, e)
    if shot:
        print(f"regen: {shot} from {args.work}/repf/index.html")
    for f in failures:
        print(f"regen: {f}", file=sys.stderr)
    print(f"regen: {args.page} rewritten from the runs in {args.work}")
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
