"""Reading runs: a run directory holds one partition per node plus a manifest.

Everything is read lazily and column-wise; a partition that cannot be opened
raises ``PartitionError`` naming its file, while the others stay readable.
"""

from __future__ import annotations

import json
import os
import socket
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, overload

import h5py
import numpy as np

from ..format import records as R
from ..format.partition import STRING_DTYPE, TIME_COUNTERS, open_partition
from ..format.procs import pid_alive
from . import tables as _tables
from .tables import TABLES

#: a partition that is not complete and was written less than this long ago is live: its
#: aggregator writes a heartbeat every 2 s (``node.aggregator.BEAT_S``)
LIVE_WINDOW_S = 15.0
#: the partition schema versions this reader understands (``format.records.SCHEMA_VERSION``)
SCHEMA_VERSIONS = (1,)
SAME_CHECK_NS = 50_000_000  # ranks an aggregator found dead within 50 ms: one check

if TYPE_CHECKING:
    from .index import Index

__all__ = [
    "LIVE_WINDOW_S", "SAME_CHECK_NS", "SCHEMA_VERSIONS", "Collection", "Partition",
    "PartitionError", "Run", "is_run_dir", "open_path", "record_end", "summary"
]


class PartitionError(OSError):
    """A partition file is missing, truncated or not a provhpc partition."""


