"""Process discovery and the data-parallel x sequence-parallel mesh.

Ranks are laid out sp-fastest: global rank = dp_rank * sp + sp_rank, so the ranks of one
sequence-parallel group are neighbours (on one node when possible). Gradients are averaged
over dp x sp (every rank holds a different slice of the global batch); the DeepSpeed `mpu`
that says so arrives with the sequence-parallel mixers.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of local launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_launch_env() -> str:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the launcher.

    torchrun and the deepspeed launcher set them already; under mpirun (Open MPI, MPICH) they
    come from mpi4py (rank 0's host name is broadcast); under srun from SLURM_PROCID / SLURM_NTASKS;
    a bare `python` is a world of one.
    Returns the launcher's name for the log.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return "env"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        # srun with one task per device; the sbatch script exports MASTER_ADDR/PORT
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1")
        return "slurm"
    mpi_vars = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
    if any(v in os.environ for v in mpi_vars):
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(f"launched under MPI but mpi4py cannot be imported ({exc}): "
                               f"pip install mpi4py mpich") from None
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        addr = os.environ.get("MASTER_ADDR") or comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
        port = os.environ.get("MASTER_PORT") or str(comm.bcast(free_port() if rank == 0 else None, root=0))
        local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_comm.Get_rank()),
                          LOCAL_WORLD_SIZE=str(local_comm.Get_size()), MASTER_ADDR=addr, MASTER_PORT=port)
        return "mpi"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return "single"


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> str:
    """Initialise torch.distributed (idempotent). Collectives time out after `timeout_s`, so a
    dead peer makes the others fail instead of hanging."""
    launcher = discover_launch_env()
    if dist.is_initialized():
        return launcher
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return launcher


@dataclass
class Mesh:
    """dp x sp process groups for one world. Also the DeepSpeed `mpu` (model parallel = 1)."""
    world_size: int
    rank: int
    sp: int
    sp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    grad_group: Optional[dist.ProcessGroup]  # dp x sp: where gradients are averaged

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp


def build_mesh(sp: int) -> Mesh:
    """Create the groups. Every rank must call this (new_group is collective). With sp == 1 no
    group is created: the world is the data-parallel group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp == 1:
        return Mesh(world, rank, 1, None, dist.group.WORLD, dist.group.WORLD)
    if world % sp != 0:
        raise ValueError(f"world size {world} is not divisible by parallel.sp={sp}: launch a multiple of "
                         f"{sp} processes or pick a divisor of {world}")
    sp_group = dp_group = None
    for d in range(world // sp):
        ranks = list(range(d * sp, (d + 1) * sp))
        g = dist.new_group(ranks)
        if rank in ranks:
            sp_group = g
    for s in range(sp):
        ranks = list(range(s, world, sp))
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return Mesh(world, rank, sp, sp_group, dp_group, dist.group.WORLD)


@dataclass
class SPHandle:
    """A sequence-parallel group as mixers see it. layout: how the sequence is split."""
    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    layout: str = "contiguous"
