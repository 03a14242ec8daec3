"""Issue 13 point 2: a merged run reads like its source with every verb.

A real ``mpiexec -n 2 provhpc run`` job (its manifest names its node), merged, is read by
summary, query, lineage, export, report and index, then queried through the index: each
verb exits 0, names no missing partition, and answers as on the source run.
"""

from __future__ import annotations

import json
import os
import subprocess

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples", "train_mlp.py")


def _cli(venv_bin, env, cwd, *args, rc=0):
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, (args, p.stdout, p.stderr)
    assert "missing" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    return p.stdout


def test_merge_then_every_verb_then_index_and_query(venv_bin, clean_env, tmp_path):
    subprocess.run([os.path.join(venv_bin, "mpiexec"), "-n", "2",
                    os.path.join(venv_bin, "provhpc"), "run", "--out", "prov", "--",
                    os.path.join(venv_bin, "python"), TRAIN, "--epochs", "2", "--files", "2",
                    "--traces", "60", "--samples", "128"],
                   cwd=tmp_path, env=clean_env, check=True, timeout=120, capture_output=True)

    def cli(*args, rc=0):
        return _cli(venv_bin, clean_env, tmp_path, *args, rc=rc)

    src = json.loads(cli("summary", "prov/latest", "--json"))
    cli("merge", "prov/latest", "-o", "m", "--json")
    run_dir = os.path.join("m", src["run_id"])  # named by its run id, not "latest"
    assert sorted(os.listdir(tmp_path / run_dir)) == ["manifest.json", "merged.h5"]
    with open(tmp_path / run_dir / "manifest.json") as fh:
        manifest = json.load(fh)
    assert manifest["partitions"] == ["merged.h5"] and manifest["run_id"] == src["run_id"]

    merged = json.loads(cli("summary", run_dir, "--json"))
    for key in ("run_id", "records_total", "records_by_kind", "nodes", "status",
                "world_size", "dropped_total", "duration_s"):
        assert merged[key] == src[key], key
    assert not merged["partition_errors"]

    tasks = json.loads(cli("query", run_dir, "tasks", "--json"))
    src_tasks = json.loads(cli("query", "prov/latest", "tasks", "--json"))
    assert tasks["count"] == src_tasks["count"] > 0
    assert {r["node"] for r in tasks["rows"]} == set(src["nodes"])  # not "merged"

    lin = json.loads(cli("lineage", run_dir, "checkpoints/mlp.npz", "--json"))
    assert any(n["name"].endswith("mlp.npz") for n in lin["nodes"])
    cli("export", run_dir, "--format", "prov-json", "-o", "d.json")
    with open(tmp_path / "d.json") as fh:
        assert json.load(fh)["activity"]
    if os.path.exists(os.path.join(venv_bin, "python")):
        cli("report", run_dir, "-o", "rep")
        assert os.path.exists(tmp_path / "rep" / "index.html")

    cli("index", run_dir)
    assert os.path.exists(tmp_path / run_dir / "index.hdf5")
    indexed = json.loads(cli("query", run_dir, "tasks", "--json"))
    assert indexed["rows"] == tasks["rows"]
    epochs = json.loads(cli("query", run_dir, "epochs", "--metric", "val_accuracy", "--json"))
    assert sorted({(r["rank"], r["epoch"]) for r in epochs}) == [(0, 0), (0, 1), (1, 0),
                                                                  (1, 1)]
