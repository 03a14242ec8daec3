"""``provhpc export --format ro-crate``: a Workflow Run RO-Crate, built with ``rocrate``.

The crate conforms to the Process Run Crate profile (0.5).  The Provenance Run Crate
profile describes a ComputationalWorkflow and its steps; a provhpc run is one program,
not a workflow of tools, so the Process Run Crate level is the one that fits.  It holds:

* each run as a ``CreateAction`` (start, end, ``actionStatus``, ``agent`` the person,
  ``participant`` the job), its ``object`` the inputs and hyperparameters, its
  ``result`` the outputs;
* each learning stage of the run as a ``CreateAction`` (its instances over ranks and
  epochs folded into one: first start, last end, failed if one failed);
* the script as the ``instrument``: a ``SoftwareApplication`` with its git commit as
  ``softwareVersion`` (and the dirty state);
* used and generated files as ``File`` entities with their content hash (``blake2b``, as
  captured) and, when the file on disk is still that content, its size; files stay where
  they are (``file://`` ids, the hash as fragment) unless ``with_files``, which copies
  into the crate each file whose content on disk is the one the run saw;
* hyperparameters as ``PropertyValue``s;
* the person (``Person``) and the job (``Organization``: schema.org's agents are persons
  or organisations) as agents.

A directory of runs is one crate with one action per run; a file used by one run and
made by another is one ``File`` entity, which links them.
"""

from __future__ import annotations

import datetime
import hashlib
import os

import numpy as np

from .questions import io_entities

__all__ = ["PROFILE", "to_rocrate"]

PROFILE = "https://w3id.org/ro/wfrun/process/0.5"
STATUS = {"completed": "CompletedActionStatus", "running": "ActiveActionStatus"}


def _iso(ns) -> str | None:
    if not ns or ns < 0:
        return None
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat()


def _blake2b(path: str) -> str:
    """The content hash as capture records it (BLAKE2b-128, ``provhpc.data(hash=True)``)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "blake2b:" + h.hexdigest()


def _rocrate():
    try:
        from rocrate.model import ContextEntity
        from rocrate.rocrate import ROCrate
    except ImportError as exc:
        raise ImportError("RO-Crate export needs rocrate: pip install 'provhpc[rocrate]'") \
            from exc
    return ROCrate, ContextEntity


def to_rocrate(source, out_dir: str, with_files: bool = False) -> str:
    """Write the crate of a run or of a directory of runs into ``out_dir``; its path."""
    ROCrate, ContextEntity = _rocrate()
    runs = list(getattr(source, "runs", None) or [source])
    crate = ROCrate()
    crate.root_dataset["name"] = (f"provhpc run {runs[0].run_id}" if len(runs) == 1 else
                                  f"provhpc runs {', '.join(r.run_id for r in runs)}")
    profile = crate.add(ContextEntity(crate, PROFILE, {
        "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"}))
    crate.root_dataset["conformsTo"] = [profile]
    files: dict[tuple, object] = {}

    def file_entity(key: str, cwd: str, kind: str, digest: str):
        """One ``File`` per (path, content): the same file seen by two runs is one entity
        (it links them); a path rewritten between runs is two, told apart by the hash."""
        path = key if os.path.isabs(key) else os.path.normpath(os.path.join(cwd, key))
        if (path, digest) in files:
            return files[(path, digest)]
        props = {"name": key, "provhpc:kind": kind}
        if digest:
            algo, _, value = digest.partition(":")
            props[algo if value else "contentHash"] = value or digest
        on_disk = os.path.isfile(path) and (not digest or _blake2b(path) == digest)
        if on_disk:  # the file there now is this one: its size (and, asked, a copy)
            props["contentSize"] = str(os.path.getsize(path))
        if with_files and on_disk:
            ent = crate.add_file(path, dest_path=f"data/{len(files)}-{os.path.basename(path)}",
                                 properties=props)
        else:  # not copied: a data entity named by its absolute file:// URI (+ its hash)
            ent = crate.add_file(f"file://{path}" + (f"#{digest}" if digest else ""),
                                 fetch_remote=False, properties=props)
        files[(path, digest)] = ent
        return ent

    for run in runs:
        meta, code, end = run.metadata(), run.code(), run.end()
        cwd = code["cwd"] or meta["job"]["cwd"]
        git = code["git"] or {}
        app = crate.add(ContextEntity(crate, f"#code-{run.run_id}", {
            "@type": "SoftwareApplication",
            "name": os.path.basename(code["script"] or "program"),
            "softwareVersion": git.get("commit") or "unknown",
            "provhpc:gitBranch": git.get("branch") or "",
            "provhpc:gitDirty": bool(git.get("dirty")),
            "provhpc:command": " ".join(code["command"])}))
        user = meta["job"]["user"] or "unknown"
        person = crate.get(f"#person-{user}") or crate.add(ContextEntity(
            crate, f"#person-{user}", {"@type": "Person", "name": user}))
        job_id = meta["job"]["id"] or run.run_id
        job = crate.add(ContextEntity(crate, f"#job-{job_id}", {
            "@type": "Organization", "name": f"job {job_id}",
            "description": f"{meta['launcher'] or 'no launcher'} job, {len(meta['nodes'])} "
                           f"node(s), {meta['world_size'] or len(meta['ranks'])} rank(s)"}))
        inputs, outputs = io_entities(run)
        hp = []
        for h in run.hyperparameters():
            for k, v in h["values"].items():
                hp.append(crate.add(ContextEntity(crate, f"#hp-{run.run_id}-{h['key']}-{k}", {
                    "@type": "PropertyValue", "name": k,
                    "value": v if isinstance(v, (int, float, str, bool)) else str(v)})))
        t0, t1 = run.time_range()
        status = STATUS.get(end["state"], "FailedActionStatus")
        action = crate.add_action(app, identifier=f"#run-{run.run_id}", properties={
            "name": f"run {run.run_id}", "startTime": _iso(meta.get("start") or t0),
            "endTime": _iso(meta.get("end") or t1),
            "actionStatus": {"@id": f"http://schema.org/{status}"}})
        action["agent"], action["participant"] = person, job
        action["object"] = [file_entity(i["key"], cwd, i["kind"], i["hash"]) for i in inputs
                            if i["kind"] != "hyperparameters"] + hp
        action["result"] = [file_entity(o["key"], cwd, o["kind"], o["hash"]) for o in outputs]
        if end["state"] == "failed":
            action["error"] = (f"rank {end['rank']}: {end.get('exception', '')}: "
                               f"{end.get('message', '')}").strip()
        t = np.asarray(run.tasks())
        stages = t[t["type"] == "stage"]
        for name in dict.fromkeys(stages["name"].tolist()):
            rows = stages[stages["name"] == name]
            ended = rows["end"][rows["end"] >= 0]
            failed = bool((rows["status"] == "error").any())
            step = crate.add_action(app, identifier=f"#stage-{run.run_id}-{name}", properties={
                "name": f"stage {name} of run {run.run_id}",
                "startTime": _iso(int(rows["start"].min())),
                "actionStatus": {"@id": "http://schema.org/" + (
                    "FailedActionStatus" if failed else "CompletedActionStatus"
                    if len(ended) == len(rows) else "ActiveActionStatus")}})
            if len(ended):
                step["endTime"] = _iso(int(ended.max()))
            step["agent"], step["isPartOf"] = person, action
    os.makedirs(out_dir, exist_ok=True)
    crate.write(out_dir)
    return os.path.join(out_dir, "ro-crate-metadata.json")
