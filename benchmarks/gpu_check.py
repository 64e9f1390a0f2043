"""One prepared run for a short GPU lease: correctness of every Triton kernel against its torch
reference at full size, then timings beside peers measured in the same run.

    python benchmarks/gpu_check.py [--quick] [--only flash,lightning] [--out results.json]
    python benchmarks/gpu_check.py --report results.json      # markdown tables, no GPU needed
    python benchmarks/gpu_check.py --only landmarksweep --out sweep.json   # landmark launch shapes, ~2-3 min

Every later kernel adds its case to CHECKS (correctness) and TIMINGS (speed), named
check_<kernel> / time_<kernel> so that --only <kernel> selects it (time_<kernel>sweep parts,
tuning sweeps, run only when named). Sized to finish well inside
10 minutes on one H100/H200 (the flash part in about 3); --quick trims lengths for a first
smoke run. A part that raises is recorded as a failed check and the run goes on.

Needs on the GPU machine: torch, triton; optional peers: flash-linear-attention (fla) for
`chunk_simple_gla`. Wheels for what the lent machine lacks are in ../shared/wheels (see
docs/benchmarks.md for the command).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # `python3 benchmarks/gpu_check.py` from a checkout: longctx need not be installed

RESULTS: Dict[str, list] = {"checks": [], "timings": []}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cuda_time(fn: Callable, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds per call, timed with CUDA events (wall clock without CUDA: smoke tests)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]
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


def time_lightning(quick: bool):
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
    for T in [8192, 32768] if quick else [8192, 32768, 131072, 524288]:
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


# --- flash attention (softmax with lse) ----------------------------------------------------------
def _flash_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, Tq, D, device=device, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device, generator=g).to(dtype)
    return q, k, v


def _flash_run(q, k, v, backend, go, gl, **kw):
    """out, lse and (dq, dk, dv) of sum(out * go) + sum(lse * gl) (rows without keys: lse term 0)."""
    from longctx.kernels.flash import flash_attn
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o, lse = flash_attn(*xs, backend=backend, **kw)
    loss = (o.float() * go).sum() + (torch.nan_to_num(lse, neginf=0.0) * gl).sum()
    return [o, lse, *torch.autograd.grad(loss, xs)]


def check_flash():
    """Triton flash kernel against the torch path (fp32, on the same values) at full size:
    causal, GQA, documents, a window, a ring piece whose first rows see no key."""
    B, H, Hkv, D = 2, 8, 2, 128
    for dtype, Tq, Tk, window, with_docs, shift in (
            (torch.float32, 2048, 2048, None, True, False),
            (torch.bfloat16, 4096, 4096, None, True, False),
            (torch.bfloat16, 4096, 4096, 1000, False, False),
            (torch.float32, 3001, 3001, 700, True, False),  # not a multiple of any tile
            (torch.bfloat16, 2048, 3000, None, False, True)):  # keys from 1000 on, queries from 500
        q, k, v = _flash_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=Tq + Tk)
        kw = dict(causal=True, window=window)
        if with_docs:
            starts = torch.zeros(B, Tq, dtype=torch.long, device="cuda")
            starts[0, [1, 700, 701, 1500]] = 1
            starts[1, [1024]] = 1
            kw["doc_ids"] = starts.cumsum(1)
        if shift:
            kw["q_pos"] = torch.arange(Tq, device="cuda") + 500
            kw["k_pos"] = torch.arange(Tk, device="cuda") + 1000
        g = torch.Generator(device="cuda").manual_seed(1)
        go = torch.randn(B, H, Tq, D, device="cuda", generator=g).to(dtype).float()  # same dO for both
        gl = torch.randn(B, H, Tq, device="cuda", generator=g)
        got = _flash_run(q, k, v, "triton", go, gl, **kw)
        ref = _flash_run(q.float(), k.float(), v.float(), "torch", go, gl, **kw)
        names = ["o", "lse", "dq", "dk", "dv"]
        same_empty = bool((torch.isinf(got[1]) == torch.isinf(ref[1])).all())
        finite = all(bool(torch.isfinite(x).all()) for x in got[:1] + got[2:])
        errs = {n: rel_err(torch.nan_to_num(a.float(), neginf=0.0), torch.nan_to_num(b, neginf=0.0))
                for n, a, b in zip(names, got, ref)}
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = all(e < tol for e in errs.values()) and same_empty and finite
        RESULTS["checks"].append({"kernel": "flash", "dtype": str(dtype), "Tq": Tq, "Tk": Tk, "H": H, "Hkv": Hkv,
                                  "D": D, "window": window, "docs": with_docs, "shifted": shift, "rel_err": errs,
                                  "empty_rows_match": same_empty, "finite": finite, "tol": tol, "ok": ok})
        print(f"check flash {str(dtype):15s} Tq={Tq} Tk={Tk} window={window} docs={with_docs} shift={shift}: "
              f"{'OK ' if ok else 'FAIL'} max rel err {max(errs.values()):.2e} (tol {tol}) "
              + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
        got = ref = None
        torch.cuda.empty_cache()


def _sdpa_flash(q, k, v, gqa: bool):
    """SDPA forced onto its flash backend; GQA through enable_gqa (else repeated K/V)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if gqa:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_flash(quick: bool):
    """Causal bf16 d=128 B=1 H=16: forward and forward+backward, ours beside SDPA's flash backend."""
    from longctx.kernels.flash import flash_attn
    B, H, D = 1, 16, 128
    lengths = [8192, 32768] if quick else [8192, 16384, 32768, 65536, 131072]
    for Hkv in (16, 4):
        for T in lengths:
            q, k, v = _flash_inputs(B, H, Hkv, T, T, D, torch.bfloat16, seed=T)
            go = torch.randn_like(q)
            xs = [x.requires_grad_() for x in (q, k, v)]
            reps = 5 if T <= 32768 else 3
            fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            row = {"kernel": "flash", "T": T, "H": H, "Hkv": Hkv, "D": D, "dtype": "bf16", "causal": True}

            def ours_fwd():
                with torch.no_grad():
                    flash_attn(q, k, v, causal=True, backend="triton")

            def ours_fwdbwd():
                o, _ = flash_attn(*xs, causal=True, backend="triton")
                torch.autograd.grad(o, xs, go)

            def sdpa_fwd():
                with torch.no_grad():
                    _sdpa_flash(q, k, v, Hkv != H)

            def sdpa_fwdbwd():
                torch.autograd.grad(_sdpa_flash(*xs, Hkv != H), xs, go)

            for name, fn, flops in (("ours_fwd", ours_fwd, fwd_flops), ("ours_fwdbwd", ours_fwdbwd, 3.5 * fwd_flops),
                                    ("sdpa_fwd", sdpa_fwd, fwd_flops), ("sdpa_fwdbwd", sdpa_fwdbwd, 3.5 * fwd_flops)):
                try:
                    t = cuda_time(fn, reps=reps, warmup=1)
                    row[name + "_s"], row[name + "_tflops"] = t, flops / t / 1e12
                except torch.cuda.OutOfMemoryError:
                    row[name + "_s"] = "oom"
                except RuntimeError as exc:  # e.g. SDPA's flash backend refusing a shape
                    row[name + "_s"] = f"error: {str(exc).splitlines()[0][:120]}"
                torch.cuda.empty_cache()
            for p in ("fwd", "fwdbwd"):
                a, b = row.get(f"ours_{p}_s"), row.get(f"sdpa_{p}_s")
                if isinstance(a, float) and isinstance(b, float):
                    row[f"speed_vs_sdpa_{p}"] = b / a  # > 1: ours is faster
            RESULTS["timings"].append(row)
            print("time " + " ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                                     for k_, v_ in row.items()), flush=True)
            q = k = v = xs = go = None
            torch.cuda.empty_cache()


# --- landmark attention (grouped softmax, issue 6) ------------------------------------------------
def _landmark_run(q, k, v, block, backend, go):
    """out and (dq, dk, dv) of sum(out * go), plus lse from the backend's forward."""
    from longctx.kernels.landmark_torch import landmark_attn, landmark_fwd_torch
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o = landmark_attn(*xs, block, backend=backend)
    grads = torch.autograd.grad((o.float() * go).sum(), xs)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        if backend == "triton":
            from longctx.kernels.landmark_triton import landmark_fwd_triton
            lse = landmark_fwd_triton(q, k, v, block, scale)[1]
        else:
            lse = landmark_fwd_torch(q, k, v, block, scale)[1]
    return [o, lse, *grads]


def _flash_timers(q, k, v, xs, go):
    """(forward, forward+backward) closures of our causal flash kernel (Triton): the peer every
    landmark timing is set beside."""
    from longctx.kernels.flash import flash_attn

    def fwd():
        with torch.no_grad():
            flash_attn(q, k, v, causal=True, backend="triton")

    def fwdbwd():
        o, _ = flash_attn(*xs, causal=True, backend="triton")
        torch.autograd.grad(o, xs, go)
    return fwd, fwdbwd


def check_landmark():
    """Triton landmark kernel against the torch path (fp32, on the same values): GQA, block 64,
    lengths that end mid-group and on a group boundary."""
    B, H, Hkv, D, block = 2, 8, 2, 128, 64
    for dtype, T in ((torch.float32, 2048), (torch.bfloat16, 4096), (torch.float32, 3001),
                     (torch.bfloat16, 65 * 40)):  # 3001: mid-group; 2600: ends on a landmark
        q, k, v = _flash_inputs(B, H, Hkv, T, T, D, dtype, seed=T)
        g = torch.Generator(device="cuda").manual_seed(1)
        go = torch.randn(B, H, T, D, device="cuda", generator=g).to(dtype).float()  # same dO for both
        got = _landmark_run(q, k, v, block, "triton", go)
        ref = _landmark_run(q.float(), k.float(), v.float(), block, "torch", go)
        names = ["o", "lse", "dq", "dk", "dv"]
        finite = all(bool(torch.isfinite(x).all()) for x in got)
        errs = {n: rel_err(a.float(), b) for n, a, b in zip(names, got, ref)}
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = all(e < tol for e in errs.values()) and finite
        RESULTS["checks"].append({"kernel": "landmark", "dtype": str(dtype), "T": T, "H": H, "Hkv": Hkv, "D": D,
                                  "block": block, "rel_err": errs, "finite": finite, "tol": tol, "ok": ok})
        print(f"check landmark {str(dtype):15s} T={T} block={block}: {'OK ' if ok else 'FAIL'} max rel err "
              f"{max(errs.values()):.2e} (tol {tol}) " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
              flush=True)
        got = ref = None
        torch.cuda.empty_cache()


def time_landmark(quick: bool):
    """Landmark attention (block 64) beside our causal flash kernel in the same run, bf16 d=128
    B=1 H=16 (MHA): forward and forward+backward; goal (issue 6): fwd+bwd within 1.5x of flash."""
    from longctx.kernels.landmark_torch import landmark_attn
    B, H, D, block = 1, 16, 128, 64
    for T in ([8192] if quick else [8192, 16384, 32768]):
        q, k, v = _flash_inputs(B, H, H, T, T, D, torch.bfloat16, seed=T)
        go = torch.randn_like(q)
        xs = [x.requires_grad_() for x in (q, k, v)]
        row = {"kernel": "landmark", "T": T, "H": H, "D": D, "block": block, "dtype": "bf16"}

        def lm_fwd():
            with torch.no_grad():
                landmark_attn(q, k, v, block, backend="triton")

        def lm_fwdbwd():
            torch.autograd.grad(landmark_attn(*xs, block, backend="triton"), xs, go)

        flash_fwd, flash_fwdbwd = _flash_timers(q, k, v, xs, go)

        for name, fn in (("landmark_fwd", lm_fwd), ("landmark_fwdbwd", lm_fwdbwd), ("flash_fwd", flash_fwd),
                         ("flash_fwdbwd", flash_fwdbwd)):
            try:
                row[name + "_s"] = cuda_time(fn, reps=5, warmup=1)
            except torch.cuda.OutOfMemoryError:
                row[name + "_s"] = "oom"
            torch.cuda.empty_cache()
        for p in ("fwd", "fwdbwd"):
            a, b = row.get(f"landmark_{p}_s"), row.get(f"flash_{p}_s")
            if isinstance(a, float) and isinstance(b, float):
                row[f"landmark_over_flash_{p}"] = a / b  # goal for fwdbwd: <= 1.5
        RESULTS["timings"].append(row)
        print("time " + " ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                                 for k_, v_ in row.items()), flush=True)
        q = k = v = xs = go = None
        torch.cuda.empty_cache()


def _tiles_str(cfg, block: int) -> str:
    return ", ".join(f"{n} {t.bm}x{block} w{t.warps} s{t.stages}" for n, t in
                     (("fwd", cfg.fwd), ("dkdv", cfg.dkdv), ("dq", cfg.dq))) + f", lc {cfg.lc}"


SWEEP_SHAPES = dict(B=1, H=16, D=128, block=64, T=16384, T_quick=8192,
                    checks=(("fp32 T=2048", torch.float32, 2, 8, 2, 2048),  # label, dtype, B, H, Hkv, T
                            ("bf16 T=4096", torch.bfloat16, 1, 16, 16, 4096)))


def _sweep_one(name: str, cand, checks, fp32_done: dict, lm_fwd, lm_fwdbwd, flash: dict, row: dict,
               device: str):
    """One candidate (LONGCTX_LANDMARK_CFG already names it): its checks, then fwd and fwd+bwd time.
    Fills row; returns (ok, parts). fp32_done: lc -> (errs, ok, candidate) of fp32 checks already run."""
    ok_all, parts = True, []
    for label, dtype, q, k, v, go, ref in checks:
        key = label.split()[0]
        if dtype == torch.float32 and cand.lc in fp32_done:
            errs, ok, src = fp32_done[cand.lc]
            parts.append(f"{label} {max(errs.values()):.1e} {'OK' if ok else 'FAIL'} (= {src}'s kernels)")
            row[key + "_rel_err"] = errs
            ok_all &= ok
            continue
        try:
            got = _landmark_run(q, k, v, row["block"], "triton", go)
            finite = all(bool(torch.isfinite(x).all()) for x in got)
            errs = {n: rel_err(a.float(), b) for n, a, b in zip(["o", "lse", "dq", "dk", "dv"], got, ref)}
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            ok = finite and all(e < tol for e in errs.values())
            parts.append(f"{label} {max(errs.values()):.1e} {'OK' if ok else 'FAIL'}")
            row[key + "_rel_err"] = errs
            if dtype == torch.float32:
                fp32_done[cand.lc] = (errs, ok, name)
            got = None
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is a result
            ok = False
            parts.append(f"{label} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        ok_all &= ok
        if device == "cuda":
            torch.cuda.empty_cache()
    for key, fn in (("fwd", lm_fwd), ("fwdbwd", lm_fwdbwd)):
        try:
            row[f"landmark_{key}_s"] = cuda_time(fn, reps=5, warmup=1)
        except Exception as exc:  # noqa: BLE001
            row[f"landmark_{key}_s"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok_all, parts


def _timing_fns(shapes: dict, quick: bool, device: str):
    """The sweep's timing inputs (bf16, seeded: the same in every process) and landmark fwd / fwd+bwd."""
    from longctx.kernels.landmark_torch import landmark_attn
    B, H, D, block = shapes["B"], shapes["H"], shapes["D"], shapes["block"]
    T = shapes["T_quick"] if quick else shapes["T"]
    qt, kt, vt = _flash_inputs(B, H, H, T, T, D, torch.bfloat16, seed=T, device=device)
    gout = torch.randn(qt.shape, device=device, generator=torch.Generator(device=device).manual_seed(T + 1)
                       ).to(qt.dtype)
    xs = [x.detach().requires_grad_() for x in (qt, kt, vt)]

    def lm_fwd():
        with torch.no_grad():
            landmark_attn(qt, kt, vt, block, backend="triton")

    def lm_fwdbwd():
        torch.autograd.grad(landmark_attn(*xs, block, backend="triton"), xs, gout)
    return (qt, kt, vt, gout, xs), lm_fwd, lm_fwdbwd


def _cand_to_json(cand) -> dict:
    t = lambda x: [x.bm, x.bn, x.warps, x.stages]  # noqa: E731
    return {"fwd": t(cand.fwd), "dkdv": t(cand.dkdv), "dq": t(cand.dq), "lc": cand.lc}


def _cand_from_json(d: dict):
    from longctx.kernels.flash_triton import Tiles
    from longctx.kernels.landmark_triton import LandmarkConfig
    return LandmarkConfig(Tiles(*d["fwd"]), Tiles(*d["dkdv"]), Tiles(*d["dq"]), d["lc"])


def _sweep_child(spec_path: str) -> None:
    """A fresh process for one candidate (python gpu_check.py --sweep-child SPEC): an illegal memory
    access poisons the CUDA context for the rest of its process, so each candidate gets its own.
    Reads the spec and the parent's references, writes {"row", "ok", "parts", "fp32"} beside SPEC."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("crash_for_test") == spec["name"]:
        os.abort()  # stands in for a kernel that takes the process down (tests only)
    from longctx.kernels import landmark_triton as lt
    name, device = spec["name"], spec["device"]
    cand = _cand_from_json(spec["cand"])
    lt.CANDIDATES[name] = cand  # the parent's table (a test may have replaced it)
    os.environ[lt.CONFIG_ENV] = name
    saved = torch.load(spec["refs"])
    checks = [(lab, getattr(torch, dt), *(x.to(device) for x in (q, k, v, go)), [r.to(device) for r in ref])
              for lab, dt, q, k, v, go, ref in saved]
    _, lm_fwd, lm_fwdbwd = _timing_fns(spec["shapes"], spec["quick"], device)
    fp32_done = {int(k_): tuple(v_) for k_, v_ in spec["fp32_done"].items()}
    row = dict(spec["row"])
    ok, parts = _sweep_one(name, cand, checks, fp32_done, lm_fwd, lm_fwdbwd, spec["flash"], row, device)
    with open(spec_path + ".out", "w") as f:
        json.dump({"row": row, "ok": ok, "parts": parts,
                   "fp32": {str(k_): list(v_) for k_, v_ in fp32_done.items()}}, f)


def time_landmarksweep(quick: bool, budget_s: float = 170.0, device: str = "cuda", shapes: dict = SWEEP_SHAPES,
                       isolate: bool = True, crash_for_test: str = ""):
    """The landmark kernel's candidate launch shapes (landmark_triton.CANDIDATES, selected through
    LONGCTX_LANDMARK_CFG, which pick_config reads at every call): for each, correctness against the
    torch path (fp32 T=2048 B=2 H=8 Hkv=2, bf16 T=4096 B=1 H=16; tolerances as check_landmark) and
    landmark_attn fwd and fwd+bwd time at T=16K (8K with --quick), bf16 B=1 H=16 D=128 block 64,
    beside our flash kernel timed once in the same run. One line per candidate, then the fastest
    correct one. Candidates differ in fp16/bf16 tiles; fp32 uses the default tiles and takes only
    lc, so its check runs once per distinct lc.

    isolate (default): each candidate runs in a fresh process (this script with --sweep-child; the
    torch references are computed once here and handed over in a file), because an illegal memory
    access poisons the CUDA context for the rest of its process: a candidate that fails to compile,
    fails its checks, crashes its process or outlives the budget is recorded (a failed check) and
    the others still run. The whole sweep stays within budget_s seconds: no candidate starts with
    under 25 s left (a bf16 candidate compiles in ~20-30 s), and a running one is stopped at the
    budget. isolate=False runs them in this process (CPU smoke tests under TRITON_INTERPRET=1:
    device / shapes for those). crash_for_test: a candidate whose process aborts (tests only)."""
    import subprocess
    import tempfile
    from longctx.kernels import landmark_triton as lt
    t0 = time.time()
    B, H, D, block = shapes["B"], shapes["H"], shapes["D"], shapes["block"]
    T = shapes["T_quick"] if quick else shapes["T"]
    old_env = os.environ.get(lt.CONFIG_ENV)
    names = list(lt.CANDIDATES)
    print(f"sweep landmark: {len(names)} candidates ({', '.join(names)}); timing T={T} bf16 B={B} H={H} D={D} "
          f"block {block}{'; one process each' if isolate else ''}", flush=True)

    # the torch references (fp32, on the same values), once
    checks = []  # (label, dtype, q, k, v, go, ref)
    for label, dtype, Bc, Hc, Hkvc, Tc in shapes["checks"]:
        q, k, v = _flash_inputs(Bc, Hc, Hkvc, Tc, Tc, D, dtype, seed=Tc + 7, device=device)
        g = torch.Generator(device=device).manual_seed(2)
        go = torch.randn(Bc, Hc, Tc, D, device=device, generator=g).to(dtype).float()
        ref = _landmark_run(q.float(), k.float(), v.float(), block, "torch", go)
        checks.append((label, dtype, q, k, v, go, ref))
    print(f"sweep landmark: torch references in {time.time() - t0:.0f} s", flush=True)

    (qt, kt, vt, gout, xs), lm_fwd, lm_fwdbwd = _timing_fns(shapes, quick, device)
    flash = {}
    try:
        flash_fwd, flash_fwdbwd = _flash_timers(qt, kt, vt, xs, gout)
        flash = {"fwd": cuda_time(flash_fwd, reps=5, warmup=1), "fwdbwd": cuda_time(flash_fwdbwd, reps=5, warmup=1)}
        print(f"sweep flash (reference): fwd {flash['fwd'] * 1e3:.2f} ms, fwd+bwd {flash['fwdbwd'] * 1e3:.2f} ms",
              flush=True)
    except Exception as exc:  # noqa: BLE001 - the ratio is optional, the sweep is not
        print(f"sweep flash (reference) failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    tmp = tempfile.mkdtemp(prefix="lmsweep_") if isolate else None
    if isolate:  # hand the references over; free this process's copies of the big tensors
        refs = os.path.join(tmp, "refs.pt")
        torch.save([(lab, str(dt).split(".")[-1], q.cpu(), k.cpu(), v.cpu(), go.cpu(), [r.cpu() for r in ref])
                    for lab, dt, q, k, v, go, ref in checks], refs)
        checks = qt = kt = vt = gout = xs = None
        if device == "cuda":
            torch.cuda.empty_cache()
    json_shapes = {k_: v_ for k_, v_ in shapes.items() if k_ != "checks"}

    fp32_done = {}  # lc -> (errs, ok, candidate that ran it)
    rows = []
    try:
        for name in names:
            cand = lt.CANDIDATES[name]
            row = {"kernel": "landmarksweep", "config": name, "T": T, "H": H, "D": D, "block": block,
                   "tiles": _tiles_str(cand, block)}
            left = budget_s - (time.time() - t0)
            if left < (25.0 if isolate and budget_s > 0 else 0.0) or left <= 0:
                row["skipped"] = f"time budget {budget_s:.0f} s spent"
                RESULTS["timings"].append(row)
                print(f"sweep landmark {name:9s}: skipped ({row['skipped']})", flush=True)
                continue
            ts = time.time()
            if not isolate:
                os.environ[lt.CONFIG_ENV] = name
                ok_all, parts = _sweep_one(name, cand, checks, fp32_done, lm_fwd, lm_fwdbwd, flash, row, device)
            else:
                spec_path = os.path.join(tmp, f"{name}.json")
                with open(spec_path, "w") as f:
                    json.dump({"name": name, "cand": _cand_to_json(cand), "device": device, "refs": refs,
                               "shapes": json_shapes, "quick": quick, "flash": flash, "row": row,
                               "fp32_done": {str(k_): list(v_) for k_, v_ in fp32_done.items()},
                               "crash_for_test": crash_for_test}, f)
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
                env[lt.CONFIG_ENV] = name
                try:
                    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--sweep-child", spec_path],
                                       env=env, capture_output=True, text=True, timeout=max(1.0, left))
                    rc, out = r.returncode, (r.stdout or "") + (r.stderr or "")
                except subprocess.TimeoutExpired as exc:
                    rc = "timeout"
                    out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                    out += f"\nstopped at the sweep's budget ({budget_s:.0f} s)"
                try:
                    with open(spec_path + ".out") as f:
                        res = json.load(f)
                except (OSError, ValueError):
                    res = None
                if rc == 0 and res is not None:
                    row, ok_all, parts = res["row"], res["ok"], res["parts"]
                    fp32_done.update({int(k_): tuple(v_) for k_, v_ in res["fp32"].items()})
                else:
                    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
                    msg = " | ".join(tail)[-400:]
                    ok_all, parts = False, [f"CRASHED (process exit {rc}): {msg}"]
                    row["crash"] = f"exit {rc}: {out.strip()[-2000:]}"
                    row["landmark_fwd_s"] = row["landmark_fwdbwd_s"] = f"error: process exit {rc}"
            RESULTS["checks"].append({"kernel": "landmarksweep", "config": name, "ok": ok_all,
                                      **{k_: v_ for k_, v_ in row.items()
                                         if k_.endswith(("_rel_err", "_error")) or k_ == "crash"}})
            f_, fb = row["landmark_fwd_s"], row["landmark_fwdbwd_s"]
            if isinstance(f_, float) and isinstance(fb, float):
                timing = f"fwd {f_ * 1e3:.2f} ms, fwd+bwd {fb * 1e3:.2f} ms (bwd {(fb - f_) * 1e3:.2f})"
                if flash:
                    row["landmark_over_flash_fwd"] = f_ / flash["fwd"]
                    row["landmark_over_flash_fwdbwd"] = fb / flash["fwdbwd"]
                    timing += f", {fb / flash['fwdbwd']:.2f}x flash fwd+bwd, {f_ / flash['fwd']:.2f}x flash fwd"
            else:
                timing = "timing failed: " + (f_ if not isinstance(f_, float) else fb)
            row["ok"], row["wall_s"] = ok_all, time.time() - ts
            RESULTS["timings"].append(row)
            rows.append(row)
            print(f"sweep landmark {name:9s}: {timing}; {'; '.join(parts)} [{row['tiles']}] ({row['wall_s']:.0f} s)",
                  flush=True)
    finally:
        if old_env is None:
            os.environ.pop(lt.CONFIG_ENV, None)
        else:
            os.environ[lt.CONFIG_ENV] = old_env
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    good = [r for r in rows if r["ok"] and isinstance(r["landmark_fwdbwd_s"], float)]
    if good:
        best = min(good, key=lambda r: r["landmark_fwdbwd_s"])
        ratio = f", {best['landmark_over_flash_fwdbwd']:.2f}x flash" if "landmark_over_flash_fwdbwd" in best else ""
        print(f"sweep landmark best: {best['config']} (fwd+bwd {best['landmark_fwdbwd_s'] * 1e3:.2f} ms{ratio}); "
              f"sweep {time.time() - t0:.0f} s", flush=True)
    else:
        print(f"sweep landmark: no candidate both correct and timed; sweep {time.time() - t0:.0f} s", flush=True)


# --- markdown tables from a results JSON (docs/benchmarks.md is written from these, never by hand) ---
def _ms(x) -> str:
    return f"{x * 1e3:.2f}" if isinstance(x, float) else str(x)


def report(res: dict) -> str:
    """Markdown tables of the lightning and landmark parts of a gpu_check JSON."""
    out = [f"Device: {res.get('device')}; wall {res.get('wall_s', 0):.0f} s.", ""]
    checks = [c for c in res["checks"] if c.get("kernel") in ("lightning", "landmark")]
    if checks:
        out += ["| kernel | dtype | shape | max rel err (tol) | worst tensor | ok |", "|---|---|---|---|---|---|"]
        for c in checks:
            if "rel_err" not in c:
                out.append(f"| {c['kernel']} | | | | {c.get('error', '')[:80]} | False |")
                continue
            worst = max(c["rel_err"], key=c["rel_err"].get)
            shape = f"T={c['T']} H={c['H']}" + (f" Hkv={c['Hkv']}" if "Hkv" in c else "") + f" D={c['D']}"
            shape += f" block={c['block']}" if "block" in c else (" docs" if c.get("docs") else "")
            out.append(f"| {c['kernel']} | {c['dtype'].replace('torch.', '')} | {shape} | "
                       f"{c['rel_err'][worst]:.1e} ({c['tol']:g}) | {worst} | {c['ok']} |")
        out.append("")
    lt = [t for t in res["timings"] if t["kernel"] == "lightning"]
    if lt:
        out += ["Lightning (bf16, B=1, H=16, D=128), ms; ratio = fla time / ours (above 1: ours faster):", "",
                "| T | fwd ours | fwd fla | fwd fla/ours | fwd / bandwidth floor | fwd+bwd ours | fwd+bwd fla "
                "| fwd+bwd fla/ours | fwd+bwd SDPA (causal softmax) |", "|---|---|---|---|---|---|---|---|---|"]
        for t in lt:
            rf = t["fla_fwd_s"] / t["ours_fwd_s"] if "fla_fwd_s" in t else float("nan")
            rb = t["fla_fwdbwd_s"] / t["ours_fwdbwd_s"] if "fla_fwdbwd_s" in t else float("nan")
            out.append(f"| {t['T'] // 1024}K | {_ms(t['ours_fwd_s'])} | {_ms(t.get('fla_fwd_s', '-'))} | {rf:.2f}x | "
                       f"{t['fwd_vs_floor']:.1f}x | {_ms(t['ours_fwdbwd_s'])} | {_ms(t.get('fla_fwdbwd_s', '-'))} | "
                       f"{rb:.2f}x | {_ms(t.get('sdpa_fwdbwd_s', '-'))} |")
        out.append("")
    lm = [t for t in res["timings"] if t["kernel"] == "landmark"]
    if lm:
        out += ["Landmark (bf16, B=1, H=16, D=128, block 64) beside our causal flash kernel, ms:", "",
                "| T | fwd landmark | fwd flash | fwd ratio | fwd+bwd landmark | fwd+bwd flash | fwd+bwd ratio (goal <= 1.5) |",
                "|---|---|---|---|---|---|---|"]
        for t in lm:
            out.append(f"| {t['T'] // 1024}K | {_ms(t['landmark_fwd_s'])} | {_ms(t['flash_fwd_s'])} | "
                       f"{t.get('landmark_over_flash_fwd', float('nan')):.2f}x | {_ms(t['landmark_fwdbwd_s'])} | "
                       f"{_ms(t['flash_fwdbwd_s'])} | {t.get('landmark_over_flash_fwdbwd', float('nan')):.2f}x |")
    return "\n".join(out)


CHECKS = [check_lightning, check_flash, check_landmark]
TIMINGS = [time_lightning, time_flash, time_landmark, time_landmarksweep]


def _kernel_of(fn: Callable) -> str:
    return fn.__name__.split("_", 1)[1]  # check_flash -> flash


def _run_part(fn: Callable, *args):
    """Run one check / timing; an exception becomes a failed check so later parts still run."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - one broken kernel must not hide the others' results
        traceback.print_exc()
        RESULTS["checks"].append({"kernel": _kernel_of(fn), "part": fn.__name__, "ok": False,
                                  "error": f"{type(exc).__name__}: {exc}"[:2000]})
        torch.cuda.empty_cache()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--sweep-child":  # one landmark sweep candidate (internal)
        _sweep_child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the markdown tables of a results JSON (no GPU needed) and exit")
    known = sorted({_kernel_of(f) for f in CHECKS + TIMINGS})
    p.add_argument("--only", default=None, help=f"comma list of kernels to run, of: {', '.join(known)} "
                                                "(default: all but the *sweep parts, tuning runs named on purpose)")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return
    only = ([k for k in known if not k.endswith("sweep")] if args.only is None
            else [x.strip() for x in args.only.split(",") if x.strip()])
    unknown = sorted(set(only) - set(known))
    if unknown:
        p.error(f"--only: unknown kernel(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    RESULTS["device"] = name
    t0 = time.time()
    for fn in CHECKS:
        if _kernel_of(fn) in only:
            _run_part(fn)
    for fn in TIMINGS:
        if _kernel_of(fn) in only:
            _run_part(fn, args.quick)
    RESULTS["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    print(f"done in {RESULTS['wall_s']:.0f} s; {len(bad)} failed checks; results in {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
