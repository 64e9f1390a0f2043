"""Spawn a gloo process group inside a test and collect each rank's result."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.parallel.groups import free_port, shutdown_distributed




def _entry(rank, world, port, fn, args, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = fn(rank, world, *args)
        torch.save(res, os.path.join(outdir, f"{rank}.pt"))
    finally:
        shutdown_distributed()


def run_world(world: int, fn, *args):
    """Run fn(rank, world, *args) on `world` gloo processes; returns the list of results.
    fn must be a module-level function (it is pickled)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, free_port(), fn, args, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
