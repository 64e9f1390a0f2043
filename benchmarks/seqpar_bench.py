"""Sequence-parallel softmax attention on this machine: per-rank peak memory, time and bytes.

    python benchmarks/seqpar_bench.py [--lengths 16384,65536] [--world 1,2,4] [--out FILE.json]

For each global length T, SP degree P (gloo processes) and strategy (Ulysses, zigzag ring, and
the 2x2 hybrid at P=4), fresh processes run one causal attention layer forward+backward over
the whole sequence: x (B=1, T/P tokens per rank, 256) -> q, k, v projections (H=4 query heads,
2 KV heads, d=64, fp32) -> attention -> backward to x and the weights. As in a model, q, k and v
are intermediates (freed once consumed), not inputs held by the caller.
Reported per rank (the maximum over ranks): peak resident memory above the process's
baseline before the inputs were made, wall time, and bytes received (communication counter).
The peer is torch SDPA in one process on the same inputs (its CPU flash kernel), measured in
the same run. With more processes than cores, times are oversubscribed: memory is the figure
that scales (goal: P=4 per-rank peak <= 0.35 x P=1's).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.parallel.groups import free_port

H, HKV, D = 4, 2, 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank, world, port, T, strategy, q_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.nn.functional as F

    from longctx.kernels.cpu import tune_allocator
    from longctx.kernels.flash import flash_attn
    from longctx.parallel.comm import COMM
    from longctx.parallel.groups import build_mesh, shutdown_distributed
    from longctx.parallel.sharding import local_index
    from longctx.parallel.ulysses import sp_attention
    tune_allocator()
    U = {"ulysses": world, "ring": 1, "hybrid": 2}.get(strategy, 1)
    layout = "contiguous" if strategy == "ulysses" else "zigzag"
    mesh = build_mesh(world, U) if world > 1 else None
    sp = mesh.sp_handle(layout) if mesh else None
    # warm-up at a small size (kernels, allocator, gloo buffers), then measure from here
    small = torch.randn(1, H, 256, D)
    flash_attn(small, small[:, :HKV], small[:, :HKV], True)
    dist.barrier()
    base = _rss()
    L = T // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, L, H * D, generator=g).requires_grad_()
    wq = (torch.randn(H * D, H * D, generator=g) / (H * D) ** 0.5).requires_grad_()
    wk, wv = ((torch.randn(H * D, HKV * D, generator=g) / (H * D) ** 0.5).requires_grad_() for _ in range(2))
    pos = torch.from_numpy(local_index(T, world, rank, layout, U))
    COMM.reset()
    dist.barrier()
    t0 = time.perf_counter()
    q = (x @ wq).view(1, L, H, D).transpose(1, 2)
    k = (x @ wk).view(1, L, HKV, D).transpose(1, 2)
    v = (x @ wv).view(1, L, HKV, D).transpose(1, 2)
    if strategy == "sdpa":
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1),
                                           is_causal=True)
    elif sp is None:
        o = flash_attn(q, k, v, True)[0]
    else:
        o = sp_attention(q, k, v, sp, pos, None)
    del q, k, v
    o.backward(torch.ones_like(o))
    dist.barrier()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    res = {"time_s": dt, "peak_bytes": peak, "comm_bytes": COMM.total()}
    out = [None] * world
    dist.all_gather_object(out, res)
    if rank == 0:
        q_out.put(out)
    shutdown_distributed()


def run(P, T, strategy):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, P, port, T, strategy, q)) for r in range(P)]
    for pr in procs:
        pr.start()
    res = q.get(timeout=3600)
    for pr in procs:
        pr.join()
    return {"P": P, "T": T, "strategy": strategy, "time_s": max(r["time_s"] for r in res),
            "peak_bytes_per_rank": max(r["peak_bytes"] for r in res),
            "comm_bytes_per_rank": max(r["comm_bytes"] for r in res)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--world", default="1,2,4")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPU threads; causal attention layer fwd+bwd, B=1 H={H} Hkv={HKV} d={D} fp32; "
          f"peak RSS above baseline, max over ranks")
    print(f"{'T':>7} {'P':>2} {'strategy':>9} {'time s':>8} {'peak MiB/rank':>14} {'x P=1':>6} {'comm MiB/rank':>14}")
    rows = []
    for T in map(int, args.lengths.split(",")):
        ref = None
        plan = [(1, "sdpa"), (1, "flash")]
        for P in map(int, args.world.split(",")):
            if P > 1:
                plan += [(P, "ulysses"), (P, "ring")] + ([(P, "hybrid")] if P == 4 else [])
        for P, strategy in plan:
            r = run(P, T, strategy)
            if strategy == "flash":
                ref = r["peak_bytes_per_rank"]
            r["peak_vs_p1"] = r["peak_bytes_per_rank"] / ref if ref else None
            rows.append(r)
            ratio = f"{r['peak_vs_p1']:.2f}" if r["peak_vs_p1"] is not None else "-"
            print(f"{T:>7} {P:>2} {strategy:>9} {r['time_s']:>8.2f} {r['peak_bytes_per_rank'] / 2**20:>14.1f} "
                  f"{ratio:>6} {r['comm_bytes_per_rank'] / 2**20:>14.1f}")
            sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine_cpus": os.cpu_count(), "H": H, "Hkv": HKV, "d": D, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
