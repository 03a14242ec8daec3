"""Settings: argument, then ``PROVHPC_*`` environment variable, then default.

A bad argument raises ``ValueError``; a bad environment value warns and falls
back to the default; unknown keys are rejected.  The effective configuration
is written into every partition.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

__all__ = ["Config", "SETTINGS", "load", "markdown_table", "to_environ"]


def _positive_int(v):
    v = int(v)
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def _nonneg_float(v):
    v = float(v)
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


def _positive_float(v):
    v = float(v)
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def _bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/0/true/false/yes/no/on/off")


def _compression(v):
    v = str(v).lower()
    if v not in ("none", "lzf", "gzip"):
        raise ValueError("must be none, lzf or gzip")
    return v


def _nonneg_int(v):
    v = int(v)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _text(v):
    return str(v)


_WILDCARDS = ("*", "0.0.0.0", "::", "[::]", "[::0]", "::0", "")


def _tcp_endpoint(var):
    def parse(v):
        v = str(v).strip()
        if not v:
            return ""
        if not v.startswith("tcp://") or ":" not in v[6:]:
            raise ValueError(f"{var} must be tcp://ADDRESS:PORT")
        host, _, port = v[6:].rpartition(":")
        if host in _WILDCARDS:
            raise ValueError(f"{var} must name one interface's address, not the wildcard "
                             f"{host or '(empty)'!r} (every interface)")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{var} needs a port number 1..65535, not {port!r}")
        return v
    return parse


# name -> (environment variable, default, parser, help)
SETTINGS = {
    "enabled": ("PROVHPC_ENABLED", True, _bool, "Capture on (1) or off (0) under `provhpc run`."),
    "out": ("PROVHPC_OUT", "provenance", _text, "Output directory; a run writes DIR/<run_id>/."),
    "run_id": ("PROVHPC_RUN_ID", "", _text,
               "Run identity; empty = chosen by rank 0 and broadcast (MPI) or from the job. "
               "A run id another job holds is refused before the program starts."),
    "flush_interval": ("PROVHPC_FLUSH_INTERVAL", 1.0, _positive_float,
                       "Seconds after which a partly filled slot is handed to the aggregator."),
    "slot_records": ("PROVHPC_SLOT_RECORDS", 4096, _positive_int,
                     "Records per shared-memory slot."),
    "slots": ("PROVHPC_SLOTS", 8, _positive_int, "Slots per rank segment (memory = slots x slot)."),
    "slot_heap": ("PROVHPC_SLOT_HEAP", 65536, _positive_int,
                  "Bytes of string heap per slot (new strings of the slot)."),
    "max_string": ("PROVHPC_MAX_STRING", 4096, _positive_int,
                   "Longest string kept, in UTF-8 bytes; longer ones are cut and flagged."),
    "backpressure_timeout": ("PROVHPC_BACKPRESSURE_TIMEOUT", 0.5, _nonneg_float,
                             "Seconds a call may block for a free slot before it drops."),
    "simulate_nodes": ("PROVHPC_SIMULATE_NODES", 0, _nonneg_int,
                       "Split one host's ranks into K simulated nodes (0 = off)."),
    "runtime_dir": ("PROVHPC_RUNTIME_DIR", "", _text,
                    "Where rendezvous sockets live; empty = $XDG_RUNTIME_DIR or the temp dir."),
    "startup_timeout": ("PROVHPC_STARTUP_TIMEOUT", 30.0, _positive_float,
                        "Seconds a rank waits for its node's aggregator to be ready."),
    "shutdown_timeout": ("PROVHPC_SHUTDOWN_TIMEOUT", 10.0, _positive_float,
                         "Seconds a rank waits at exit for its records to be on disk."),
    "external_aggregator": ("PROVHPC_EXTERNAL_AGGREGATOR", False, _bool,
                            "Ranks never spawn aggregators; `provhpc aggregate` steps "
                            "provide them."),
    "compression": ("PROVHPC_COMPRESSION", "none", _compression,
                    "Partition compression: none (default, SWMR-safe), lzf or gzip."),
    "heartbeat": ("PROVHPC_HEARTBEAT", 0.2, _positive_float,
                  "Seconds between the aggregator's liveness checks of its ranks."),
    "telemetry_interval": ("PROVHPC_TELEMETRY_INTERVAL", 5.0, _nonneg_float,
                           "Seconds between the aggregator's samples of its ranks' CPU, memory, "
                           "I/O and GPU (0 = off)."),
    "listen": ("PROVHPC_LISTEN", "", _tcp_endpoint("PROVHPC_LISTEN"),
               "Aggregator: also listen on this `tcp://ADDRESS:PORT` of one interface, for "
               "ranks on other hosts (needs `PROVHPC_KEY_FILE`); empty = no network port."),
    "connect": ("PROVHPC_CONNECT", "", _tcp_endpoint("PROVHPC_CONNECT"),
                "Rank: send to the aggregator at this `tcp://ADDRESS:PORT` (inline, CURVE with "
                "`PROVHPC_KEY_FILE`) instead of a local one; empty = this node's own."),
    "group_readable": ("PROVHPC_GROUP_READABLE", False, _bool,
                       "Run directory 0750 and its files 0640, for a project group's shared "
                       "`--out`; default owner-only (0700 and 0600)."),
    "key_file": ("PROVHPC_KEY_FILE", "", _text,
                 "Owner-only (0600) file with the run's CURVE secret (`provhpc keygen FILE`); "
                 "required by `PROVHPC_LISTEN` and `PROVHPC_CONNECT`."),
}


@dataclass(frozen=True)
class Config:
    enabled: bool = True
    out: str = "provenance"
    run_id: str = ""
    flush_interval: float = 1.0
    slot_records: int = 4096
    slots: int = 8
    slot_heap: int = 65536
    max_string: int = 4096
    backpressure_timeout: float = 0.5
    simulate_nodes: int = 0
    runtime_dir: str = ""
    startup_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    external_aggregator: bool = False
    compression: str = "none"
    heartbeat: float = 0.2
    telemetry_interval: float = 5.0
    listen: str = ""
    connect: str = ""
    group_readable: bool = False
    key_file: str = ""
    sources: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "sources"}


def load(environ=None, **overrides) -> Config:
    """Build the effective configuration."""
    environ = os.environ if environ is None else environ
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown provhpc setting(s): {', '.join(sorted(unknown))}")
    values, sources = {}, {}
    for name, (var, default, parse, _help) in SETTINGS.items():
        if name in overrides and overrides[name] is not None:
            try:
                values[name] = parse(overrides[name])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"bad value for {name}: {overrides[name]!r} ({exc})") from None
            sources[name] = "argument"
        elif var in environ:
            try:
                values[name] = parse(environ[var])
                sources[name] = "environment"
            except (TypeError, ValueError) as exc:
                warnings.warn(f"{var}={environ[var]!r} ignored ({exc}); using {default!r}",
                              RuntimeWarning, stacklevel=2)
                values[name] = default
                sources[name] = "default"
        else:
            values[name] = default
            sources[name] = "default"
    return Config(**values, sources=sources)


def markdown_table() -> str:
    """The settings table of the README (tests/test_docs.py keeps the two in step)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var, default, _parse, help_ in SETTINGS.values():
        shown = _env_text(default) if default != "" else "(empty)"
        rows.append(f"| `{var}` | `{shown}` | {help_} |")
    return "\n".join(rows)


def to_environ(cfg: Config) -> dict:
    """The environment that carries ``cfg`` to a child process."""
    return {SETTINGS[k][0]: _env_text(v) for k, v in cfg.to_dict().items()}


def _env_text(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)
