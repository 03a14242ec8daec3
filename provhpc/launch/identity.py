"""Who this process is: rank, local rank, node and job, from the launcher.

Read from the environment so that it is cheap, testable with an injected
mapping, and available before MPI is initialised.  Order: Open MPI, MPICH
Hydra, SLURM ``srun``, torchrun, then a lone process (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass

__all__ = ["Identity", "detect", "short_hostname", "simulate", "slurm_tasks_on_node"]


@dataclass(frozen=True)
class Identity:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: str = ""
    node_index: int = 0
    host: str = ""
    launcher: str = "none"
    job_id: str = ""
    step_id: str = ""
    gpu: str = ""

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    def to_dict(self) -> dict:
        return asdict(self)


def _int(env, *names, default=None):
    for name in names:
        v = env.get(name)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                continue
    return default


def slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from SLURM's compressed ``2(x3),1`` syntax."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node_id] if 0 <= node_id < len(counts) else None


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def detect(env=None) -> Identity:
    """The identity of this process as the launcher describes it."""
    env = os.environ if env is None else env
    host = env.get("SLURMD_NODENAME") or short_hostname()
    job_id = env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or env.get("LSB_JOBID") or ""
    step_id = env.get("SLURM_STEP_ID", "")
    gpu = _gpu(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return Identity(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            size=_int(env, "OMPI_COMM_WORLD_SIZE", default=1),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1),
            node=host, node_index=_int(env, "SLURM_NODEID", default=0), host=host,
            launcher="openmpi", job_id=job_id, step_id=step_id, gpu=gpu)
    if "PMI_RANK" in env and "MPI_LOCALRANKID" in env:
        return Identity(
            rank=_int(env, "PMI_RANK"), size=_int(env, "PMI_SIZE", default=1),
            local_rank=_int(env, "MPI_LOCALRANKID", default=0),
            local_size=_int(env, "MPI_LOCALNRANKS", default=1),
            node=host, node_index=_int(env, "SLURM_NODEID", default=0), host=host,
            launcher="hydra", job_id=job_id, step_id=step_id, gpu=gpu)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        node_index = _int(env, "SLURM_NODEID", default=0)
        local_size = slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                         or env.get("SLURM_TASKS_PER_NODE", "1"), node_index)
        return Identity(
            rank=_int(env, "SLURM_PROCID"), size=_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                                                       default=1),
            local_rank=_int(env, "SLURM_LOCALID", default=0), local_size=local_size or 1,
            node=host, node_index=node_index, host=host, launcher="srun",
            job_id=job_id, step_id=step_id, gpu=gpu)
    if "RANK" in env and "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        return Identity(
            rank=_int(env, "RANK"), size=_int(env, "WORLD_SIZE", default=1),
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_size=_int(env, "LOCAL_WORLD_SIZE", default=1),
            node=host, node_index=_int(env, "GROUP_RANK", default=0), host=host,
            launcher="torchrun", job_id=job_id or env.get("TORCHELASTIC_RUN_ID", ""),
            step_id=step_id, gpu=gpu)
    return Identity(node=host, host=host, job_id=job_id, step_id=step_id, gpu=gpu)


def _gpu(env) -> str:
    """The GPU this rank is bound to, as the launcher says (index or UUID).

    ``CUDA_VISIBLE_DEVICES`` first, else SLURM's GPU list of the step or job
    (indices); with several devices the rank takes the one at its local rank.
    The aggregator resolves the entry to ``index:UUID`` through NVML
    (``telemetry.GPUs.label``) for the rank table.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible == "NoDevFiles":
        return ""
    if not visible:
        visible = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    if not visible:
        return ""
    devices = [d for d in visible.split(",") if d]
    local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                 "LOCAL_RANK", default=0)
    if len(devices) == 1:
        return devices[0]
    return devices[local % len(devices)]


def simulate(ident: Identity, nodes: int) -> Identity:
    """Split this host's ranks into ``nodes`` simulated nodes (contiguous blocks)."""
    if nodes <= 1:
        return ident
    nodes = min(nodes, ident.local_size)
    block = ident.local_rank * nodes // ident.local_size
    first = -(-block * ident.local_size // nodes)  # ceil
    end = -(-(block + 1) * ident.local_size // nodes)
    return Identity(**{**ident.to_dict(),
                       "local_rank": ident.local_rank - first, "local_size": end - first,
                       "node": f"{ident.host}-sim{block}",
                       "node_index": ident.node_index * nodes + block})