def _open_file(path: str):
    """A closed partition opens plainly (a truncated file fails fast, naming its EOF);
    one still written, or left open by a killed writer, opens through SWMR."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "signature" in text.lower():
            raise PartitionError(f"{path}: cannot open partition ({text})") from exc
        return open_partition(path)


class Partition:
    """One node's partition file, opened read-only (also while it is being written)."""

    def __init__(self, path: str, run_id: str | None = None):
        self.path = path
        self._run_id = run_id
        self._tables: dict = {}
        if not os.path.exists(path):
            raise PartitionError(f"{path}: partition file is missing")
        try:
            self.f = _open_file(path)
            if self.f.attrs.get("format") != "provhpc-partition":
                raise PartitionError(f"{path}: not a provhpc partition")
            for name in ("records", "strings", "string_heap", "ranks"):
                if name not in self.f:
                    raise PartitionError(f"{path}: partition has no {name!r} dataset")
            self._validate()
        except PartitionError:
            if getattr(self, "f", None) is not None:
                self.f.close()
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError for bad files
            raise PartitionError(f"{path}: cannot open partition ({exc})") from exc

    def _validate(self) -> None:
        """What can be checked without reading the data: the schema version and the dtypes
        of the datasets (string-id bounds are checked when the records are decoded)."""
        version = self.f.attrs.get("schema_version", R.SCHEMA_VERSION)
        try:
            version = int(version)
        except (TypeError, ValueError):
            raise PartitionError(f"{self.path}: schema version {version!r} is not a "
                                 "number") from None
        if version not in SCHEMA_VERSIONS:
            raise PartitionError(f"{self.path}: schema version {version} is not one this "
                                 f"provhpc reads ({', '.join(map(str, SCHEMA_VERSIONS))}): "
                                 "written by another provhpc?")
        for name, want in (("records", R.RECORD_DTYPE), ("strings", STRING_DTYPE)):
            got = self.f[name].dtype
            if got != want:
                raise PartitionError(f"{self.path}: dataset /{name} has dtype {got}, not the "
                                     f"schema's {want}")
        heap = self.f["string_heap"].dtype
        if heap.kind != "u" or heap.itemsize != 1:
            raise PartitionError(f"{self.path}: dataset /string_heap has dtype {heap}, "
                                 "not uint8")
        ranks = self.f["ranks"].dtype.names or ()
        missing = [c for c in ("rank", "pid", "node", "role", "status") if c not in ranks]
        if missing:
            raise PartitionError(f"{self.path}: dataset /ranks lacks the column(s) "
                                 f"{', '.join(missing)}")

    def close(self) -> None:
        self.f.close()

    @property
    def node(self) -> str:
        return str(self.f.attrs.get("node", os.path.basename(self.path)[:-3]))

    @property
    def nodes(self) -> list[str]:
        """The nodes whose records this partition holds: its own, or a merged one's many."""
        names = {n.decode() for n in self.ranks()["node"]} - {""} if len(self.ranks()) else set()
        return sorted(names) if names and self.f.attrs.get("merged_from") is not None \
            else [self.node]

    @property
    def run_id(self) -> str:
        return self._run_id or str(self.f.attrs.get("run_id", ""))

    @property
    def complete(self) -> bool:
        return bool(self.f.attrs.get("complete", False))

    def refresh(self) -> bool:
        """See what its writer appended since it was opened; True when it grew.  A file read
        through SWMR is refreshed in place; a plain one (closed when it was opened, or a
        writer that has ended since) is reopened."""
        before = (self.f["records"].shape[0], self.f.attrs.get("complete"))
        if self.f.swmr_mode and not self.f.attrs.get("complete"):
            for name in ("records", "strings", "string_heap", "ranks", "counters", "drops"):
                if name in self.f:
                    self.f[name].refresh()
        else:
            self.f.close()
            self.f = _open_file(self.path)
        for cached in ("strings", "truncated_strings"):
            self.__dict__.pop(cached, None)
        grew = (self.f["records"].shape[0], self.f.attrs.get("complete")) != before
        if grew:
            self._tables = {}
        return grew

    def last_write_ns(self) -> int:
        """When its aggregator last wrote it (heartbeat counter or file mtime), ns since epoch."""
        beat = int(self.counters().get("heartbeat_ns", 0))
        try:
            beat = max(beat, os.stat(self.path).st_mtime_ns)
        except OSError:
            pass
        return beat

    def idle_s(self) -> float:
        """Seconds since its aggregator last wrote it."""
        return max(0.0, (time.time_ns() - self.last_write_ns()) / 1e9)

    @property
    def live(self) -> bool:
        """Not complete, and being written: its aggregator is alive (seen directly on its own
        host) or, from another host, wrote it within ``LIVE_WINDOW_S``."""
        if self.complete:
            return False
        host, pid = self.f.attrs.get("writer_host"), self.f.attrs.get("writer_pid")
        if host == socket.gethostname() and pid:
            return pid_alive(int(pid))
        return self.idle_s() < LIVE_WINDOW_S

    @property
    def attrs(self) -> dict:
        out = {}
        for k, v in self.f.attrs.items():
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v.item() if hasattr(v, "item") else v
        return out

    def __len__(self) -> int:
        return self.f["records"].shape[0]

    def _read(self, what, fn):
        try:
            return fn()
        except PartitionError:
            raise
        except Exception as exc:  # a corrupt chunk surfaces only when it is read
            raise PartitionError(f"{self.path}: cannot read {what} ({exc})") from exc

    def records(self, fields=None) -> np.ndarray:
        ds = self.f["records"]
        if fields is None:
            return self._read("records", lambda: ds[:])
        return self._read("records", lambda: ds.fields(list(fields))[:])

    def column(self, name: str) -> np.ndarray:
        return self._read("records", lambda: self.f["records"].fields(name)[:])

    @cached_property
    def strings(self) -> np.ndarray:
        """The string table as an object array indexed by string id."""
        idx = self._read("strings", lambda: self.f["strings"][:])
        heap = self._read("string_heap", lambda: self.f["string_heap"][:].tobytes())
        if len(idx) and int((idx["offset"] + idx["length"]).max()) > len(heap):
            raise PartitionError(f"{self.path}: the string table points beyond the string "
                                 f"heap ({len(heap)} bytes): a damaged partition")
        out = np.empty(len(idx), object)
        for i, (off, length, _flags) in enumerate(idx.tolist()):
            out[i] = heap[off:off + length].decode("utf-8", "replace")
        return out

    def check_string_ids(self, recs: np.ndarray) -> None:
        """Raise PartitionError when ``recs`` (with ``name`` and ``sval``) name a string the
        string table does not hold, or the table points beyond its heap."""
        n = self.f["strings"].shape[0]
        if len(recs) and max(int(recs["name"].max()), int(recs["sval"].max())) >= n:
            raise PartitionError(f"{self.path}: records name string ids beyond the string "
                                 f"table ({n} strings): a damaged partition")
        idx = self._read("strings", lambda: self.f["strings"][:])
        heap = self.f["string_heap"].shape[0]
        if len(idx) and int((idx["offset"] + idx["length"]).max()) > heap:
            raise PartitionError(f"{self.path}: the string table points beyond the string "
                                 f"heap ({heap} bytes): a damaged partition")

    @cached_property
    def truncated_strings(self) -> np.ndarray:
        return self.f["strings"].fields("flags")[:] & R.F_TRUNCATED != 0

    def ranks(self) -> np.ndarray:
        return self._read("ranks", lambda: self.f["ranks"][:])

    def senders(self, n: int) -> tuple[list[tuple[int, int]], np.ndarray] | None:
        """Which process sent each of the first ``n`` records, from the batch table:
        ``(processes, owner)``, ``processes`` the ``(rank, pid)`` pairs and ``owner[i]``
        the index of record ``i``'s, or -1 for a record no batch covers (the
        aggregator's own telemetry samples).  None for a partition without a batch table
        (one written before it existed)."""
        if "batches" not in self.f:
            return None
        b = self._read("batches", lambda: self.f["batches"][:])
        pairs = np.stack([b["rank"].astype(np.int64), b["pid"]], axis=1) if len(b) else \
            np.zeros((0, 2), np.int64)
        procs, which = np.unique(pairs, axis=0, return_inverse=True)
        counts, starts = b["count"].astype(np.int64), b["start"].astype(np.int64)
        pos = (np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts),
                                                        counts))
        inside = pos < n  # a batch noted after the records were read
        owner = np.full(n, -1, np.int64)
        owner[pos[inside]] = np.repeat(which.reshape(-1), counts)[inside]
        return [(int(r), int(pid)) for r, pid in procs.tolist()], owner

    def drops(self) -> np.ndarray:
        return self._read("drops", lambda: self.f["drops"][:]) if "drops" in self.f \
            else np.zeros(0, [("rank", "<i4"), ("pid", "<i8"), ("reason", "S32"), ("count", "<u8")])

    def counters(self) -> dict:
        if "counters" not in self.f:
            return {}
        return {r["name"].decode(): int(r["value"]) for r in self.f["counters"][:]}

    def record_nodes(self, ranks: np.ndarray) -> np.ndarray:
        """The node of each record, from the rank table (a merged partition holds many nodes)."""
        table = self.ranks()
        out = np.full(len(ranks), self.node, object)
        if len(table):
            keys = table["rank"]
            names = np.array([n.decode() or self.node for n in table["node"]], object)
            order = np.argsort(keys, kind="stable")
            pos = np.clip(np.searchsorted(keys[order], ranks), 0, len(keys) - 1)
            hit = keys[order][pos] == ranks
            out[hit] = names[order][pos][hit]
        return out

    def tables(self) -> dict:
        """Per-kind tables of this partition (see ``provhpc.tables``), decoded once."""
        if not self._tables:
            recs = self.records()
            strings = self.strings
            self.check_string_ids(recs)
            self._tables = self._read("tables", lambda: _tables.decode(
                recs, strings, self.run_id, self.record_nodes(recs["rank"])))
            self._tables["time_range"] = ((int(recs["t"].min()), int(recs["t"].max()))
                                          if len(recs) else (0, 0))
        return self._tables




