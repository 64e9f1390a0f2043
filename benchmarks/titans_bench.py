"""Titans neural memory: throughput beside titans-pytorch, per-token cost vs length, capacity.

  python benchmarks/titans_bench.py [--lengths 4096 16384 65536] [--long] [--peer-max 16384]
                                    [--threads 1] [--out FILE.json]

1. Forward+backward tokens/s of our NeuralMemory (dim 256, chunk 64, depth 2) at each length,
   batch 1, fp32, in two shapes: peer-shaped (1 head of 256, MLP expansion 4, as
   titans_pytorch.NeuralMemory(dim=256, chunk_size=64) defaults) and multi-head (4 heads of 64,
   expansion 2). The peer runs in the same process when `titans_pytorch` imports (lengths up to
   --peer-max: it is slow), else "peer unavailable". Ratio = ours / peer at the same length.
   A third variant, 4 x 64 with model.memory.recompute=4096 (pieces checkpointed with the state
   entering them), runs at every length; the two without recompute only up to --plain-max.
2. Constant per-token cost: tokens/s at the shortest vs the longest length (--long adds 256K, 1M).
   Ceiling: the matmul FLOPs per token of the peer-shaped memory (counted by FlopCounterMode),
   this machine's bmm peak in fp32 and bf16, and so the most tokens/s any schedule of those
   matmuls could reach, beside what 20x the peer needs.
3. Capacity: store N random (key, value) pairs, d = 64 (unit keys and values, one head, chunk 1,
   no momentum or forgetting, θ fixed), in one pass and in 3 passes over the same pairs; then
   read every key with the final weights.
   recall@cos = mean cosine(M(k_i), v_i); recall@1 = fraction of keys whose read is nearest (by
   cosine) to its own value among all N stored values. Matrix memory (θ = 0.5: the delta rule's
   exact write) and depth 2 (θ = 0.25, expansion 2; 0.8 diverges in 3 passes), N = 16..128.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from longctx.memory.titans import Gates, MemoryState, NeuralMemory, memory_apply, memory_scan


def time_fwd_bwd(fn, x, reps: int = 2) -> float:
    """Best of `reps` forward+backward wall times (seconds), after one warm-up at the same shape."""
    best = float("inf")
    for i in range(reps + 1):
        xx = x.detach().requires_grad_(True)
        t = time.perf_counter()
        fn(xx).float().pow(2).mean().backward()
        dt = time.perf_counter() - t
        if i:
            best = min(best, dt)
    return best


def ours(heads: int, expansion: int, recompute: int = 0):
    torch.manual_seed(0)
    m = NeuralMemory(256, heads=heads, depth=2, chunk=64, max_lr=0.01, expansion=expansion, recompute=recompute)
    return lambda x: m(x)[0]


def peer():
    try:
        from titans_pytorch import NeuralMemory as PeerMemory
    except Exception as exc:  # noqa: BLE001 — any import failure means no peer
        print(f"peer unavailable ({type(exc).__name__}: {exc})")
        return None
    torch.manual_seed(0)
    m = PeerMemory(dim=256, chunk_size=64)
    return lambda x: m(x)[0]


RECOMPUTE = 4096  # the recomputing variant: pieces of this many tokens (model.memory.recompute)


def throughput(lengths, peer_max, reps, plain_max):
    rows = []
    fns = {"ours 1x256 e4": ours(1, 4), "ours 4x64 e2": ours(4, 2),
           f"ours 4x64 e2 recompute {RECOMPUTE}": ours(4, 2, RECOMPUTE)}
    p = peer()
    for L in lengths:
        x = torch.randn(1, L, 256)
        row = {"tokens": L}
        for name, fn in fns.items():
            if L <= plain_max or "recompute" in name:  # without recompute autograd keeps every chunk
                row[name] = L / time_fwd_bwd(fn, x, reps if L <= 65536 else 1)
        if p is not None and L <= peer_max:
            row["peer"] = L / time_fwd_bwd(p, x, 1)
            row["ratio"] = row["ours 1x256 e4"] / row["peer"]
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:,.0f}" if k != "ratio" else f"{k}={v:.1f}x" for k, v in row.items()),
              flush=True)
    return rows


def matmul_peak(dtype, reps: int = 20) -> float:
    """Best FLOP/s of this machine's bmm at the memory's chunk shapes (peer shape: chunk 64,
    d 256, hidden 1024) and at 2048^3, in `dtype` with the current threads."""
    best = 0.0
    for m, k, n in ((64, 256, 1024), (64, 1024, 256), (256, 64, 1024), (2048, 2048, 2048)):
        a, b = torch.randn(1, m, k, dtype=dtype), torch.randn(1, k, n, dtype=dtype)
        for _ in range(3):
            torch.bmm(a, b)
        t = time.perf_counter()
        for _ in range(reps):
            torch.bmm(a, b)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def ceiling(tp) -> dict:
    """What the issue's 20x would take, measured: matmul FLOPs per token of our peer-shaped memory
    forward+backward (torch's FlopCounterMode: mm, bmm, baddbmm, everything the closed form does),
    the FLOP/s it reaches, and the tokens/s at this machine's matmul peak (fp32 and bf16)."""
    from torch.utils.flop_counter import FlopCounterMode
    L = 4096
    fn, x = ours(1, 4), torch.randn(1, L, 256, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        fn(x).pow(2).mean().backward()
    per_token = fc.get_total_flops() / L
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    row = max((r for r in tp if "peer" in r and "ours 1x256 e4" in r), key=lambda r: r["tokens"], default=None)
    out = {"flops_per_token": per_token, "peak_fp32": peak32, "peak_bf16": peak16,
           "ceiling_fp32": peak32 / per_token, "ceiling_bf16": peak16 / per_token, "threads": torch.get_num_threads()}
    if row is not None:
        out.update(tokens=row["tokens"], ours=row["ours 1x256 e4"], peer=row["peer"], goal=20 * row["peer"],
                   achieved_flops=row["ours 1x256 e4"] * per_token, goal_flops=20 * row["peer"] * per_token)
    return out


def ceiling_lines(c: dict) -> list:
    g = 1e9
    lines = [f"matmul FLOPs per token, ours 1x256 e4 forward+backward: {c['flops_per_token'] / 1e6:.1f} M",
             f"this machine's bmm peak ({c['threads']} threads): fp32 {c['peak_fp32'] / g:.0f} GFLOP/s, "
             f"bf16 {c['peak_bf16'] / g:.0f} GFLOP/s -> at most {c['ceiling_fp32']:,.0f} tokens/s in fp32, "
             f"{c['ceiling_bf16']:,.0f} in bf16 (every FLOP a matmul at peak)"]
    if "goal" in c:
        lines.append(f"at {c['tokens']:,} tokens: ours {c['ours']:,.0f} tokens/s = {c['achieved_flops'] / g:.0f} GFLOP/s "
                     f"({c['achieved_flops'] / c['peak_fp32']:.0%} of the fp32 peak); 20x the peer = {c['goal']:,.0f} "
                     f"tokens/s needs {c['goal_flops'] / g:.0f} GFLOP/s = {c['goal_flops'] / c['peak_fp32']:.1f}x the fp32 "
                     f"peak, {c['goal_flops'] / c['peak_bf16']:.1f}x the bf16 peak; the fp32 peak allows "
                     f"{c['ceiling_fp32'] / c['peer']:.1f}x the peer, the bf16 peak {c['ceiling_bf16'] / c['peer']:.1f}x")
    return lines


def capacity(n_values=(16, 32, 64, 128), d: int = 64, seed: int = 0, passes=(1, 3)):
    rows = []
    for depth, theta, expansion in ((1, 0.5, 1), (2, 0.25, 2)):
        for p in passes:
            for N in n_values:
                g = torch.Generator().manual_seed(seed + N)
                k = F.normalize(torch.randn(1, 1, N, d, generator=g, dtype=torch.float64), dim=-1)
                v = F.normalize(torch.randn(1, 1, N, d, generator=g, dtype=torch.float64), dim=-1)
                if depth == 1:
                    W = (torch.zeros(1, 1, d, d, dtype=torch.float64),)
                else:
                    W = (torch.randn(1, 1, d, expansion * d, generator=g, dtype=torch.float64) / d ** 0.5,
                         torch.zeros(1, 1, expansion * d, d, dtype=torch.float64))
                z = torch.zeros(1, 1, N * p, dtype=torch.float64)
                gates = Gates(torch.full_like(z, -1e4), z + theta, z)  # η ≈ 0, α = 0, θ fixed
                ks, vs = k.repeat(1, 1, p, 1), v.repeat(1, 1, p, 1)     # the pairs, p times in a row
                st0 = MemoryState(W, tuple(torch.zeros_like(w) for w in W))
                _, st = memory_scan(ks, ks, vs, gates, st0, chunk=1)
                r = memory_apply(st.weights, k)[0, 0]                              # (N, d)
                cos = F.cosine_similarity(r, v[0, 0], dim=-1)
                sims = F.normalize(r, dim=-1) @ v[0, 0].T                           # (N, N)
                top1 = (sims.argmax(-1) == torch.arange(N)).double().mean()
                rows.append({"depth": depth, "theta": theta, "passes": p, "N": N,
                             "recall_cos": float(cos.mean()), "recall_at_1": float(top1)})
                print(f"  depth {depth}  θ={theta}  passes={p}  N={N:4d}  recall@cos={float(cos.mean()):.3f}  "
                      f"recall@1={float(top1):.3f}")
    return rows


def report(path: str) -> None:
    """Markdown tables of a results JSON (throughput, per-token ratio, capacity)."""
    with open(path) as f:
        res = json.load(f)
    tp = res["throughput"]
    cols = [k for k in tp[0] if k.startswith("ours")] + (["peer", "ratio"] if any("peer" in r for r in tp) else [])
    print("| tokens | " + " | ".join(c.replace("ours ", "ours, ").replace("peer", "titans-pytorch").replace(
        "ratio", "ours / peer (same shape)") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in tp:
        cells = [("—" if c not in r else f"{r[c]:.1f}x" if c == "ratio" else f"{r[c]:,.0f}") for c in cols]
        print(f"| {r['tokens']:,} | " + " | ".join(cells) + " |")
    print()
    for k, v in res["per_token_ratio"].items():
        print(f"- {k}: tokens/s at {v['to']:,} / at {v['from']:,} = {v['ratio']:.2f}")
    if "ceiling" in res:
        print()
        for line in ceiling_lines(res["ceiling"]):
            print(f"- {line}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", metavar="JSON", help="print the markdown tables of a results JSON and exit")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--long", action="store_true", help="also 262144 and 1048576 tokens (ours only)")
    ap.add_argument("--peer-max", type=int, default=16384, help="longest length the peer runs at")
    ap.add_argument("--plain-max", type=int, default=65536,
                    help="longest length the variants without recompute run at (their memory grows with it)")
    ap.add_argument("--reps", type=int, default=2)
    # 1 by default: on a shared 2-core machine a second intra-op thread mostly waits (5-10x
    # slower and erratic under load); ours and the peer run under the same setting
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.report:
        report(a.report)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = a.lengths + ([262144, 1048576] if a.long else [])
    print(f"throughput: forward+backward tokens/s, dim 256, chunk 64, depth 2, fp32, "
          f"{torch.get_num_threads()} threads")
    tp = throughput(lengths, a.peer_max, a.reps, a.plain_max)
    lo = tp[0]
    per_token = {}
    for k in (k for k in lo if k.startswith("ours")):
        hi = [r for r in tp if k in r][-1]
        per_token[k] = {"ratio": hi[k] / lo[k], "from": lo["tokens"], "to": hi["tokens"]}
    print("per-token cost: tokens/s at the longest length / at the shortest (1.0 = constant): "
          + ", ".join(f"{k} {v['ratio']:.2f} ({v['to']:,} vs {v['from']:,})" for k, v in per_token.items()))
    print("ceiling: what 20x the peer would take on this machine")
    ceil = ceiling(tp)
    for line in ceiling_lines(ceil):
        print("  " + line)
    print("capacity: d=64, store N pairs (1 or 3 passes), then recall")
    cap = capacity()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"throughput": tp, "per_token_ratio": per_token, "ceiling": ceil, "capacity": cap}, f, indent=1)


if __name__ == "__main__":
    main()
