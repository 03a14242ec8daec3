"""PyTorch DistributedDataParallel training, instrumented with provhpc.torch.

gloo on CPU, nccl when CUDA is available.  Launch with any of:

    mpiexec -n 2 provhpc run -- python examples/train_ddp.py
    srun -n 2 --mpi=pmi2 provhpc run -- python examples/train_ddp.py
    torchrun --nproc-per-node 2 --no-python provhpc run -- python examples/train_ddp.py

Under torchrun the process group comes from its variables (RANK, WORLD_SIZE,
MASTER_ADDR, ...); under mpiexec/srun rank 0 picks a free port and broadcasts
it with mpi4py (or, without MPI under srun, the SLURM variables decide).
A synthetic classification set (written once by rank 0) is sharded with a
DistributedSampler; rank 0 saves the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import provhpc
import provhpc.torch as ptorch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``n[01-04,07],m1``."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank), with MASTER_ADDR/MASTER_PORT set for ``env://``."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):  # torchrun
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    rank, world, local = 0, 1, 0
    if any(k in env for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        if world > 1:
            addr, port = comm.bcast((socket.gethostname(), _free_port()) if rank == 0 else None)
            env["MASTER_ADDR"], env["MASTER_PORT"] = addr, str(port)
        elif int(env.get("SLURM_NTASKS", "1")) > 1:  # srun without an MPI plugin
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local = int(env.get("SLURM_LOCALID", 0))
            env.setdefault("MASTER_ADDR", _first_host(env.get("SLURM_STEP_NODELIST")
                                                      or env.get("SLURM_JOB_NODELIST", "")))
            step = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
            env.setdefault("MASTER_PORT", str(20000 + zlib.crc32(step.encode()) % 20000))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def make_dataset(path: str, samples: int, features: int, classes: int, seed: int) -> None:
    """Gaussian blobs, one per class, written atomically (rank 0 only)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2.0
    y = torch.randint(0, classes, (samples,), generator=g)
    x = centers[y] + torch.randn(samples, features, generator=g)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"x": x, "y": y}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    ap.add_argument("--data", default="data/ddp_blobs.pt")
    ap.add_argument("--checkpoint", default="checkpoints/ddp_mlp.pt")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    rank, world, local = distributed_env()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)

    if rank == 0 and not os.path.exists(args.data):
        make_dataset(args.data, args.samples, args.features, args.classes, args.seed)
    dist.barrier()
    dataset_e = provhpc.data(args.data, kind="dataset", hash=True, samples=args.samples)
    hp = provhpc.hyperparameters(epochs=args.epochs, batch=args.batch, lr=args.lr,
                                 hidden=args.hidden, seed=args.seed, world_size=world,
                                 backend=backend, optimizer={"name": "sgd", "momentum": 0.9})

    with provhpc.stage("preparation", used=[dataset_e]) as prep:
        blob = torch.load(args.data)
        n_val = len(blob["y"]) // 8
        train = TensorDataset(blob["x"][n_val:], blob["y"][n_val:])
        x_val, y_val = blob["x"][:n_val].to(device), blob["y"][:n_val].to(device)
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True,
                                     seed=args.seed)
        loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)
        shard = provhpc.data(f"shard/train/rank{rank}", kind="shard", derived_from=[dataset_e],
                             samples=len(sampler))
        prep.generated(shard, n_train=len(train), n_val=n_val)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, args.classes)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    watcher = ptorch.watch(ddp, opt, data=[dataset_e, shard], hyperparameters=hp)

    dist.barrier()
    t0, c0, steps = time.perf_counter(), time.process_time(), 0
    with provhpc.stage("train", used=[shard, hp]):
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            with watcher.epoch(epoch):
                ddp.train()
                for x, y in loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(ddp(x), y)
                    loss.backward()
                    opt.step()
                    watcher.log(loss=loss, batch_size=len(x))  # stays on the device
                    steps += 1
                sched.step()
            with provhpc.stage("validate"), torch.no_grad():
                ddp.eval()
                acc = (model(x_val).argmax(1) == y_val).float().mean()
                provhpc.metric("val_accuracy", acc.item(), step=epoch)  # once per epoch
    dist.barrier()
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    if rank == 0:
        os.makedirs(os.path.dirname(args.checkpoint) or ".", exist_ok=True)
        ckpt = ptorch.save(model.state_dict(), args.checkpoint, val_accuracy=acc.item())
        print(f"ddp: {world} ranks ({backend}), {args.epochs} epochs, val accuracy "
              f"{acc.item():.3f}, checkpoint {ckpt.key}", flush=True)
        print(f"train_seconds={train_seconds:.6f} steps={steps} "
              f"train_cpu_seconds={train_cpu:.6f}", flush=True)
    watcher.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
