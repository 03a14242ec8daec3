"""A requeued job's attempts: each its own run, linked (previous_attempt, wasInformedBy),
its checkpoint in the next attempt's lineage, listed together by ``provhpc ls``.

SLURM's requeue is exercised for real in tests/slurm/test_slurm_end.py; here the two
attempts are two real ``provhpc run`` jobs given what SLURM gives a requeued one: the same
``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT`` 0 then 1.
"""

import json
import os
import subprocess
import textwrap

PROGRAM = textwrap.dedent("""
    import os
    import numpy as np
    import provhpc

    if os.environ["SLURM_RESTART_COUNT"] == "0":
        with provhpc.task("save") as t:
            np.save("ckpt.npy", np.arange(3.0))
            t.generated(provhpc.data("ckpt.npy", kind="checkpoint"))
    else:
        with provhpc.task("resume") as t:
            t.used(provhpc.data("ckpt.npy", kind="checkpoint"))
            np.save("model.npy", np.load("ckpt.npy"))
            t.generated(provhpc.data("model.npy", kind="model"))
""")


def _attempt(venv_bin, env, cwd, n):
    e = {**env, "SLURM_JOB_ID": "424242", "SLURM_RESTART_COUNT": str(n)}
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), "run", "--out", "prov", "--",
                        os.path.join(venv_bin, "python"), "prog.py"], env=e, cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(os.path.join(cwd, "prov", "latest", "manifest.json")) as fh:
        return json.load(fh)


def _cli(venv_bin, env, cwd, *args):
    p = subprocess.run([os.path.join(venv_bin, "provhpc"), *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_attempts_are_linked_and_listed_together(venv_bin, clean_env, tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    # an unrelated run in the same directory, started between the two attempts
    other = _cli(venv_bin, clean_env, tmp_path, "run", "--out", "prov", "--",
                 os.path.join(venv_bin, "python"), "-c", "pass")
    del other
    m0 = _attempt(venv_bin, clean_env, tmp_path, 0)
    (tmp_path / "between.py").write_text("pass\n")
    _cli(venv_bin, clean_env, tmp_path, "run", "--out", "prov", "--",
         os.path.join(venv_bin, "python"), "between.py")
    m1 = _attempt(venv_bin, clean_env, tmp_path, 1)
    assert m0["meta"]["restart_count"] == 0 and "previous_attempt" not in m0
    assert m1["meta"]["restart_count"] == 1 and m1["previous_attempt"] == m0["run_id"]
    second = str(tmp_path / "prov" / m1["run_id"])

    # the checkpoint attempt 0 wrote is in the lineage of attempt 1's model
    lin = json.loads(_cli(venv_bin, clean_env, tmp_path, "lineage", "--json", second,
                          "model.npy"))
    acts = {(n["run"], n["name"]) for n in lin["nodes"] if n["type"] == "activity"}
    assert {(m0["run_id"], "save"), (m1["run_id"], "resume")} <= acts, acts

    # attempt 1's run activity wasInformedBy attempt 0's, in the PROV export too
    prov = json.loads(_cli(venv_bin, clean_env, tmp_path, "export", "--format",
                           "prov-json", second))
    ns = prov["prefix"]

    def run_of(qname):
        return ns[qname.split(":")[0]].rstrip("/#").rsplit("/", 1)[-1]

    informed = [v for v in prov.get("wasInformedBy", {}).values()
                if not v.get("provhpc:inferred") and run_of(v["prov:informant"]) == m0["run_id"]
                and run_of(v["prov:informed"]) == m1["run_id"]]
    assert informed, (prov.get("wasInformedBy"), ns)

    # ls: the attempts of job 424242 next to each other, oldest first
    rows = json.loads(_cli(venv_bin, clean_env, tmp_path, "ls", "--json", "prov"))
    ids = [r["run_id"] for r in rows]
    i = ids.index(m0["run_id"])
    assert ids[i + 1] == m1["run_id"], ids
    assert [rows[i]["attempt"], rows[i + 1]["attempt"]] == [0, 1]
    assert rows[i]["job"] == rows[i + 1]["job"] == "424242"

    text = _cli(venv_bin, clean_env, tmp_path, "summary", second)
    assert f"attempt 1 of its job, after run {m0['run_id']}" in text, text
