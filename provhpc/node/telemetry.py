"""Per-node telemetry, sampled by the aggregator (never inside the ranks).

Every ``telemetry_interval`` seconds (``PROVHPC_TELEMETRY_INTERVAL``, default
5, 0 = off) and once more when a rank says goodbye, the node's aggregator
reads, for each connected process of its node (ranks and their forked
workers):

* CPU, memory and I/O from ``/proc/<pid>`` (no psutil needed): cumulative
  CPU seconds, CPU percent over the last interval (100 = one core), resident
  and peak resident memory, threads, bytes read from and written to storage;
* the process's GPU through NVML (``nvidia-ml-py``, imported lazily; absent
  library or driver = no GPU metrics): device utilisation, device memory used
  and total, this process's GPU memory, power.

The GPU of a rank is the one in its identity (``identity.gpu``: the rank's
entry of ``CUDA_VISIBLE_DEVICES`` or of SLURM's GPU list, an index or a
UUID such as ``GPU-8932f937-...``, also a unique prefix of one).  NVML ignores
``CUDA_VISIBLE_DEVICES`` and numbers devices by PCI bus, so an index is an
NVML index (the same as CUDA's with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or
identical GPUs); a UUID is exact.  The rank table's ``gpu`` column then holds
``"<nvml index>:<uuid>"``.

Convention (the reference for docs/format.md): a sample is a METRIC record written
by the aggregator on behalf of the rank — ``rank`` = the rank, ``id`` = 0 (no
activity), ``name`` = ``telemetry.<quantity>``, ``fval`` = the value,
``ival`` = the sampled pid, ``step`` = the aggregator's sample number,
``sval`` = the GPU UUID for ``telemetry.gpu_*`` and empty otherwise, ``t`` =
the sampling time.  Select them with the ``telemetry.`` prefix, or use
``samples(run)``.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..format import records as R

__all__ = ["GPUs", "PREFIX", "SAMPLE_DTYPE", "Sampler", "read_proc", "samples"]

log = logging.getLogger("provhpc.telemetry")

PREFIX = "telemetry."
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------------- processes
def read_proc(pid: int) -> dict | None:
    """CPU, memory and I/O counters of ``pid`` from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as fh:
            resident = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    out = {"cpu_seconds": (int(fields[11]) + int(fields[12])) / _CLK_TCK,
           "rss_bytes": float(resident * _PAGE), "threads": float(int(fields[17]))}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    out["rss_peak_bytes"] = float(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:  # may be unreadable (another user, hardened kernels): then no I/O metrics
        with open(f"/proc/{pid}/io", "rb") as fh:
            for line in fh:
                key, _, value = line.partition(b":")
                if key in (b"read_bytes", b"write_bytes", b"rchar", b"wchar"):
                    out[key.decode()] = float(int(value))
    except (OSError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------- GPUs
class GPUs:
    """NVML, initialised on first use; every failure means "no GPU metrics", never an error."""

    def __init__(self, nvml=None):
        self._nvml = nvml
        self._tried = nvml is not None
        self._enumerated = False
        self.devices: list[tuple[int, str, object]] = []  # (nvml index, uuid, handle)
        self.error = ""
        self._cache: dict[str, tuple | None] = {}

    @property
    def nvml(self):
        if not self._tried:
            self._tried = True
            try:
                import pynvml
            except ImportError:
                self.error = "nvidia-ml-py not installed"
                return None
            self._nvml = pynvml
        if self._nvml is not None and not self._enumerated:
            self._enumerated = True
            self._enumerate()
        return self._nvml if not self.error else None

    def _enumerate(self) -> None:
        nv = self._nvml
        try:
            nv.nvmlInit()
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                self.devices.append((i, _text(nv.nvmlDeviceGetUUID(h)), h))
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.error = f"{type(exc).__name__}: {exc}"
            self.devices = []

    @property
    def available(self) -> bool:
        return self.nvml is not None and bool(self.devices)

    def resolve(self, spec: str):
        """``(index, uuid, handle)`` for a CUDA_VISIBLE_DEVICES-style entry, or None."""
        spec = (spec or "").strip()
        if not spec:
            return None
        if spec in self._cache:
            return self._cache[spec]
        found = None
        if self.available:
            if spec.isdigit():
                i = int(spec)
                found = self.devices[i] if i < len(self.devices) else None
            else:
                matches = [d for d in self.devices if d[1] == spec] or \
                    [d for d in self.devices if d[1].startswith(spec)]
                if len(matches) == 1:
                    found = matches[0]
                elif not matches and spec.startswith("MIG-"):
                    found = self._mig(spec)
        self._cache[spec] = found
        return found

    def _mig(self, spec):
        try:
            h = self._nvml.nvmlDeviceGetHandleByUUID(spec)
            return (-1, spec, h)
        except Exception:
            return None

    def label(self, spec: str) -> str:
        """What the rank table holds for a rank's GPU: ``index:uuid`` when NVML knows it."""
        found = self.resolve(spec) if spec else None
        if found is None:
            return spec or ""
        index, uuid, _ = found
        return f"{index}:{uuid}" if index >= 0 else uuid

    def sample(self, device, pid: int) -> dict:
        nv, (_, _, h) = self._nvml, device
        out = {}
        for name, read in (
            ("gpu_utilization_percent", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            ("gpu_memory_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
            ("gpu_memory_total_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h).total),
            ("gpu_power_watts", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ("gpu_process_memory_bytes", lambda: _process_memory(nv, h, pid)),
        ):
            try:
                value = read()
            except Exception:  # not supported on this device / MIG / permissions
                continue
            if value is not None:
                out[name] = float(value)
        return out


def _process_memory(nv, h, pid):
    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == pid and p.usedGpuMemory is not None:
            return p.usedGpuMemory
    return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------- the sampler
class Sampler:
    """Turns samples of the aggregator's open streams into METRIC records of its partition."""

    def __init__(self, writer, gpus: GPUs | None = None):
        self.writer = writer
        self.gpus = gpus if gpus is not None else GPUs()
        self.samples = 0
        self._last: dict[tuple, tuple] = {}  # (rank, pid) -> (monotonic, cpu_seconds)
        self._names: dict[str, int] = {}

    def sample(self, streams) -> int:
        """Sample each stream (``.rank``, ``.pid``, ``.hello['gpu']``); return records written."""
        self.samples += 1
        rows = []
        t, now = time.time_ns(), time.monotonic()
        for s in streams:
            rows.extend(self._sample_one(s, t, now))
        if not rows:
            return 0
        recs = np.zeros(len(rows), R.RECORD_DTYPE)
        recs["kind"] = R.METRIC
        recs["vtype"] = R.V_FLOAT
        recs["t"] = t
        recs["step"] = self.samples
        recs["rank"], recs["ival"], recs["name"], recs["sval"], recs["fval"] = zip(*rows)
        self.writer.append(recs)
        return len(recs)

    def _sample_one(self, s, t, now):
        rank, pid = s.rank, s.pid
        proc = read_proc(pid)
        rows = []
        if proc is not None:
            last = self._last.get((rank, pid))
            if last is not None and now > last[0]:
                proc["cpu_percent"] = 100.0 * (proc["cpu_seconds"] - last[1]) / (now - last[0])
            self._last[(rank, pid)] = (now, proc["cpu_seconds"])
            rows.extend((rank, pid, self._name(k), 0, v) for k, v in proc.items())
        spec = str(s.hello.get("gpu", "")) if hasattr(s, "hello") else ""
        device = self.gpus.resolve(spec) if spec else None
        if device is not None:
            sval = self._intern(device[1])
            rows.extend((rank, pid, self._name(k), sval, v)
                        for k, v in self.gpus.sample(device, pid).items())
        return rows

    def forget(self, s) -> None:
        self._last.pop((s.rank, s.pid), None)

    def _name(self, key: str) -> int:
        sid = self._names.get(key)
        if sid is None:
            sid = self._names[key] = self._intern(PREFIX + key)
        return sid

    def _intern(self, text: str) -> int:
        return self.writer.intern(text.encode())


# ---------------------------------------------------------------------- queries
SAMPLE_DTYPE = np.dtype([("rank", "<i4"), ("pid", "<i8"), ("node", "O"), ("name", "O"),
                         ("step", "<i8"), ("t", "<i8"), ("value", "<f8"), ("device", "O")])


def samples(run, name: str | None = None, rank: int | None = None) -> np.ndarray:
    """Telemetry samples of a run (``provhpc.open(...)``), sorted by time.

    ``name`` is a quantity with or without the ``telemetry.`` prefix.
    """
    if name is not None and not name.startswith(PREFIX):
        name = PREFIX + name
    parts = []
    for p in run.partitions:
        recs = p.records()
        recs = recs[recs["kind"] == R.METRIC]
        strings = p.strings
        names = strings[recs["name"]] if len(recs) else np.zeros(0, object)
        keep = np.array([isinstance(n, str) and n.startswith(PREFIX) for n in names], bool)
        if name is not None:
            keep &= names == name
        if rank is not None:
            keep &= recs["rank"] == rank
        recs, names = recs[keep], names[keep]
        out = np.zeros(len(recs), SAMPLE_DTYPE)
        out["rank"], out["pid"], out["step"] = recs["rank"], recs["ival"], recs["step"]
        out["t"], out["value"], out["name"] = recs["t"], recs["fval"], names
        out["node"] = p.node
        out["device"] = strings[recs["sval"]] if len(recs) else []
        parts.append(out)
    if not parts:
        return np.zeros(0, SAMPLE_DTYPE)
    out = np.concatenate(parts)
    return out[np.argsort(out["t"], kind="stable")]
