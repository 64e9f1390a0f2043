"""One prepared run for a short GPU lease: correctness of every Triton kernel against its torch
reference at full size, then timings beside peers measured in the same run.

    python benchmarks/gpu_check.py [--quick] [--out results.json]

Every later kernel adds its case to CHECKS (correctness) and TIMINGS (speed). Sized to finish
well inside 10 minutes on one H100/H200; --quick trims lengths for a first smoke run.

Needs on the GPU machine: torch, triton; optional peers: flash-linear-attention (fla) for
`chunk_simple_gla`. Wheels for what the lent machine lacks are in ../shared/wheels (see
docs/benchmarks.md for the command).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List

import torch

RESULTS: Dict[str, list] = {"checks": [], "timings": []}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cuda_time(fn: Callable, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2]


def measured_bandwidth() -> float:
    """Device memory bandwidth (bytes/s) from a large copy: read + write."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), reps=5)
    return 2 * x.numel() / t


# --- lightning attention -----------------------------------------------------------------------
def check_lightning():
    from longctx.kernels.lightning import lightning_attn
    from longctx.model.lightning import tnl_decay
    torch.manual_seed(0)
    for dtype, T, H, D, cu in ((torch.float32, 8192, 16, 128, None), (torch.bfloat16, 8192, 16, 128, None),
                               (torch.float32, 4099, 4, 64, [0, 17, 2048, 2049, 4099]), (torch.bfloat16, 1000, 4, 256, None)):
        B = 1
        q, k, v = (torch.randn(B, H, T, D, device="cuda") * 0.3 for _ in range(3))
        decay = tnl_decay(H, 1, 4).cuda()
        S = len(cu) - 1 if cu else B
        i0 = torch.randn(S, H, D, D, device="cuda") * 0.1
        cu_t = torch.tensor(cu, device="cuda", dtype=torch.int32) if cu else None
        res = {}
        for be, dt in (("torch", torch.float32), ("triton", dtype)):
            xs = [x.to(dt).requires_grad_() for x in (q, k, v)] + [i0.clone().requires_grad_()]
            o, f = lightning_attn(*xs[:3], decay, 1.0 / D ** 0.5, xs[3], True, cu_t, backend=be)
            g = torch.Generator(device="cuda").manual_seed(1)
            go = torch.randn(o.shape, device="cuda", generator=g).to(o.dtype)
            gf = torch.randn(f.shape, device="cuda", generator=g)
            grads = torch.autograd.grad((o.float() * go.float()).sum() + (f * gf).sum(), xs)
            res[be] = [o, f, *grads]
        errs = {n: rel_err(a, b) for n, a, b in zip(["o", "final", "dq", "dk", "dv", "dinit"], res["triton"], res["torch"])}
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = all(e < tol for e in errs.values())
        RESULTS["checks"].append({"kernel": "lightning", "dtype": str(dtype), "T": T, "H": H, "D": D,
                                  "docs": cu is not None, "rel_err": errs, "tol": tol, "ok": ok})
        print(f"check lightning {str(dtype):15s} T={T:6d} H={H} D={D} docs={cu is not None}: "
              f"{'OK ' if ok else 'FAIL'} max rel err {max(errs.values()):.2e} (tol {tol})", flush=True)


def time_lightning(lengths: List[int]):
    from longctx.kernels.lightning import lightning_attn
    from longctx.model.lightning import tnl_decay
    H, D = 16, 128
    decay = tnl_decay(H, 1, 4).cuda()
    bw = measured_bandwidth()
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - the peer is optional
        print(f"fla unavailable ({type(exc).__name__}): lightning timed without its peer")
        chunk_simple_gla = None
    for T in lengths:
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        row = {"kernel": "lightning", "T": T, "H": H, "D": D, "dtype": "bf16"}
        row["ours_fwd_s"] = cuda_time(lambda: lightning_attn(q, k, v, decay))
        row["ours_fwdbwd_s"] = cuda_time(lambda: lightning_attn(q, k, v, decay).sum().backward())
        floor = 4 * T * H * D * 2 / bw  # read q, k, v and write o once, bf16
        row["fwd_bandwidth_floor_s"], row["fwd_vs_floor"] = floor, row["ours_fwd_s"] / floor
        if chunk_simple_gla is not None:
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            gg = -decay.float()
            row["fla_fwd_s"] = cuda_time(lambda: chunk_simple_gla(qt, kt, vt, g_gamma=gg, scale=1.0))
            row["fla_fwdbwd_s"] = cuda_time(lambda: chunk_simple_gla(qt, kt, vt, g_gamma=gg, scale=1.0)[0]
                                            .sum().backward())
        if T <= 131072:
            qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
            sd = torch.nn.functional.scaled_dot_product_attention
            row["sdpa_fwd_s"] = cuda_time(lambda: sd(qs, ks, vs, is_causal=True), reps=3)
            row["sdpa_fwdbwd_s"] = cuda_time(lambda: sd(qs, ks, vs, is_causal=True).sum().backward(), reps=3)
        RESULTS["timings"].append(row)
        print("time " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        q = k = v = None  # free before the next length
        torch.cuda.empty_cache()


CHECKS = [check_lightning]
TIMINGS = [time_lightning]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    RESULTS["device"] = name
    t0 = time.time()
    for fn in CHECKS:
        fn()
    lengths = [8192, 32768] if args.quick else [8192, 32768, 131072, 524288]
    for fn in TIMINGS:
        fn(lengths)
    RESULTS["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    print(f"done in {RESULTS['wall_s']:.0f} s; {len(bad)} failed checks; results in {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
