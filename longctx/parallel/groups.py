"""Process discovery and the data-parallel x sequence-parallel mesh.

Ranks are laid out sp-fastest: global rank = dp_rank * sp + sp_rank, so the ranks of one
sequence-parallel group are neighbours (on one node when possible). Inside an SP group of
degree sp = ulysses x ring, the Ulysses index is fastest: sp_rank = ring_idx * ulysses + u, so
the all-to-all (the heavier, latency-bound collective) stays between the closest ranks.

`Mesh` is also DeepSpeed's `mpu`: to DeepSpeed, dp x sp (the whole world) is the data-parallel
group over which ZeRO shards and reduces. DeepSpeed averages gradients over it; the trainer
scales each rank's loss so the result is the gradient of the global token mean (see
trainer.grad_divisor).
"""
from __future__ import annotations

import datetime
import gc
import inspect
import os
import socket
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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


def shutdown_distributed() -> None:
    """Destroy every process group and drop the references that would keep one alive, so its
    threads end now, while Python is fully alive (idempotent; a no-op without a process group).

    Why: a group that outlives destroy_process_group() is freed at interpreter shutdown, where a
    gloo worker thread dropping the last tensor of a finished collective cannot take the GIL and
    aborts the process ("terminate called without an active exception", SIGABRT after a run
    that succeeded: seen in CI on ~5% of 2-rank test processes). References that outlive it:
    our cache of single-rank groups; DeepSpeed's module-level groups (`mpu`, the world clone,
    data-parallel and expert groups: released as deepspeed.comm.destroy_process_group would);
    and default arguments `group=group.WORLD` evaluated when their module was imported after
    init_process_group (torch.distributed.nn's collectives, imported by deepspeed.initialize;
    DeepSpeed's TorchBackend.barrier): each function takes None as the default group, so None
    is the same default."""
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        _SELF_GROUPS.clear()
        ds_groups = sys.modules.get("deepspeed.utils.groups")
        release = getattr(ds_groups, "_release_process_group_references", None)
        if release is not None:
            release()
        _drop_group_defaults(("torch.distributed", "deepspeed"))
        gc.collect()  # a group held only by a reference cycle goes now too


def _drop_group_defaults(prefixes) -> None:
    """Replace ProcessGroup default arguments by None in the functions (and class methods) of
    the imported modules whose names start with one of `prefixes`."""
    is_pg = lambda d: isinstance(d, dist.ProcessGroup)  # noqa: E731
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(prefixes):
            continue
        for obj in list(vars(mod).values()):
            members = vars(obj).values() if isinstance(obj, type) and obj.__module__ == name else (obj,)
            for fn in members:
                fn = inspect.unwrap(getattr(fn, "__func__", fn))  # staticmethod / classmethod too
                if not isinstance(fn, types.FunctionType):
                    continue
                if fn.__defaults__ and any(map(is_pg, fn.__defaults__)):
                    fn.__defaults__ = tuple(None if is_pg(d) else d for d in fn.__defaults__)
                if fn.__kwdefaults__ and any(map(is_pg, fn.__kwdefaults__.values())):
                    fn.__kwdefaults__ = {k: None if is_pg(d) else d for k, d in fn.__kwdefaults__.items()}


@dataclass
class Mesh:
    """dp x sp process groups for one world. Also the DeepSpeed `mpu` (model parallel = 1)."""
    world_size: int
    rank: int
    sp: int
    sp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    grad_group: Optional[dist.ProcessGroup]  # dp x sp: where gradients are averaged
    ulysses: int = 1
    ulysses_group: Optional[dist.ProcessGroup] = None
    ring_group: Optional[dist.ProcessGroup] = None

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def ring(self) -> int:
        return self.sp // self.ulysses

    def sp_handle(self, layout: str) -> Optional["SPHandle"]:
        """What mixers see (None without sequence parallelism)."""
        if self.sp == 1:
            return None
        U = self.ulysses
        r = self.sp_rank
        base = self.dp_rank * self.sp
        ring_ranks = [base + i * U + r % U for i in range(self.ring)]
        return SPHandle(self.sp_group, r, self.sp, layout, ulysses=U, ulysses_group=self.ulysses_group,
                        ring_group=self.ring_group, ring_ranks=ring_ranks)

    # --- DeepSpeed mpu interface (model/tensor/pipeline parallel degree 1) --------------------
    # To DeepSpeed every rank of dp x sp is a data-parallel replica of the weights: ZeRO shards
    # and reduces over all of them, dividing the gradient sum by world size at every stage. The
    # sequence-parallel hooks (get_sequence_parallel_*) are deliberately absent: DeepSpeed
    # 0.19's ZeRO-1/2 and ZeRO-3's contiguous path then divide by world/sp, but ZeRO-3's
    # reduce-scatter path (the default) divides by world, so gradients would be 2x off at
    # ZeRO-3 only (found by tests/distributed/test_sp_gradients.py). The trainer's loss
    # scaling makes the one uniform division exact.
    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self):
        return _self_group()

    # Megatron's names, which DeepSpeed's universal-checkpoint load asks for (train/reshard.py).
    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_group(self):
        return _self_group()

    def get_data_parallel_group(self):
        return self.grad_group

    def get_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


