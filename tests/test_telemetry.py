"""Telemetry sampled by the aggregator: /proc for CPU, memory and I/O; NVML for GPUs."""

import functools
import os
import subprocess
import sys
import time
import types

import pytest

from provhpc.format import records as R
from provhpc.launch import config as C
from provhpc.launch import identity
from provhpc.node import telemetry
from provhpc.testing import capture

BURN = """
import os, sys, time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
with open(sys.argv[1], "wb") as fh:
    fh.write(b"x" * (1 << 20))
    fh.flush()
    os.fsync(fh.fileno())
print("done", flush=True)
sys.stdin.read()
"""


def test_read_proc_of_a_busy_child(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", BURN, str(tmp_path / "out.bin")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"done"
        s = telemetry.read_proc(p.pid)
        assert s["cpu_seconds"] >= 0.25
        assert s["rss_bytes"] > 1 << 20 and s["rss_peak_bytes"] >= s["rss_bytes"]
        assert s["threads"] >= 1
        assert s["wchar"] >= 1 << 20 and s["write_bytes"] >= 1 << 20
    finally:
        p.communicate(b"", timeout=10)
    assert telemetry.read_proc(p.pid) is None  # reaped: gone


def _busy(seconds):
    t = time.monotonic()
    x = 0
    while time.monotonic() - t < seconds:
        x += 1
    return x


def test_aggregator_samples_its_ranks(tmp_path):
    with capture(tmp_path, telemetry_interval=0.05, heartbeat=0.05) as cap:
        # busy until the aggregator took a few periodic samples (not a fixed time: a
        # loaded machine may give its thread fewer turns), 20 s at most
        deadline = time.monotonic() + 20
        while cap.aggregator.telemetry.samples < 3 and time.monotonic() < deadline:
            _busy(0.1)
        _busy(0.4)
    samples = telemetry.samples(cap.run)
    mine = samples[samples["pid"] == os.getpid()]
    assert len(mine) and set(mine["rank"]) == {0} and set(mine["node"]) == {"testnode"}
    names = set(mine["name"])
    assert {"telemetry.cpu_seconds", "telemetry.cpu_percent", "telemetry.rss_bytes",
            "telemetry.threads"} <= names
    cpu = telemetry.samples(cap.run, "cpu_seconds", rank=0)
    assert len(cpu) >= 3  # periodic samples plus the one at goodbye
    assert (cpu["value"][1:] >= cpu["value"][:-1]).all() and cpu["value"][-1] >= 0.4
    assert (cpu["step"][1:] > cpu["step"][:-1]).all()
    pct = telemetry.samples(cap.run, "telemetry.cpu_percent")["value"]
    assert pct.max() > 30.0  # the busy loop used the CPU
    rss = telemetry.samples(cap.run, "rss_bytes")["value"]
    assert (rss > 10 << 20).all()
    # they are ordinary METRIC records: the rank's metric queries see them too
    recs = cap.records("metric")
    names = cap.run.partitions[0].strings[recs["name"]]
    assert sum(n.startswith("telemetry.") for n in names) == len(samples)
    assert (recs["id"][[n.startswith("telemetry.") for n in names]] == 0).all()


def test_telemetry_off(tmp_path):
    with capture(tmp_path, telemetry_interval=0) as cap:
        _busy(0.2)
        import provhpc
        provhpc.metric("loss", 1.0)
    assert len(telemetry.samples(cap.run)) == 0
    assert len(cap.records("metric")) == 1


def test_interval_setting(monkeypatch):
    assert C.load(environ={}).telemetry_interval == 5.0
    assert C.load(environ={"PROVHPC_TELEMETRY_INTERVAL": "0.5"}).telemetry_interval == 0.5
    assert C.load(telemetry_interval=0).telemetry_interval == 0
    with pytest.raises(ValueError):
        C.load(telemetry_interval=-1)
    with pytest.warns(RuntimeWarning, match="PROVHPC_TELEMETRY_INTERVAL"):
        assert C.load(environ={"PROVHPC_TELEMETRY_INTERVAL": "x"}).telemetry_interval == 5.0


def test_nvml_real_path():
    """Whatever this machine has: a GPU gives index:UUID and memory; none gives a reason."""
    gpus = telemetry.GPUs()
    if gpus.available:
        index, uuid, _ = gpus.resolve("0")
        assert index == 0 and uuid.startswith(("GPU-", "MIG-"))
        assert gpus.label("0") == f"0:{uuid}" and gpus.resolve(uuid)[0] == 0
        sample = gpus.sample(gpus.resolve("0"), os.getpid())
        assert sample["gpu_memory_total_bytes"] > 0
    else:
        assert gpus.error  # why: no nvidia-ml-py, no library, no driver
        assert gpus.resolve("0") is None and gpus.label("GPU-1234") == "GPU-1234"


# ---------------------------------------------------------------------- NVML at its boundary
UUIDS = ["GPU-aaaa1111-0000-0000-0000-000000000000", "GPU-bbbb2222-0000-0000-0000-000000000000",
         "GPU-bbbb3333-0000-0000-0000-000000000000"]


def fake_nvml(pid):
    """A stand-in for the pynvml module: three devices, ``pid`` runs on device 1."""
    m = types.ModuleType("pynvml")
    m.NVMLError = type("NVMLError", (Exception,), {})
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: len(UUIDS)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    m.nvmlDeviceGetUUID = lambda h: UUIDS[h[1]].encode()  # old bindings return bytes
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * (h[1] + 1),
                                                                      memory=5)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1000 * (h[1] + 1),
                                                                total=16000, free=0)

    def power(h):
        raise m.NVMLError("Not Supported")
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: (
        [types.SimpleNamespace(pid=pid, usedGpuMemory=777)] if h[1] == 1 else [])
    m.nvmlDeviceGetHandleByUUID = lambda u: ("h", UUIDS.index(u))
    return m


