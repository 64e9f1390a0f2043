"""Fused Triton kernel for landmark attention's grouped softmax, forward and backward.

Same function as `landmark_torch.py` (the specification; read its docstring): positions 0..T-1
in groups of W = block + 1 (`block` regular tokens, then the group's landmark), and o_i is an
ordinary softmax over modified scores

    s'_ij = s_ij                            j regular in i's own group, j <= i
    s'_ij = s_ij - lse_c(s_i) + s_i,L(c)    j regular in an earlier group c
    (nothing else: landmarks carry no value, later groups are invisible)

Key tiles are whole groups. A tile is the group's `block` regular keys (contiguous in memory at
c * W .. c * W + block - 1, loaded as a BN = block tile) plus the landmark key, one vector at
c * W + block. `block` must therefore be a power of two (16..128). Query tiles are any power of
two BM and need not align with groups: each row takes its own group pos // W, so a tile row is
"earlier" (the group is before the row's own), "own" (causal, landmark excluded) or invisible.

One exp per score, as in flash attention. Per tile and row let e_ij = 2^(s_ij - base_i) over the
row's visible keys (base_i: their max) and sum_i = sum_j e_ij. The tile's largest modified score is
    tm_i = s_i,L - log2(sum_i)   (earlier group: max_j s'_ij = base - lse_c + s_L)
    tm_i = base_i                (own group)
and p'_ij = 2^(s'_ij - m) = e_ij * 2^(tm_i - m) for either kind of row, with m the running max
(forward) or the row's final lse (backward). Scores are in base-2 units (scale * log2(e)).

Backward, with P' and dS' = P' (dP' - Delta_i): in an earlier group
dS_ij = dS'_ij - (e_ij / sum_i) * tot_i and dS_i,L = tot_i, tot_i = sum_j dS'_ij (the
within-group softmax is e / sum); own group dS = dS'. dV of landmarks is 0; dK of a landmark is
scale * sum_i dS_i,L q_i. A kernel over key groups (one group per program, looping over the G
query heads of its kv head: no atomics, fp32 accumulation) writes dK and dV; a kernel over query
blocks writes dQ. In the dK/dV kernel the within-group sums are column sums of the transposed
(keys x queries) tile, since the tile is the whole group.

Precision as in `flash_triton.py`: fp32 inputs use IEEE dots (matches the torch path to ~1e-6),
fp16 / bf16 feed the matrix units in the input dtype with fp32 accumulation. The landmark score
q_i . k_L is a fp32 row reduction (a BM x D product per group, ~1/BN of the tile's dot work).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from longctx.kernels.flash_triton import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, Tiles, _bwd_pre_kernel, _dot,
                                          _interpreting)

Tensor = torch.Tensor
__all__ = ["LandmarkConfig", "pick_config", "landmark_fwd_triton", "landmark_bwd_triton", "check_supported",
           "SUPPORTED_BLOCKS"]

SUPPORTED_BLOCKS = (16, 32, 64, 128)  # regular tokens per landmark: the key tile, a power of two
_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr,
                BN: tl.constexpr):
    """Group c's regular keys k (BN, D), values v (BN, DV), the landmark key kl (D,) (zeros past T)
    and the regular keys' positions kp (BN,)."""
    kp = c * W + offs_j
    k_ok = kp < T
    k = tl.load(k_base + kp[:, None] * D + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(v_base + kp[:, None] * DV + offs_dv[None, :], mask=k_ok[:, None], other=0.0)
    lp = c * W + BN
    # (lp + 0 * offs_d) < T: a vector mask; the interpreter rejects a scalar bool broadcast into one
    kl = tl.load(k_base + lp * D + offs_d, mask=(lp + 0 * offs_d) < T, other=0.0)
    return k, v, kl, kp


@triton.jit
def _landmark_scores(q, kl, qk_scale):
    """q (BM, D) . kl (D,) per query row, in fp32, base-2 units: (BM,)."""
    return tl.sum(q.to(tl.float32) * kl.to(tl.float32)[None, :], 1) * qk_scale


@triton.jit
def _group_stats(s, earlier, sl, AXIS: tl.constexpr):
    """s: masked scores (-inf where invisible), reduced along AXIS (the key axis); earlier, sl:
    per query. Returns e = 2^(s - base), sum (clamped to 1 where nothing is visible, so e / sum
    stays finite) and tm, the tile's largest modified score per query (-inf when none)."""
    base = tl.max(s, AXIS)
    base_s = tl.where(base == float("-inf"), 0.0, base)
    if AXIS == 1:
        e = tl.exp2(s - base_s[:, None])
    else:
        e = tl.exp2(s - base_s[None, :])
    ssum = tl.sum(e, AXIS)
    ssum = tl.where(ssum == 0.0, 1.0, ssum)
    tm = tl.where(earlier, sl - tl.log2(ssum), base)
    return e, ssum, tm


@triton.jit
def _fwd_groups(acc, l_i, m_i, q, qp, qg, m_ok, k_base, v_base, T, W, qk_scale, start, end, offs_j, offs_d,
                offs_dv, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over the modified scores of key groups start..end-1 (MASK False: every row
    of the tile is in a later group, so every key is visible)."""
    for c in range(start, end):
        k, v, kl, kp = _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D, DV, BN)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # (BM, BN)
        sl = _landmark_scores(q, kl, qk_scale)
        earlier = qg > c
        if MASK:
            own = qg == c
            ok = (earlier[:, None] | (own[:, None] & (kp[None, :] <= qp[:, None]))) & (kp[None, :] < T) \
                & m_ok[:, None]
            s = tl.where(ok, s, float("-inf"))
        e, ssum, tm = _group_stats(s, earlier, sl, 1)
        m_new = tl.maximum(m_i, tm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: 2^-inf = 0, not NaN
        r = tl.exp2(tm - m_safe)  # p'_ij = e_ij * r_i
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + ssum * r
        p = e * r[:, None]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, H, G, T, W, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(T, BM), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_ok = offs_m < T
    q = tl.load(Q + bh64 * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    qg = offs_m // W
    k_base = K + bkv * T * D
    v_base = V + bkv * T * DV
    # groups before the tile's first row are earlier for every row: no mask; then up to the last row's group
    g_full = (pid_m * BM) // W
    g_end = (tl.minimum(T, pid_m * BM + BM) - 1) // W + 1

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    acc, l_i, m_i = _fwd_groups(acc, l_i, m_i, q, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, 0, g_full,
                                offs_j, offs_d, offs_dv, D, DV, BN, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_groups(acc, l_i, m_i, q, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, g_full, g_end,
                                offs_j, offs_d, offs_dv, D, DV, BN, True, PREC, UPCAST)
    # every real row sees at least one regular key (itself, or its group's for a landmark row)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(O + bh64 * T * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh64 * T + offs_m, lse, mask=m_ok)


@triton.jit
def _dq_groups(dq, q, do, l2, dl, qp, qg, m_ok, k_base, v_base, T, W, qk_scale, start, end, offs_j, offs_d,
               offs_dv, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ (unscaled) of one query block from key groups start..end-1."""
    for c in range(start, end):
        k, v, kl, kp = _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D, DV, BN)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # (BM, BN)
        sl = _landmark_scores(q, kl, qk_scale)
        earlier = qg > c
        if MASK:
            own = qg == c
            ok = (earlier[:, None] | (own[:, None] & (kp[None, :] <= qp[:, None]))) & (kp[None, :] < T) \
                & m_ok[:, None]
            s = tl.where(ok, s, float("-inf"))
        e, ssum, tm = _group_stats(s, earlier, sl, 1)
        p = e * tl.exp2(tm - l2)[:, None]  # P' (rows past T: l2 = +inf, p = 0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)  # (BM, BN)
        dsp = p * (dp - dl[:, None])  # dS'
        tot = tl.sum(dsp, 1)
        tot_e = tl.where(earlier, tot, 0.0)  # dS_i,L of the group's landmark
        ds = dsp - e * (tot_e / ssum)[:, None]
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST) + tot_e[:, None] * kl.to(tl.float32)[None, :]
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, qk_scale, scale, H, G, T, W, D: tl.constexpr,
                   DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(T, BM), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_ok = offs_m < T
    q = tl.load(Q + bh64 * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + bh64 * T * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
    l2 = tl.load(LSE2 + bh64 * T + offs_m, mask=m_ok, other=float("inf"))
    dl = tl.load(DELTA + bh64 * T + offs_m, mask=m_ok, other=0.0)
    qg = offs_m // W
    k_base = K + bkv * T * D
    v_base = V + bkv * T * DV
    g_full = (pid_m * BM) // W
    g_end = (tl.minimum(T, pid_m * BM + BM) - 1) // W + 1

    dq = tl.zeros([BM, D], tl.float32)
    dq = _dq_groups(dq, q, do, l2, dl, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, 0, g_full, offs_j, offs_d,
                    offs_dv, D, DV, BN, False, PREC, UPCAST)
    dq = _dq_groups(dq, q, do, l2, dl, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, g_full, g_end, offs_j,
                    offs_d, offs_dv, D, DV, BN, True, PREC, UPCAST)
    dq = dq * scale  # dS carries the softmax scale once
    tl.store(DQ + bh64 * T * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _dkdv_blocks(dk, dv, dkl, k, v, kl, kp, c, q_base, do_base, row_base, LSE2, DELTA, T, W, qk_scale, start, end,
                 offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of group c's regular keys and dK of its landmark (dkl) from query blocks start..end-1
    of one query head; transposed tiles (keys as rows), so per-query sums run over axis 0.
    MASK False: every row of the block before T is in a later group."""
    for qb in range(start, end):
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)  # (BM, D)
        do = tl.load(do_base + offs_m[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None], other=0.0)  # (BM, DV)
        l2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=float("inf"))
        dl = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        qg = offs_m // W
        later = qg > c  # the group is earlier than the query's own
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale  # (BN, BM)
        sl = _landmark_scores(q, kl, qk_scale)  # (BM,)
        if MASK:
            own = qg == c
            ok = (later[None, :] | (own[None, :] & (kp[:, None] <= offs_m[None, :]))) & m_ok[None, :] \
                & (kp[:, None] < T)
            st = tl.where(ok, st, float("-inf"))
        e, ssum, tm = _group_stats(st, later, sl, 0)
        pt = e * tl.exp2(tm - l2)[None, :]  # P' transposed
        dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)  # (BN, DV)
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)  # (BN, BM)
        dst = pt * (dpt - dl[None, :])
        tot = tl.where(later, tl.sum(dst, 0), 0.0)  # dS_i,L per query
        dst = dst - e * (tot / ssum)[None, :]
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)  # (BN, D)
        dkl += tl.sum(tot[:, None] * q.to(tl.float32), 0)  # (D,)
    return dk, dv, dkl


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV_, qk_scale, scale, H, G, T, W, D: tl.constexpr,
                     DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    """One program: one key group (BN = block regular keys + landmark) of one (batch, kv head),
    summed over its G query heads. Grid (cdiv(T, W), B * Hkv)."""
    c = tl.program_id(0)
    bkv = tl.program_id(1)
    Hkv = H // G
    b = bkv // Hkv
    hk = bkv % Hkv
    bkv64 = bkv.to(tl.int64)
    offs_j = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k, v, kl, kp = _load_group(K + bkv64 * T * D, V + bkv64 * T * DV, c, T, W, offs_j, offs_d, offs_dv, D, DV, BN)
    # query rows from c * W on see the group; blocks whose rows all lie in later groups need no mask
    # (rows past T in the last block are inert: lse2 = +inf there gives p' = 0, Delta = 0)
    n_qb = tl.cdiv(T, BM)
    lo = (c * W) // BM
    flo = tl.minimum(tl.cdiv((c + 1) * W, BM), n_qb)

    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    dkl = tl.zeros([D], tl.float32)
    for g in range(G):
        bh64 = (b * H + hk * G + g).to(tl.int64)
        q_base = Q + bh64 * T * D
        do_base = DO + bh64 * T * DV
        row_base = bh64 * T
        dk, dv, dkl = _dkdv_blocks(dk, dv, dkl, k, v, kl, kp, c, q_base, do_base, row_base, LSE2, DELTA, T, W,
                                   qk_scale, lo, flo, offs_d, offs_dv, D, DV, BM, True, PREC, UPCAST)
        dk, dv, dkl = _dkdv_blocks(dk, dv, dkl, k, v, kl, kp, c, q_base, do_base, row_base, LSE2, DELTA, T, W,
                                   qk_scale, flo, n_qb, offs_d, offs_dv, D, DV, BM, False, PREC, UPCAST)
    k_ok = kp < T
    dk_base = DK + bkv64 * T * D
    dv_base = DV_ + bkv64 * T * DV
    tl.store(dk_base + kp[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(dv_base + kp[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=k_ok[:, None])
    lp = c * W + BN
    tl.store(dk_base + lp * D + offs_d, (dkl * scale).to(DK.dtype.element_ty), mask=(lp + 0 * offs_d) < T)
    tl.store(dv_base + lp * DV + offs_dv, tl.zeros([DV], tl.float32).to(DV_.dtype.element_ty),
             mask=(lp + 0 * offs_dv) < T)  # landmarks carry no value


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandmarkConfig:
    """Query rows per tile (bm) and warps / stages of each kernel; the key tile is always `block`."""
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles


def pick_config(block: int, head_dim: int, dtype: torch.dtype) -> LandmarkConfig:
    """Untuned starting point, sized like flash_triton's H100 tiles for the same score-tile area:
    flash fwd 128 x 64, dK/dV 32 x 64, dQ 128 x 32 (bf16, d=128). The dQ tile here is 64 x block
    (the key tile cannot shrink below a group). Larger blocks halve the query rows; fp32 halves
    them again (it exists for accuracy checks). `bn` records the key tile (= block)."""
    big = block > 64
    if dtype == torch.float32:
        return LandmarkConfig(Tiles(32 if big else 64, block, 4, 2), Tiles(16, block, 4, 2),
                              Tiles(32, block, 4, 2))
    warps = 8 if head_dim > 64 else 4
    return LandmarkConfig(Tiles(64 if big else 128, block, warps, 3), Tiles(16 if big else 32, block, 4, 3),
                          Tiles(32 if big else 64, block, 4, 3))


# ------------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------------
def check_supported(q: Tensor, k: Tensor, v: Tensor, block: int) -> None:
    """ValueError unless the Triton landmark kernel can take these inputs (dtype, block, head dims,
    device)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton landmark kernel; use float16, "
                         f"bfloat16 or float32 (backend='torch' takes float64)")
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(f"block={block} is not supported by the Triton landmark kernel (a group's regular keys "
                         f"are one power-of-two tile); supported: {', '.join(map(str, SUPPORTED_BLOCKS))} "
                         f"(backend='torch' takes any)")
    for name, d in (("q, k head dim D", q.shape[-1]), ("v head dim Dv", v.shape[-1])):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{name}={d} is not supported by the Triton landmark kernel; supported: "
                             f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))} (backend='torch' takes any)")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"q: tensors on {q.device} need TRITON_INTERPRET=1 for the Triton landmark kernel "
                         f"(set before triton is imported); use CUDA tensors or backend='torch'")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")