_SELF_GROUPS: dict = {}


def _self_group():
    """A group of this rank alone (model parallel degree 1). Created for every rank at once on
    first use, since new_group is collective."""
    if not _SELF_GROUPS:
        for r in range(dist.get_world_size()):
            _SELF_GROUPS[r] = dist.new_group([r])
    return _SELF_GROUPS[dist.get_rank()]


def build_mesh(sp: int, ulysses: int = 0) -> Mesh:
    """Create the groups. Every rank must call this (new_group is collective). With sp == 1 no
    group is created: the world is the data-parallel group. ulysses: the Ulysses degree inside
    sp (0 = all of it); the ring degree is sp // ulysses."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ulysses = ulysses or sp
    if sp < 1 or sp % ulysses:
        raise ValueError(f"parallel.sp={sp} is not a multiple of parallel.sp_ulysses={ulysses}: "
                         f"use sp_ulysses x sp_ring = sp")
    if world % sp != 0:
        raise ValueError(f"world size {world} is not divisible by parallel.sp={sp}: launch a multiple of "
                         f"{sp} processes or pick a divisor of {world}")
    _self_group()
    if sp == 1:
        return Mesh(world, rank, 1, None, dist.group.WORLD, dist.group.WORLD)

    def groups(rank_lists):
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    sp_group = groups([list(range(d * sp, (d + 1) * sp)) for d in range(world // sp)])
    dp_group = groups([list(range(s, world, sp)) for s in range(sp)])
    ring = sp // ulysses
    u_group = r_group = None
    if ulysses > 1 and ring > 1:
        u_group = groups([[d * sp + i * ulysses + u for u in range(ulysses)]
                          for d in range(world // sp) for i in range(ring)])
        r_group = groups([[d * sp + i * ulysses + u for i in range(ring)]
                          for d in range(world // sp) for u in range(ulysses)])
    elif ulysses > 1:
        u_group = sp_group
    else:
        r_group = sp_group
    return Mesh(world, rank, sp, sp_group, dp_group, dist.group.WORLD, ulysses, u_group, r_group)


@dataclass
class SPHandle:
    """A sequence-parallel group as mixers see it.

    layout: how the sequence is split ("contiguous" or "zigzag", see parallel/sharding.py).
    ulysses: the Ulysses (all-to-all) degree; the ring degree is size // ulysses. rank =
    ring_idx * ulysses + u. ring_ranks: global ranks of this rank's ring, in ring order.
    """
    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    layout: str = "contiguous"
    ulysses: int = 0  # 0: all of size (pure Ulysses)
    ulysses_group: Optional[dist.ProcessGroup] = None
    ring_group: Optional[dist.ProcessGroup] = None
    ring_ranks: Optional[List[int]] = None
    _cache: Dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.ulysses:
            self.ulysses = self.size
        if self.size % self.ulysses:
            raise ValueError(f"SP degree {self.size} is not a multiple of the Ulysses degree {self.ulysses}")
        if self.ulysses == self.size and self.ulysses_group is None:
            self.ulysses_group = self.group
        if self.ulysses == 1 and self.ring_group is None:
            self.ring_group = self.group
        if self.ring_ranks is None and self.ring > 1:
            if self.ulysses != 1:
                raise ValueError("SPHandle: pass ring_ranks for a hybrid (ulysses > 1 and ring > 1) layout")
            self.ring_ranks = [dist.get_global_rank(self.group, i) if self.group is not None else i
                               for i in range(self.size)]

    @property
    def ring(self) -> int:
        return self.size // self.ulysses

    @property
    def u_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses
