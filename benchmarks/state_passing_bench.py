"""Lightning attention across sequence-parallel ranks: all-gather prefix vs ring (chain).

    python benchmarks/state_passing_bench.py [--world 2,4] [--tokens-per-rank 8192]

For each world size P (gloo processes on this machine) and each mode, times one layer's
lightning attention forward+backward on a shard of T_loc tokens (B=1, H=8, K=V=64, fp32), and
separately the state combine alone (the part the two modes differ in), with the bytes each rank
received (communication counter). Median of --reps after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.parallel.groups import free_port

H, D = 8, 64


def worker(rank, world, port, T_loc, reps, q_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from longctx.kernels.cpu import tune_allocator
    from longctx.model.lightning import tnl_decay
    from longctx.parallel.comm import COMM
    from longctx.parallel.groups import SPHandle, shutdown_distributed
    from longctx.parallel.state_passing import _RingPrefix, _StatePrefix, _prefix_matrix, lightning_attn_sp
    tune_allocator()
    sp = SPHandle(dist.group.WORLD, rank, world)
    decay = tnl_decay(H, 0, 2)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, H, T_loc, D, generator=g).requires_grad_() for _ in range(3))
    cont = torch.ones(world, 1, dtype=torch.bool)
    cont[0] = False
    single = torch.ones(world, 1, dtype=torch.bool)
    out = {}
    for mode in ("allgather", "ring"):
        full, comb = [], []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            lightning_attn_sp(q, k, v, decay, 1.0, sp, mode=mode).sum().backward()
            dist.barrier()
            t1 = time.perf_counter()
            F = torch.randn(1, H, D, D, generator=g).requires_grad_()
            COMM.reset()
            dist.barrier()
            t2 = time.perf_counter()
            if mode == "ring":
                S = _RingPrefix.apply(F, torch.exp(-decay * T_loc), cont[rank], single[rank], sp)
            else:
                S = _StatePrefix.apply(F, _prefix_matrix(decay, T_loc, cont, single), rank, sp.group)
            S.sum().backward()
            dist.barrier()
            t3 = time.perf_counter()
            if i:
                full.append(t1 - t0)
                comb.append(t3 - t2)
            for x in (q, k, v):
                x.grad = None
        out[mode] = {"layer_s": statistics.median(full), "combine_s": statistics.median(comb),
                     "bytes": COMM.total()}
    if rank == world - 1:
        q_out.put(out)
    shutdown_distributed()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2,4")
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    print(f"machine: {os.cpu_count()} CPU threads; B=1 H={H} K=V={D} fp32; T_loc={args.tokens_per_rank} per rank; "
          f"times of the last rank, median of {args.reps}")
    print(f"{'P':>3} {'mode':>10} {'layer fwd+bwd ms':>17} {'combine fwd+bwd ms':>19} {'bytes recv/rank':>16}")
    for P in map(int, args.world.split(",")):
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, P, port, args.tokens_per_rank, args.reps, q)) for r in range(P)]
        for pr in procs:
            pr.start()
        res = q.get(timeout=600)
        for pr in procs:
            pr.join()
        for mode, r in res.items():
            print(f"{P:>3} {mode:>10} {r['layer_s'] * 1e3:>17.1f} {r['combine_s'] * 1e3:>19.2f} {r['bytes']:>16,}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