class _Tables:
    """The table accessors shared by a run and a collection of runs (both define ``table``)."""

    def tasks(self):
        """Activities (run, stages, epochs, tasks): one row each, start and end joined."""
        return self.table("tasks")

    def entities(self):
        return self.table("entities")

    def metrics(self):
        return self.table("metrics")

    def attributes(self):
        return self.table("attributes")

    def relations(self):
        return self.table("relations")


class Run(_Tables):
    """A run directory: its partitions (``<node>.h5``) and manifest.

    Tables (``tasks()``, ``entities()``, ``metrics()``, ``attributes()``,
    ``relations()``) are decoded on first use, one partition at a time; a
    partition that fails is listed in ``errors`` (naming its file) and the
    others stay readable.  ``select`` restricts the run to some partitions
    (``mpiexec -n N provhpc query`` gives each rank ``paths[rank::N]``).
    """

    def __init__(self, path: str, select=None, use_index: bool = True):
        self.path = os.path.abspath(path)
        self.use_index = use_index
        self._index: Index | Literal[False] | None = False  # not looked up yet
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{path}: no such run directory")
        self.all_partition_paths = sorted(
            os.path.join(self.path, f) for f in os.listdir(self.path) if f.endswith(".h5"))
        self.partition_paths = (self.all_partition_paths if select is None
                                else list(select(self.all_partition_paths)))
        self.errors: dict[str, str] = {}
        self._partitions: list[Partition] | None = None
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"<provhpc.Run {self.run_id} partitions={len(self.partition_paths)}>"

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id") or os.path.basename(self.path)

    @cached_property
    def manifest(self) -> dict:
        try:
            with open(os.path.join(self.path, "manifest.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    @property
    def partitions(self) -> list[Partition]:
        """The partitions that open; the others are listed in ``errors``."""
        if self._partitions is None:
            self._partitions = []
            for p in self.partition_paths:
                try:
                    self._partitions.append(Partition(p, self.run_id))
                except PartitionError as exc:
                    self.errors[p] = str(exc)
            for p in self.missing_partitions():
                self.errors[p] = f"{p}: partition file is missing"
        return self._partitions

    @property
    def status(self) -> str:
        """How the run ended: the manifest's final status (``ok``, ``error``, ``killed``…),
        ``running`` only while an aggregator still writes it.  A manifest left at
        ``running`` by a job whose processes are gone (rank 0 killed before it wrote the
        end) reads from its ranks: ``error`` if one raised, else ``terminated`` if one got
        SIGTERM/SIGINT, else ``killed`` if one died
        while its aggregator ran, else ``lost`` if no one wrote an end (the aggregators died
        too), else ``ended`` (no final status was written).  ``end()`` says more."""
        status = self.manifest.get("status")
        if status not in (None, "running") or self.live or \
                self._a_rank_runs_here(finishing=status == "running"):
            return status or "running"
        ranks = [r["status"] for r in self.ranks() if r["role"] == "rank"]
        if "error" in ranks:
            return "error"
        if "terminated" in ranks:
            return "terminated"
        if "killed" in ranks:
            return "killed"
        if any(r in ("lost", "running", "salvaged") for r in ranks):
            return "lost"  # no process left and nobody wrote an end (recover: salvaged)
        return "ended" if ranks else "unknown"

    def end(self) -> dict:
        """How the job ended, from the manifest and the ranks' tables: ``state`` is

        ``running`` (an aggregator writes, or a running rank lives here), ``completed``
        (every rank ended ok, exit 0), ``failed`` (a rank raised: ``rank``,
        ``exit_code``, ``exception``, ``message``, ``where`` = the last frame of its
        traceback), ``terminated`` (a rank got SIGTERM/SIGINT), ``killed`` (ranks died
        without a goodbye while their aggregator ran: ``ranks`` in the order their
        aggregator saw them go, ``first``), or ``lost`` (no process left and nobody wrote
        an end: the whole job, aggregators too, was killed, or its node died).

        A job of a batch scheduler that did not complete also carries ``scheduler``: what
        SLURM says of it (``node.scheduler.verdict``), and ``cause``, its word for why:
        ``timeout``, ``cancelled``, ``preempted``, ``requeued``, ``node_fail``… (``None``
        where it cannot tell)."""
        out = self._end_from_ranks()
        if out["state"] not in ("running", "completed"):
            said = self.scheduler()
            if said is not None:
                out["scheduler"], out["cause"] = said, said.get("verdict")
        return out

    def scheduler(self) -> dict | None:
        """What the batch scheduler says of this run's job, or None (not a SLURM job, or
        SLURM forgot it).  A final verdict stored in the manifest (by rank 0, ``recover``
        or the SLURM epilog) is used as it is; otherwise SLURM is asked, once per Run."""
        stored = self.manifest.get("scheduler")
        if isinstance(stored, dict) and stored.get("final"):
            return stored
        if "scheduler" not in self._cache:
            meta = self.manifest.get("meta") or {}
            asked = None
            if meta.get("job_id") and (meta.get("scheduler") == "slurm"
                                       or meta.get("launcher") == "srun"):
                from ..node.scheduler import verdict

                asked = verdict(str(meta["job_id"]), int(meta.get("restart_count") or 0))
            self._cache["scheduler"] = asked or stored or None
        return self._cache["scheduler"]

    @property
    def attempt(self) -> int:
        """Which attempt of its job this run is: 0 first, N after the N-th requeue."""
        n = (self.manifest.get("meta") or {}).get("restart_count") or 0
        return n if isinstance(n, int) else 0

    @property
    def previous_attempt(self) -> str:
        """The run id of the attempt of this job before a requeue or restart, or ''."""
        return str(self.manifest.get("previous_attempt") or "")

    def attempts(self) -> list[Run]:
        """The earlier attempts of this run's job found beside it, oldest first (a missing
        one ends the chain), this run not included."""
        chain: list[Run] = []
        seen, prev = {self.run_id}, self.previous_attempt
        while prev and prev not in seen:
            seen.add(prev)
            path = os.path.join(os.path.dirname(self.path), prev)
            if not is_run_dir(path):
                break
            run = Run(path)
            chain.insert(0, run)
            prev = run.previous_attempt
        return chain

    def _end_from_ranks(self) -> dict:
        if self.status == "running":
            return {"state": "running"}
        ranks = [r for r in self.ranks() if r["role"] == "rank"]
        by_status: dict[str, list] = {}
        for r in ranks:
            by_status.setdefault(r["status"], []).append(r)
        if by_status.get("error"):
            r = by_status["error"][0]
            out = {"state": "failed", "rank": r["rank"], "exit_code": r["exit_code"],
                   "exception": "", "message": "", "where": ""}
            t = np.asarray(self.tasks())
            run_act = t[(t["rank"] == r["rank"]) & (t["type"] == "run")
                        & (t["status"] == "error")]
            if len(run_act):
                a = np.asarray(self.attributes())
                mine = a[(a["rank"] == r["rank"]) & (a["owner"] == run_act["id"][0])]
                vals = dict(zip(mine["key"].tolist(), mine["value"].tolist()))
                out.update(exception=str(run_act["error"][0]),
                           message=str(vals.get("exception", "")),
                           where=str(vals.get("where", "")))
            return out
        if by_status.get("terminated"):
            return {"state": "terminated", "ranks": [r["rank"] for r in
                                                     by_status["terminated"]]}
        gone = by_status.get("killed", [])  # seen dying by their aggregator
        if gone:
            gone.sort(key=lambda r: (r["end"] if r["end"] > 0 else 1 << 62, r["rank"]))
            # the aggregator sees deaths once per liveness check: ranks found dead in the
            # same check died "together", and which of them went first is not known
            ends = [r["end"] for r in gone if r["end"] > 0]
            first = gone[0]["rank"] if len(ends) == len(gone) and (
                len(ends) == 1 or ends[1] - ends[0] >= SAME_CHECK_NS) else None
            return {"state": "killed", "ranks": [r["rank"] for r in gone], "first": first,
                    "signal": None}
        lost = by_status.get("running", []) + by_status.get("lost", []) + \
            by_status.get("salvaged", [])  # salvaged: by recover, after the job was lost
        if lost or not ranks:
            return {"state": "lost", "ranks": sorted(r["rank"] for r in lost)}
        if all(r["status"] == "ok" and r["exit_code"] == 0 for r in ranks):
            return {"state": "completed"}
        return {"state": "failed", "rank": next(r["rank"] for r in ranks
                                                if r["exit_code"] != 0),
                "exit_code": next(r["exit_code"] for r in ranks if r["exit_code"] != 0),
                "exception": "", "message": "", "where": ""}

    def _a_rank_runs_here(self, finishing: bool = False) -> bool:
        """A rank said to be running whose process is alive on this host (its aggregator
        may be gone while the job goes on), or, with ``finishing`` (the manifest says
        running), rank 0 still finishing: it said goodbye and waits for its aggregator
        before it writes the manifest's end.  Rank 0 finishes while its process lives (seen
        on its own host) or, seen from another host, for ``LIVE_WINDOW_S`` after its
        goodbye."""
        here, now = socket.gethostname(), time.time_ns()
        for p in self.partitions:
            writer = p.f.attrs.get("writer_host")
            for r in p.ranks():
                said = r["status"].decode()
                if r["role"].decode() != "rank" or \
                        (said != "running" and not (finishing and r["rank"] == 0)):
                    continue
                if (r["host"].decode() or writer) == here:
                    if pid_alive(int(r["pid"]), int(r["start"])):
                        return True
                elif said != "running" and now - int(r["end"]) < LIVE_WINDOW_S * 1e9:
                    return True
        return False

    @property
    def status_note(self) -> str:
        """Why ``status`` differs from the manifest's, or ''."""
        said = self.manifest.get("status")
        if said == "running" and self.status != "running":
            return ("the manifest says running, but nothing writes the run any more: read "
                    "from its ranks")
        return ""

    @property
    def live(self) -> bool:
        """Is an aggregator of this run still writing (a partition is ``live``)?"""
        return any(p.live for p in self.partitions)

    def missing_partitions(self) -> list[str]:
        """Partitions of nodes that left an aggregator log (or are in the manifest) but no file.

        A manifest that lists its ``partitions`` (``provhpc merge`` writes one) names them
        itself; otherwise each of its ``nodes`` has ``<node>.h5``."""
        if self.partition_paths is not self.all_partition_paths:
            return []  # a selection checks only what it was given
        listed = self.manifest.get("partitions")
        if isinstance(listed, list):
            return sorted(p for p in (os.path.join(self.path, str(n)) for n in listed)
                          if not os.path.exists(p))
        nodes = set(self.manifest.get("nodes") or [])
        nodes.update(f[:-len(".aggregator.log")] for f in os.listdir(self.path)
                     if f.endswith(".aggregator.log"))
        paths = {os.path.join(self.path, f"{n}.h5") for n in nodes}
        for part in self._partitions or []:  # merged by an older provhpc: its manifest is
            merged = part.f.attrs.get("merged_from")  # the source's, naming the sources
            if isinstance(merged, str) and merged.startswith("["):
                merged = json.loads(merged)
            if merged is not None:
                paths -= {os.path.join(self.path, os.path.basename(str(m)))
                          for m in np.atleast_1d(merged)}
        return sorted(p for p in paths if not os.path.exists(p))

    @property
    def index(self) -> Index | None:
        """The run's ``index.hdf5`` when it exists and matches the partitions (``provhpc
        index``), else None; never for a selection of partitions."""
        if self._index is False:
            self._index = None
            if self.use_index and self.partition_paths is self.all_partition_paths:
                from . import index as _index

                self._index = _index.load(self)
        return self._index

    def refresh(self) -> bool:
        """See the records appended since the run was opened (a live run), without
        reopening every file: each partition is refreshed in place, a new partition
        (a node that joined) is opened, and the decoded tables are dropped.  True when
        something changed."""
        changed = False
        for p in self._partitions or []:
            try:
                changed |= p.refresh()
            except (PartitionError, OSError) as exc:
                self.errors[p.path] = str(exc)
        paths = sorted(os.path.join(self.path, f) for f in os.listdir(self.path)
                       if f.endswith(".h5"))
        if paths != self.all_partition_paths and self.partition_paths is \
                self.all_partition_paths:
            self.close()
            self.all_partition_paths = self.partition_paths = paths
            changed = True
        self.__dict__.pop("manifest", None)
        if changed:
            self._cache.clear()
            self._index = False
        return changed

    def snapshot(self) -> dict:
        """What each rank is doing now, from the partitions alone (``provhpc watch``): its
        node, stage, epoch, step, latest metric values, records, drops, step rate and
        seconds since its last record; job progress, drops and the nodes' telemetry."""
        from .watch import snapshot

        return snapshot(self)

    def close(self) -> None:
        for p in self._partitions or []:
            p.close()
        self._partitions = None
        if self._index:
            self._index.close()
        self._index = False
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ tables
    def table(self, name: str) -> _tables.Table:
        """One of ``TABLES`` over all readable partitions."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
        if name not in self._cache and self.index is not None:
            self._cache[name] = self.index.table(name)
        if name not in self._cache:
            parts = []
            readable = self.partitions
            for p in list(readable):
                try:
                    parts.append(p.tables()[name])
                except PartitionError as exc:
                    self.errors[p.path] = str(exc)
                    readable.remove(p)
            self._cache[name] = _tables.concat(name, parts)
        return self._cache[name]


    def time_range(self) -> tuple[int, int]:
        """First and last record time (ns) over the readable partitions."""
        if self.index is not None:
            return self.index.time_range
        ranges = []
        for p in self.partitions:
            try:
                ranges.append(p.tables()["time_range"])
            except PartitionError as exc:
                self.errors[p.path] = str(exc)
        ranges = [r for r in ranges if r != (0, 0)]
        if not ranges:
            return (0, 0)
        return (min(r[0] for r in ranges), max(r[1] for r in ranges))

    def timeline(self, rank=None):
        """Activities sorted by (rank, start), optionally of some ranks: the per-rank timeline."""
        t = np.asarray(self.tasks())
        if rank is not None:
            t = t[np.isin(t["rank"], np.atleast_1d(rank))]
        return _tables.as_table(t[np.lexsort((t["start"], t["rank"]))])

    # ------------------------------------------------------------------ metadata
    def ranks(self) -> list[dict]:
        rows = []
        for p in self.partitions:
            for r in p.ranks():
                rows.append({"rank": int(r["rank"]), "local_rank": int(r["local_rank"]),
                             "pid": int(r["pid"]), "role": r["role"].decode(),
                             "host": r["host"].decode(), "node": r["node"].decode(),
                             "gpu": r["gpu"].decode(), "start": int(r["start"]),
                             "end": int(r["end"]), "status": r["status"].decode(),
                             "exit_code": int(r["exit_code"]), "records": int(r["records"]),
                             "reported": int(r["reported"]), "dropped": int(r["dropped"]),
                             "salvaged": int(r["salvaged"])})
        return sorted(rows, key=lambda r: (r["rank"], r["pid"]))

    def drops(self) -> list[dict]:
        out = []
        for p in self.partitions:
            for d in p.drops():
                out.append({"rank": int(d["rank"]), "pid": int(d["pid"]),
                            "reason": d["reason"].decode(), "count": int(d["count"])})
        return out

    def _meta(self) -> dict:
        meta = dict(self.manifest.get("meta") or {})
        if not meta and self.partitions:
            meta = dict(self.partitions[0].attrs.get("meta") or {})
        return meta

    def code(self) -> dict:
        """The code the run executed: script, command, working directory and git state
        (``commit``, ``branch``, ``dirty``, ``root``; None where the script is in no git
        work tree).  The lineage graph holds it as the run's ``code`` entity."""
        meta = self._meta()
        env = meta.get("environment") or {}
        argv = list(env.get("command") or meta.get("argv") or [])
        script = env.get("script") or next((a for a in argv[1:] if a.endswith(".py")),
                                           argv[0] if argv else "")
        git = env.get("git") or {}
        return {"script": script, "command": argv, "cwd": meta.get("cwd", ""),
                "git": {k: git.get(k) for k in ("commit", "branch", "dirty", "root")}
                | ({"changed": git["changed"]} if git.get("changed") else {})
                if git else None}

    def environment(self) -> dict:
        """Python, platform, host, package versions (torch included when installed) and the
        captured environment variables of rank 0."""
        meta = self._meta()
        env = meta.get("environment") or {}
        versions = ("provhpc", "numpy", "h5py", "pyzmq", "mpi4py", "torch")
        return {"python": env.get("python") or {"version": meta.get("python")},
                "platform": env.get("platform") or {}, "host": env.get("host", ""),
                "packages": env.get("packages") or {k: meta[k] for k in versions if k in meta},
                "env": env.get("env") or {}}

    def hyperparameters(self) -> list[dict]:
        """Every hyperparameters entity with its values; one row for the ranks that logged
        the same key and values (``ranks``), one per distinct set otherwise."""
        e = np.asarray(self.entities())
        e = e[e["kind"] == "hyperparameters"]
        a = np.asarray(self.attributes())
        a = a[a["role"] == "attribute"] if len(a) else a
        by_owner: dict[tuple, dict] = {}
        for rank, owner, key, value in zip(a["rank"].tolist(), a["owner"].tolist(),
                                           a["key"].tolist(), a["value"].tolist()):
            by_owner.setdefault((rank, owner), {})[key] = value
        rows: dict[tuple, dict] = {}
        for rank, ident, key in zip(e["rank"].tolist(), e["id"].tolist(), e["key"].tolist()):
            values = {k: v for k, v in by_owner.get((rank, ident), {}).items() if k != "hash"}
            sig = (key, json.dumps(values, sort_keys=True, default=str))
            row = rows.setdefault(sig, {"key": key, "values": values, "ranks": []})
            if rank not in row["ranks"]:
                row["ranks"].append(rank)
        for row in rows.values():
            row["ranks"].sort()
        return sorted(rows.values(), key=lambda r: (r["ranks"][0], r["key"]))

    def metadata(self) -> dict:
        """Job, launcher, nodes, ranks, effective configuration, versions, code,
        environment, drops."""
        m = self.manifest
        meta = self._meta()
        config = m.get("config") or (self.partitions[0].attrs.get("config")
                                     if self.partitions else {}) or {}
        version_keys = ("provhpc", "python", "numpy", "h5py", "pyzmq", "hdf5")
        ranks = self.ranks()
        return {
            "run_id": self.run_id, "path": self.path, "status": self.status,
            "status_note": self.status_note,
            "exit_code": m.get("exit_code"), "start": m.get("start"), "end": m.get("end"),
            "job": {"id": meta.get("job_id", ""), "step": meta.get("step_id", ""),
                    "user": meta.get("user", ""), "argv": meta.get("argv", []),
                    "cwd": meta.get("cwd", "")},
            "launcher": meta.get("launcher", ""),
            "nodes": sorted({r["node"] for r in ranks}
                            | {n for p in self.partitions for n in p.nodes}),
            "ranks": sorted({r["rank"] for r in ranks if r["role"] == "rank"}),
            "world_size": meta.get("world_size"),
            "config": config, "config_sources": m.get("config_sources", {}),
            "versions": {**{k: meta[k] for k in version_keys if k in meta},
                         **({"writer": self.partitions[0].attrs.get("writer", "")}
                            if self.partitions else {})},
            "code": self.code(), "environment": self.environment(),
            "dropped_by_reason": _drop_reasons(self.drops()),
            "partition_errors": dict(self.errors),
        }


def _drop_reasons(drops) -> dict:
    reasons: dict[str, int] = {}
    for d in drops:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + d["count"]
    return reasons


def record_end(run: Run) -> dict:
    """Write how ``run`` ended into its manifest (``ended``; ``scheduler`` where SLURM's
    verdict is final; ``status`` where the manifest still said running) and return it.
    Nothing is written for a run still running.  ``provhpc recover`` and the SLURM epilog
    (``jobs/slurm-epilog.sh``) call it once the job is gone."""
    end = run.end()
    if end["state"] == "running":
        return end
    path = os.path.join(run.path, "manifest.json")
    doc = dict(run.manifest)
    doc["ended"] = end
    if end.get("scheduler") and not (doc.get("scheduler") or {}).get("final"):
        doc["scheduler"] = end["scheduler"]  # not final: the readers ask SLURM again
    if doc.get("status") in (None, "running"):
        doc["status"], doc["status_by"] = run.status, "provhpc recover (read from the ranks)"
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    run.__dict__.pop("manifest", None)  # cached_property: read the new one
    return end


def is_run_dir(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "manifest.json" in names or any(f.endswith(".h5") for f in names)


class Collection(_Tables):
    """A directory of runs, for cross-run questions (``best``, multi-workflow lineage).

    Where a single run is expected (``summary``, ``with ... as run``) a
    collection stands for its latest run, as the CLI has always read an
    output directory.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        seen, runs = set(), []
        for name in sorted(os.listdir(self.path)):
            sub = os.path.join(self.path, name)
            real = os.path.realpath(sub)
            if os.path.isdir(sub) and real not in seen and name != "latest" \
                    and is_run_dir(sub):
                seen.add(real)
                runs.append(Run(sub))
        if not runs:
            raise FileNotFoundError(f"{path}: no runs in this directory")
        self.runs = sorted(runs, key=lambda r: (r.manifest.get("start") or 0, r.run_id))
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"<provhpc.Collection {self.path} runs={len(self.runs)}>"

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.runs[key]
        for r in self.runs:
            if r.run_id == key or os.path.basename(r.path) == key:
                return r
        raise KeyError(key)

    @property
    def latest(self) -> Run:
        link = os.path.join(self.path, "latest")
        if os.path.isdir(link):
            real = os.path.realpath(link)
            for r in self.runs:
                if os.path.realpath(r.path) == real:
                    return r
        return self.runs[-1]

    def __getattr__(self, name):
        if name.startswith("_") or name in ("runs", "path"):
            raise AttributeError(name)
        return getattr(self.latest, name)

    def table(self, name: str):
        if name not in self._cache:
            self._cache[name] = _tables.concat(name, [r.table(name) for r in self.runs])
        return self._cache[name]


    @property
    def errors(self) -> dict:
        out = {}
        for r in self.runs:
            r.partitions  # noqa: B018 - opening lists the errors
            out.update(r.errors)
        return out

    def close(self) -> None:
        for r in self.runs:
            r.close()
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_path(path: str, select=None):
    """A ``Run`` for a run directory, a ``Collection`` for a directory of runs."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run or directory")
    if os.path.isdir(path) and not is_run_dir(path):
        if select is not None:
            link = os.path.join(path, "latest")
            return Run(link if os.path.isdir(link) else Collection(path).latest.path, select)
        return Collection(path)
    return Run(path, select)


def _summary_part(run) -> dict:
    """The per-partition counts of ``summary`` (combined across MPI ranks by ``combine``).

    Records are counted by kind per sending process: ``(rank, pid)``, from the batch
    table; ``(rank, None)`` for a partition without one; ``(None, None)`` for the
    telemetry samples the aggregator wrote itself."""
    per_proc_kinds: dict[tuple, dict] = {}
    t0, t1 = None, None
    for p in run.partitions:
        try:
            cols = p.records(["kind", "rank", "t", "name", "sval"])
            p.check_string_ids(cols)  # summary vouches for the partition: its strings too
            senders = p.senders(len(cols))
        except PartitionError as exc:
            run.errors[p.path] = str(exc)
            continue
        if len(cols):
            lo, hi = int(cols["t"].min()), int(cols["t"].max())
            t0 = lo if t0 is None else min(t0, lo)
            t1 = hi if t1 is None else max(t1, hi)
        procs: list[tuple[int | None, int | None]]
        if senders is None:
            ranks, owner = np.unique(cols["rank"], return_inverse=True)
            procs = [(int(r), None) for r in ranks.tolist()]
        else:
            procs = [*senders[0], (None, None)]  # owner -1: the last row of counts
            owner = senders[1]
        counts = np.zeros((len(procs), 8), np.int64)
        np.add.at(counts, (owner, np.minimum(cols["kind"], 7)), 1)
        for i, proc in enumerate(procs):
            d = per_proc_kinds.setdefault(proc, {})
            for k, name in R.KIND_NAMES.items():
                if counts[i, k]:
                    d[name] = d.get(name, 0) + int(counts[i, k])
    counters: dict[str, int] = {}
    for p in run.partitions:
        for k, v in p.counters().items():
            counters[k] = counters.get(k, 0) + v
    good = [p for p in run.partitions if p.path not in run.errors]
    return {"per_proc_kinds": per_proc_kinds, "t0": t0, "t1": t1,
            "ranks": run.ranks(), "drops": run.drops(), "counters": counters,
            "errors": dict(run.errors), "nodes": [n for p in good for n in p.nodes],
            "partitions": [{"path": p.path, "node": p.node, "complete": p.complete,
                            "live": p.live, "last_write_ns": p.last_write_ns(),
                            "records": len(p)} for p in good]}


def _combine(run, parts: list) -> dict:
    per_proc_kinds: dict[tuple, dict] = {}
    kinds_total: dict[str, int] = {}
    counters: dict[str, int] = {}
    ranks, drops, partitions, errors, nodes = [], [], [], {}, set()
    t0s = [p["t0"] for p in parts if p["t0"] is not None]
    t1s = [p["t1"] for p in parts if p["t1"] is not None]
    for part in parts:
        for proc, d in part["per_proc_kinds"].items():
            mine = per_proc_kinds.setdefault(proc, {})
            for k, v in d.items():
                mine[k] = mine.get(k, 0) + v
                kinds_total[k] = kinds_total.get(k, 0) + v
        for k, v in part["counters"].items():
            counters[k] = max(counters.get(k, 0), v) if k in TIME_COUNTERS \
                else counters.get(k, 0) + v
        ranks += part["ranks"]
        drops += part["drops"]
        partitions += part["partitions"]
        errors.update(part["errors"])
        nodes.update(part["nodes"])
    ranks.sort(key=lambda r: (r["rank"], r["pid"]))
    partitions.sort(key=lambda p: p["path"])
    reasons = _drop_reasons(drops)
    written_lost = counters.get("dropped_records", 0) - sum(reasons.values())
    if written_lost > 0:
        reasons["aggregator_write"] = reasons.get("aggregator_write", 0) + written_lost
    return {
        "run_id": run.run_id,
        "path": run.path,
        "nodes": sorted(nodes),
        "partitions": partitions,
        "partition_errors": errors,
        "ranks": [{**r, "records_by_kind": _kinds_of(per_proc_kinds, r)} for r in ranks],
        "world_size": len({r["rank"] for r in ranks}),
        "records_total": int(sum(p["records"] for p in partitions)),
        "telemetry_records": sum(per_proc_kinds.get((None, None), {}).values()),
        "dropped_total": int(sum(reasons.values())),
        "dropped_by_reason": reasons,
        "records_by_kind": kinds_total,
        "counters": counters,
        "duration_s": (max(t1s) - min(t0s)) / 1e9 if t0s else 0.0,
        "status": run.status, "status_note": run.status_note, "end": run.end(),
        "attempt": run.attempt, "previous_attempt": run.previous_attempt,
        "code": run.code(),
        "environment": {k: v for k, v in run.environment().items() if k != "env"},
    }


def _kinds_of(per_proc_kinds: dict, row: dict) -> dict:
    """The records by kind of one rank-table row: what its process sent; from a partition
    without a batch table, everything of its rank, on the rank's own row."""
    mine = dict(per_proc_kinds.get((row["rank"], row["pid"]), {}))
    if row["role"] == "rank":
        for k, v in per_proc_kinds.get((row["rank"], None), {}).items():
            mine[k] = mine.get(k, 0) + v
    return mine


@overload
def summary(run, comm: None = None) -> dict: ...
@overload
def summary(run, comm: Any) -> dict | None: ...
def summary(run, comm=None) -> dict | None:
    """Ranks, nodes, records by kind per rank, drops, duration: the `provhpc summary` view.

    With ``comm`` (an mpi4py communicator, and ``run`` opened with a
    selection of partitions per rank) the counts are gathered on rank 0;
    other ranks get None.
    """
    if isinstance(run, Collection):
        run = run.latest
    if comm is None:
        return _combine(run, [_summary_part(run)])
    from .mpi_post import gather_or_raise

    parts = gather_or_raise(comm, lambda: _summary_part(run))
    return _combine(run, parts) if parts is not None else None