def test_cuda_visible_devices_entries_map_to_nvml_devices():
    gpus = telemetry.GPUs(fake_nvml(1))
    assert gpus.resolve("1")[1] == UUIDS[1]
    assert gpus.resolve(UUIDS[2])[0] == 2
    assert gpus.resolve("GPU-aaaa")[0] == 0  # a unique prefix, as CUDA accepts
    assert gpus.resolve("GPU-bbbb") is None  # ambiguous
    assert gpus.resolve("7") is None and gpus.resolve("GPU-ffff") is None
    assert gpus.label("2") == f"2:{UUIDS[2]}" and gpus.label("") == ""
    sample = gpus.sample(gpus.resolve("1"), 1)
    assert sample == {"gpu_utilization_percent": 20.0, "gpu_memory_used_bytes": 2000.0,
                      "gpu_memory_total_bytes": 16000.0, "gpu_process_memory_bytes": 777.0}


def test_identity_gpu_from_launcher_variables():
    env = {"CUDA_VISIBLE_DEVICES": f"{UUIDS[0]},{UUIDS[1]}", "PMI_RANK": "1",
           "MPI_LOCALRANKID": "1", "PMI_SIZE": "2"}
    assert identity.detect(env).gpu == UUIDS[1]
    assert identity.detect({"SLURM_STEP_GPUS": "2,3", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
                            "SLURM_LOCALID": "0"}).gpu == "2"
    assert identity.detect({"CUDA_VISIBLE_DEVICES": "NoDevFiles",
                            "SLURM_STEP_GPUS": "1"}).gpu == ""


def test_gpu_telemetry_linked_to_rank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(os.getpid()))
    # the rank is bound to the device whose UUID starts GPU-bbbb3 (CUDA_VISIBLE_DEVICES=UUID)
    monkeypatch.setattr(identity, "Identity", functools.partial(identity.Identity,
                                                                gpu="GPU-bbbb3"))
    with capture(tmp_path, telemetry_interval=0.05, heartbeat=0.05) as cap:
        _busy(0.3)
    (row,) = cap.run.ranks()
    assert row["gpu"] == f"2:{UUIDS[2]}"
    util = telemetry.samples(cap.run, "gpu_utilization_percent")
    assert len(util) >= 2 and set(util["value"]) == {30.0} and set(util["device"]) == {UUIDS[2]}
    assert set(util["rank"]) == {0} and set(util["pid"]) == {os.getpid()}
    assert set(telemetry.samples(cap.run, "gpu_memory_used_bytes")["value"]) == {3000.0}
    assert len(telemetry.samples(cap.run, "gpu_power_watts")) == 0  # not supported: left out
    assert len(telemetry.samples(cap.run, "gpu_process_memory_bytes")) == 0  # not on device 2
    # process metrics carry no device
    assert set(telemetry.samples(cap.run, "rss_bytes")["device"]) == {""}
    assert R.METRIC in set(cap.records()["kind"])
