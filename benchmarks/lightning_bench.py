"""Lightning attention on this CPU: forward and forward+backward tokens/s from 8K to 1M tokens,
beside flash-linear-attention's CPU reference `naive_chunk_simple_gla` measured in the same run.

    python benchmarks/lightning_bench.py [--lengths 8k,64k,256k,1m] [--heads 8] [--dim 64]

Shapes: B=1, H heads, head dim D for q, k and v, fp32, decay = ALiBi slopes (TNL layer 0).
The peer gets g = -decay per token and scale=1 (same function); it runs where it finishes within
--peer-budget seconds (estimated from its shorter lengths). FLOPs counted for our forward are
those the chunked algorithm performs (the masked C x C tiles in full, the inter-chunk and state
matmuls, and the state scan); the ratio is against the best fp32 matmul rate measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from longctx.kernels.lightning import lightning_attn
from longctx.model.lightning import tnl_decay
from longctx.train.metrics import measure_matmul_flops


def parse_len(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def fwd_flops_per_token(H: int, D: int, C: int = 64, M: int = 64) -> float:
    # per head and token: QK^T and AV on full C x C tiles, Q@P and the chunk state, the block scan
    return H * (2 * C * D + 2 * C * D + 2 * D * D + 2 * D * D + 2 * M * D * D / C)


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def inputs(T, H, D, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g) * 0.5 for _ in range(3))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def ours(T, H, D, decay, reps):
    q, k, v = inputs(T, H, D, False)
    t_f = best_time(lambda: lightning_attn(q, k, v, decay), reps)
    del q, k, v
    q, k, v = inputs(T, H, D, True)

    def fb():
        lightning_attn(q, k, v, decay).sum().backward()
        for x in (q, k, v):
            x.grad = None
    t_fb = best_time(fb, reps)
    return t_f, t_fb


def peer(T, H, D, decay, reps):
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla
    q, k, v = inputs(T, H, D, True)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, T, H, D)
    g = (-decay).view(1, 1, H).expand(1, T, H).contiguous()
    with torch.no_grad():
        t_f = best_time(lambda: naive_chunk_simple_gla(qt, kt, vt, g, scale=1.0), reps)
        o_peer = naive_chunk_simple_gla(qt, kt, vt, g, scale=1.0)[0].transpose(1, 2)
        o_ours = lightning_attn(q.detach(), k.detach(), v.detach(), decay)
        rel = float((o_peer - o_ours).norm() / o_ours.norm())

    def fb():
        naive_chunk_simple_gla(qt, kt, vt, g, scale=1.0)[0].sum().backward()
        for x in (qt, kt, vt):
            x.grad = None
    t_fb = best_time(fb, reps)
    return t_f, t_fb, rel


def main():
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8k,64k,256k,1m")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--peer-budget", type=float, default=120.0, help="skip the peer where it would take longer")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    H, D = args.heads, args.dim
    decay = tnl_decay(H, 0, 2)
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32, n=2048, seconds=3.0)
    fpt = fwd_flops_per_token(H, D)
    try:
        import fla  # noqa: F401
        have_peer = True
    except Exception as exc:  # noqa: BLE001 - report and go on without the peer
        print(f"peer unavailable: flash-linear-attention does not import ({type(exc).__name__}: {exc})")
        have_peer = False
    rows, peer_cost = [], None  # peer seconds per token (fwd+bwd), to skip lengths it cannot finish
    for T in map(parse_len, args.lengths.split(",")):
        reps = 3  # best of: the first call at a new size pays first-touch page faults
        print(f"T={T:,} ...", file=sys.stderr, flush=True)
        t_f, t_fb = ours(T, H, D, decay, reps)
        row = {"T": T, "fwd_tok_s": T / t_f, "fwdbwd_tok_s": T / t_fb, "fwd_flop_frac": fpt * T / t_f / peak,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        if have_peer and (peer_cost is None or peer_cost * T * (reps + 2) < args.peer_budget):
            pf, pfb, rel = peer(T, H, D, decay, reps)
            peer_cost = pfb / T
            row.update(peer_fwd_tok_s=T / pf, peer_fwdbwd_tok_s=T / pfb, peer_rel_diff=rel)
        rows.append(row)
    base = rows[0]["fwdbwd_tok_s"]
    print(f"\nmachine: {os.cpu_count()} CPU threads, torch {torch.__version__}; fp32 matmul rate measured "
          f"{peak / 1e9:.1f} GFLOP/s; B=1 H={H} D={D} fp32; our forward counts {fpt / 1e3:.0f} kFLOP/token")
    print(f"{'T':>9} {'fwd tok/s':>11} {'fwd+bwd tok/s':>14} {'vs first T':>11} {'fwd % matmul':>13} "
          f"{'peer fwd+bwd':>13} {'speed-up':>9} {'peer rel.diff':>14} {'peak RSS GiB':>13}")
    for r in rows:
        pe = r.get("peer_fwdbwd_tok_s")
        peer_s = f"{pe:,.0f}" if pe else "skipped"
        speed = f"{r['fwdbwd_tok_s'] / pe:.1f}x" if pe else "-"
        diff = f"{r['peer_rel_diff']:.1e}" if pe else "-"
        print(f"{r['T']:>9,} {r['fwd_tok_s']:>11,.0f} {r['fwdbwd_tok_s']:>14,.0f} {r['fwdbwd_tok_s'] / base:>10.2f}x "
              f"{r['fwd_flop_frac']:>12.1%} {peer_s:>13} {speed:>9} {diff:>14} {r['peak_rss_gib']:>13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "fwd_flops_per_token": fpt, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