def _flags(q: Tensor) -> dict:
    return dict(PREC="ieee" if q.dtype == torch.float32 else None,
                UPCAST=q.dtype == torch.bfloat16 and _interpreting())


def landmark_fwd_triton(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float,
                        config: Optional[LandmarkConfig] = None) -> Tuple[Tensor, Tensor]:
    """q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv), positions 0..T-1 in groups of
    block + 1. Returns o (B, H, T, Dv) in q's dtype and lse (B, H, T) fp32 of the modified scores."""
    check_supported(q, k, v, block)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    o = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if T == 0 or B * H == 0:
        return o, lse
    c = (config or pick_config(block, max(D, Dv), q.dtype)).fwd
    _fwd_kernel[(triton.cdiv(T, c.bm), B * H)](
        q, k, v, o, lse, float(scale) * _LOG2E, H, H // Hkv, T, block + 1,
        D=D, DV=Dv, BM=c.bm, BN=block, **_flags(q), num_warps=c.warps, num_stages=c.stages)
    return o, lse


def landmark_bwd_triton(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block: int,
                        scale: float, config: Optional[LandmarkConfig] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes. do, o (B, H, T, Dv); lse (B, H, T) from
    `landmark_fwd_triton`."""
    check_supported(q, k, v, block)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    if T == 0 or B * H == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # every row is written
    cfg = config or pick_config(block, max(D, Dv), q.dtype)
    do = do.to(q.dtype).contiguous()
    o = o.contiguous()
    lse = lse.float().contiguous()
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    # Delta = rowsum(dO * O) and lse in base 2: the same preprocessing as flash attention
    _bwd_pre_kernel[(triton.cdiv(T, 64), B * H)](o, do, lse, lse, delta, lse2, T, DV=Dv, BM=64, HAS_DLSE=False,
                                                 num_warps=4)
    qk_scale, W, flags = float(scale) * _LOG2E, block + 1, _flags(q)
    c = cfg.dkdv
    _bwd_dkdv_kernel[(triton.cdiv(T, W), B * Hkv)](
        q, k, v, do, lse2, delta, dk, dv, qk_scale, float(scale), H, G, T, W,
        D=D, DV=Dv, BM=c.bm, BN=block, **flags, num_warps=c.warps, num_stages=c.stages)
    c = cfg.dq
    _bwd_dq_kernel[(triton.cdiv(T, c.bm), B * H)](
        q, k, v, do, lse2, delta, dq, qk_scale, float(scale), H, G, T, W,
        D=D, DV=Dv, BM=c.bm, BN=block, **flags, num_warps=c.warps, num_stages=c.stages)
    return dq, dk, dv
