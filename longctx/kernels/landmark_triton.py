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
row's visible keys (base_i: their max) and sum_i = sum_j e_ij. Then p'_ij = 2^(s'_ij - m) = e_ij * r_i
with r_i = 2^(s_i,L - m) / sum_i in an earlier group and 2^(base_i - m) in the row's own group, m
the running max (forward; taken over s_i,L and base_i, so at most log2(block) above the largest
modified score) or the row's final lse (backward). Scores are in base-2 units (scale * log2(e)).

Every score tile has the queries as rows, so every per-query, per-group sum (the max, sum_i, and
the backward's sum_j p'_ij dP_ij) is a row reduction: shuffles within 4 lanes, no shared memory.
The landmark scores s_i,L come from the matrix units: in the forward and dQ kernels one
(BM, D) x (D, LC) product per LC groups (LC = 16 by default: under 1% of the tiles' dot work at
block 64), a column picked per group; in the dK/dV kernel a (BM, D) x (D, 16) product per query
block whose first column is the group's landmark (with the landmark's dK, 12% more dot work).

Backward, with P', w_i = sum_j P'_ij (the landmark's weight) and mu_i = sum_j P'_ij dP_ij / w_i:
in an earlier group dS_ij = P'_ij (dP_ij - mu_i) and dS_i,L = w_i (mu_i - Delta_i) (the same as
dS' - softmax_c * sum_j dS'_ij with dS' = P' (dP - Delta), folded into one row constant); in the
row's own group dS = P' (dP - Delta). dV of landmarks is 0; dK of a landmark is
scale * sum_i dS_i,L q_i. Two kernels, as in flash_triton (no atomics, fp32 accumulation):
 - dK/dV over key groups (one group per program, looping over query blocks and the G query heads
   of its kv head). The tiles keep the queries as rows, so P' and dS enter dV and dK transposed:
   the accumulators are dV^T += dO^T P', dK^T += Q^T dS (D x block, written transposed) and the
   landmark's dK += Q^T dS_L, dS_i,L the first row of a (16, BM) tile that enters transposed (a
   (BM, 16) register operand made Triton 3.6's sm_90 code fault: see _dkdv_blocks).
 - dQ over query blocks, looping over groups: dQ += dS K per group, and the landmarks' dS_i,L
   (one column per group of an LC chunk) reach dQ through one (BM, LC) x (LC, D) product per chunk.
The earlier kernel put keys as rows in the dK/dV kernel (as flash does), which made those
per-query sums column sums across warps (three shared-memory reductions per tile) and computed
the landmark score and the landmark's dK as fp32 row products on the CUDA cores; its inner loop
issued about five times flash's instructions per multiply-add, and its backward took ~6x its
forward on an H100.

Precision as in `flash_triton.py`: fp32 inputs use IEEE dots (matches the torch path to ~1e-6),
fp16 / bf16 feed the matrix units in the input dtype with fp32 accumulation (p', dS and, here,
dS_i,L are rounded to it before their products).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
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
def _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr):
    """Group c's regular keys k (BN, D), values v (BN, DV) (zeros past T) and their positions kp (BN,)."""
    kp = c * W + offs_j
    k_ok = kp < T
    k = tl.load(k_base + kp[:, None] * D + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(v_base + kp[:, None] * DV + offs_dv[None, :], mask=k_ok[:, None], other=0.0)
    return k, v, kp


@triton.jit
def _landmark_keys(k_base, c0, T, W, offs_t, offs_d, D: tl.constexpr, BN: tl.constexpr):
    """Landmark keys of groups c0 .. c0 + LC - 1 as the rows of an (LC, D) tile (zeros past T)."""
    lp = (c0 + offs_t) * W + BN
    return tl.load(k_base + lp[:, None] * D + offs_d[None, :], mask=(lp < T)[:, None], other=0.0)


@triton.jit
def _column(x, offs_t, t):
    """Column t of x (BM, LC) as a (BM,) vector."""
    return tl.sum(tl.where(offs_t[None, :] == t, x, 0.0), 1)


@triton.jit
def _group_tile(s, qp, qg, m_ok, kp, c, T, qk_scale, MASK: tl.constexpr):
    """One group's regular keys as seen by each query row. s (BM, BN): raw scores q . k. Every key
    of an earlier group is visible, the causal part of the row's own group, nothing else; MASK
    False: every row is in a later group, nothing to mask. Returns e = 2^(s' - base) in base-2
    units (0 where invisible), base (the row's largest visible score, -inf when none), its sum
    (clamped to 1 when nothing is visible, so e / sum stays finite) and `earlier` (the group is
    earlier than the row's own; all true when MASK is False)."""
    if MASK:
        earlier = qg > c
        own = qg == c
        ok = (earlier[:, None] | (own[:, None] & (kp[None, :] <= qp[:, None]))) & (kp[None, :] < T) \
            & m_ok[:, None]
        s = tl.where(ok, s, float("-inf"))
    else:
        earlier = m_ok | True
    base = tl.max(s, 1) * qk_scale
    base_s = tl.where(base == float("-inf"), 0.0, base)
    e = tl.exp2(s * qk_scale - base_s[:, None])
    ssum = tl.sum(e, 1)
    if MASK:
        ssum = tl.where(ssum == 0.0, 1.0, ssum)
    return e, base, ssum, earlier


@triton.jit
def _fwd_groups(acc, l_i, m_i, q, qp, qg, m_ok, k_base, v_base, T, W, qk_scale, start, end, offs_j, offs_d,
                offs_dv, offs_t, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, LC: tl.constexpr,
                MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over the modified scores of key groups start..end-1, LC groups at a time:
    one (BM, LC) product gives the landmark scores of the LC groups."""
    for c0 in range(start, end, LC):
        kl = _landmark_keys(k_base, c0, T, W, offs_t, offs_d, D, BN)
        slc = _dot(q, tl.trans(kl), PREC, UPCAST) * qk_scale  # (BM, LC)
        for c in range(c0, tl.minimum(c0 + LC, end)):
            k, v, kp = _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D, DV)
            s = _dot(q, tl.trans(k), PREC, UPCAST)  # (BM, BN)
            e, base, ssum, earlier = _group_tile(s, qp, qg, m_ok, kp, c, T, qk_scale, MASK)
            # p'_ij = e_ij * 2^(top_i - m) / den_i: top is the landmark score s_L in an earlier group
            # (the modified scores there are s - base + s_L - log2(sum), the largest s_L - log2(sum)
            # with sum in [1, BN]) and the largest score in the row's own group (den 1). The running
            # max m is taken over top: at most log2(BN) above the largest modified score, so p' <= 1.
            top = tl.where(earlier, _column(slc, offs_t, c - c0), base)
            m_new = tl.maximum(m_i, top)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: 2^-inf = 0, not NaN
            w = tl.exp2(top - m_safe)  # the tile's weight sum_j p'_ij
            r = w / tl.where(earlier, ssum, 1.0)  # p'_ij = e_ij * r_i
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.where(earlier, w, ssum * r)
            p = e * r[:, None]
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, H, G, T, W, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, LC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(T, BM), B * H); the last
    query block (the most groups) first, so that the short ones fill the end of the launch."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_t = tl.arange(0, LC)
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
                                offs_j, offs_d, offs_dv, offs_t, D, DV, BN, LC, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_groups(acc, l_i, m_i, q, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, g_full, g_end,
                                offs_j, offs_d, offs_dv, offs_t, D, DV, BN, LC, True, PREC, UPCAST)
    # every real row sees at least one regular key (itself, or its group's for a landmark row)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(O + bh64 * T * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh64 * T + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_tile(q, do, l2, dl, k, v, sl, qp, qg, m_ok, kp, c, T, qk_scale, MASK: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """One group tile of the backward, queries as rows: P' and dS of the regular keys (BM, BN)
    and tot (BM,), the dS of the group's landmark (0 for rows not in a later group).

    With w_i = sum_j P'_ij (the landmark's weight) and mu_i = sum_j P'_ij dP_ij / w_i (dP averaged
    by the within-group softmax), the group correction folds into the row constant:
    dS_ij = P'_ij (dP_ij - mu_i) and dS_i,L = sum_j P'_ij (dP_ij - Delta_i) = w_i (mu_i - Delta_i)
    in an earlier group; dS_ij = P'_ij (dP_ij - Delta_i) in the row's own group."""
    s = _dot(q, tl.trans(k), PREC, UPCAST)  # (BM, BN)
    e, base, ssum, earlier = _group_tile(s, qp, qg, m_ok, kp, c, T, qk_scale, MASK)
    # P' = e * r: r = 2^(s_L - lse) / sum in an earlier group (s_L - lse <= log2(sum) <= log2(BN):
    # no overflow), 2^(base - lse) in the row's own group; rows past T: lse = +inf, r = 0
    r = tl.exp2(tl.where(earlier, sl, base) - l2) / tl.where(earlier, ssum, 1.0)
    p = e * r[:, None]  # P'
    dp = _dot(do, tl.trans(v), PREC, UPCAST)  # (BM, BN)
    pdp = p * dp
    w = ssum * r
    spdp = tl.sum(pdp, 1)
    mu = tl.where(earlier & (w > 0.0), spdp / tl.where(w > 0.0, w, 1.0), dl)
    tot = tl.where(earlier, spdp - dl * w, 0.0)
    ds = pdp - p * mu[:, None]
    return p, ds, tot


@triton.jit
def _dq_groups(dq, q, do, l2, dl, qp, qg, m_ok, k_base, v_base, T, W, qk_scale, start, end, offs_j, offs_d,
               offs_dv, offs_t, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               LC: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ (unscaled) of one query block from key groups start..end-1, LC groups at a time: one
    (BM, LC) product gives their landmark scores, and the landmarks' dS (one column per group)
    reach dQ through one (BM, LC) x (LC, D) product."""
    for c0 in range(start, end, LC):
        kl = _landmark_keys(k_base, c0, T, W, offs_t, offs_d, D, BN)  # (LC, D)
        slc = _dot(q, tl.trans(kl), PREC, UPCAST) * qk_scale  # (BM, LC)
        totc = tl.zeros([BM, LC], tl.float32)
        for c in range(c0, tl.minimum(c0 + LC, end)):
            k, v, kp = _load_group(k_base, v_base, c, T, W, offs_j, offs_d, offs_dv, D, DV)
            p, ds, tot = _bwd_tile(q, do, l2, dl, k, v, _column(slc, offs_t, c - c0), qp, qg, m_ok, kp, c, T,
                                   qk_scale, MASK, PREC, UPCAST)
            dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
            totc += tl.where(offs_t[None, :] == c - c0, tot[:, None], 0.0)
        dq += _dot(totc.to(kl.dtype), kl, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, qk_scale, scale, H, G, T, W, D: tl.constexpr,
                   DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LC: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(T, BM), B * H); the last
    query block (the most groups) first, so that the short ones fill the end of the launch."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_t = tl.arange(0, LC)
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
                    offs_dv, offs_t, D, DV, BM, BN, LC, False, PREC, UPCAST)
    dq = _dq_groups(dq, q, do, l2, dl, offs_m, qg, m_ok, k_base, v_base, T, W, qk_scale, g_full, g_end, offs_j,
                    offs_d, offs_dv, offs_t, D, DV, BM, BN, LC, True, PREC, UPCAST)
    dq = dq * scale  # dS carries the softmax scale once
    tl.store(DQ + bh64 * T * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _dkdv_blocks(dkt, dvt, dklt, k, v, klt, kp, c, q_base, do_base, row_base, LSE2, DELTA, T, W, qk_scale, start,
                 end, offs_d, offs_dv, offs_t, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                 MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of group c's regular keys and dK of its landmark from query blocks start..end-1 of
    one query head, accumulated transposed: dkt (D, BN), dvt (DV, BN), dklt (D, LC) (column 0).
    Queries are the rows of every score tile, so the per-query sums over the group are row
    reductions, as in the dQ kernel. klt: the landmark key as row 0 of an (LC, D) tile, zeros
    below, so that its scores and its dK are small products on the matrix units. MASK False:
    every row before T is in a later group."""
    for qb in range(start, end):
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)  # (BM, D)
        do = tl.load(do_base + offs_m[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None], other=0.0)  # (BM, DV)
        l2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=float("inf"))
        dl = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        qg = offs_m // W
        sl = _column(_dot(q, tl.trans(klt), PREC, UPCAST), offs_t, 0) * qk_scale
        p, ds, tot = _bwd_tile(q, do, l2, dl, k, v, sl, offs_m, qg, m_ok, kp, c, T, qk_scale, MASK, PREC, UPCAST)
        dvt += _dot(tl.trans(do), p.to(do.dtype), PREC, UPCAST)  # (DV, BN)
        dkt += _dot(tl.trans(q), ds.to(q.dtype), PREC, UPCAST)  # (D, BN)
        # the landmark's dK^T += Q^T dS_L, dS_L as row 0 of an (LC, BM) tile and transposed into the
        # product, so that the matrix units read it K-major with the 128-byte swizzle (as klt). Not
        # as a (BM, LC) tile: Triton 3.6 lays that register operand out N-major with a 32-byte
        # swizzle, and the sm_90 wgmma then faults ("illegal memory access" on an H100 at bf16
        # T=16K MHA with 128-row tiles, and at T=4K GQA with 64 rows / 4 warps) although every
        # global load and store is in bounds (test_guard_regions_untouched_every_candidate)
        tot_r = tl.where(offs_t[:, None] == 0, tot[None, :], 0.0)  # (LC, BM)
        dklt += _dot(tl.trans(q), tl.trans(tot_r.to(q.dtype)), PREC, UPCAST)  # (D, LC)
    return dkt, dvt, dklt


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV_, qk_scale, scale, H, G, T, W, D: tl.constexpr,
                     DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LC: tl.constexpr, PREC: tl.constexpr,
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
    offs_t = tl.arange(0, LC)
    k_base = K + bkv64 * T * D
    k, v, kp = _load_group(k_base, V + bkv64 * T * DV, c, T, W, offs_j, offs_d, offs_dv, D, DV)
    lp = c * W + BN
    # (LC, D): the landmark key, then zeros ((lp + 0 * offs_t) < T: the interpreter rejects a scalar
    # bool broadcast into a vector mask)
    klt = tl.load(k_base + lp * D + offs_t[:, None] * 0 + offs_d[None, :],
                  mask=((offs_t == 0) & ((lp + 0 * offs_t) < T))[:, None], other=0.0)
    # query rows from c * W on see the group; blocks whose rows all lie in later groups need no mask
    # (rows past T in the last block are inert: lse2 = +inf there gives p' = 0, Delta = 0)
    n_qb = tl.cdiv(T, BM)
    lo = (c * W) // BM
    flo = tl.minimum(tl.cdiv((c + 1) * W, BM), n_qb)

    dkt = tl.zeros([D, BN], tl.float32)
    dvt = tl.zeros([DV, BN], tl.float32)
    dklt = tl.zeros([D, LC], tl.float32)
    for g in range(G):
        bh64 = (b * H + hk * G + g).to(tl.int64)
        q_base = Q + bh64 * T * D
        do_base = DO + bh64 * T * DV
        row_base = bh64 * T
        dkt, dvt, dklt = _dkdv_blocks(dkt, dvt, dklt, k, v, klt, kp, c, q_base, do_base, row_base, LSE2, DELTA, T,
                                      W, qk_scale, lo, flo, offs_d, offs_dv, offs_t, D, DV, BM, True, PREC, UPCAST)
        dkt, dvt, dklt = _dkdv_blocks(dkt, dvt, dklt, k, v, klt, kp, c, q_base, do_base, row_base, LSE2, DELTA, T,
                                      W, qk_scale, flo, n_qb, offs_d, offs_dv, offs_t, D, DV, BM, False, PREC, UPCAST)
    kpt = c * W + tl.arange(0, BN)[None, :]  # (1, BN): the keys as columns
    k_ok = kpt < T
    dk_base = DK + bkv64 * T * D
    dv_base = DV_ + bkv64 * T * DV
    tl.store(dk_base + kpt * D + offs_d[:, None], (dkt * scale).to(DK.dtype.element_ty), mask=k_ok)
    tl.store(dv_base + kpt * DV + offs_dv[:, None], dvt.to(DV_.dtype.element_ty), mask=k_ok)
    dkl = tl.sum(dklt, 1)  # columns 1.. are zero
    tl.store(dk_base + lp * D + offs_d, (dkl * scale).to(DK.dtype.element_ty), mask=(lp + 0 * offs_d) < T)
    tl.store(dv_base + lp * DV + offs_dv, tl.zeros([DV], tl.float32).to(DV_.dtype.element_ty),
             mask=(lp + 0 * offs_dv) < T)  # landmarks carry no value


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandmarkConfig:
    """Query rows per tile (bm) and warps / stages of each kernel (the key tile is always `block`;
    `bn` is not read), and lc: landmark keys per (BM, lc) product in the forward and dQ kernels."""
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles
    lc: int = 16


_T3, _T2 = Tiles(128, 0, 8, 3), Tiles(128, 0, 8, 2)
# fp16 / bf16 launch shapes for block <= 64 that a GPU sweep chooses among (benchmarks/gpu_check.py
# --only landmarksweep); LONGCTX_LANDMARK_CFG=<name> makes pick_config return one. Each differs from
# "default" in one respect. Checked offline for sm_90 with Triton 3.6 (the lent H100's) and 3.9
# (triton.compile to SASS; d=128, block 64, bf16): all fit the 227 KiB of shared memory in both.
# 128-row tiles need 8 warps (8 warps over 64 rows duplicate the work); the dK/dV kernel's 3-stage
# 128-row version needs 246 KiB under Triton 3.6, hence 2 stages (181 KiB). dK/dV 64 rows / 4 warps
# (109 KiB, two programs per SM) spills some registers under 3.6 and many under 3.9.
CANDIDATES = {
    "default": LandmarkConfig(_T3, _T2, _T3),
    "dkdv64w4": LandmarkConfig(_T3, Tiles(64, 0, 4, 2), _T3),
    "rows64w4": LandmarkConfig(Tiles(64, 0, 4, 3), _T2, Tiles(64, 0, 4, 3)),  # fwd, dQ: 2 programs per SM
    "rows-s2": LandmarkConfig(_T2, _T2, _T2),
    "lc32": LandmarkConfig(_T3, _T2, _T3, lc=32),  # half the landmark products, a wider column pick
}
CONFIG_ENV = "LONGCTX_LANDMARK_CFG"


def pick_config(block: int, head_dim: int, dtype: torch.dtype) -> LandmarkConfig:
    """Launch shapes by block and dtype (head dims up to 128 share them; d <= 64 is not tuned).

    fp16 / bf16, block <= 64: 128-query tiles and 8 warps for all three kernels, 3 stages (2 for
    dK/dV) (see CANDIDATES; the environment variable LONGCTX_LANDMARK_CFG names another candidate).
    Block 128: two stages and 64-row forward and dK/dV tiles, else the shared memory overflows (not
    tuned; its dK/dV and dQ kernels spill). fp32 (accuracy checks, not speed: its dots run as fp32
    FMAs) uses small tiles and takes only lc from a named candidate."""
    name = os.environ.get(CONFIG_ENV, "")
    if name and name not in CANDIDATES:
        raise ValueError(f"{CONFIG_ENV}={name!r}: unknown landmark kernel config; known: {', '.join(CANDIDATES)}")
    cand = CANDIDATES[name or "default"]
    big = block > 64
    if dtype == torch.float32:
        cfg = LandmarkConfig(Tiles(32 if big else 64, 0, 4, 2), Tiles(16 if big else 32, 0, 4, 2),
                             Tiles(32, 0, 4, 2), cand.lc)
    elif big:
        cfg = LandmarkConfig(Tiles(64, 0, 8, 2), Tiles(64, 0, 8, 2), Tiles(128, 0, 8, 2), cand.lc)
    else:
        cfg = cand
    return LandmarkConfig(*(replace(t, bn=block) for t in (cfg.fwd, cfg.dkdv, cfg.dq)), cfg.lc)


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
    cfg = config or pick_config(block, max(D, Dv), q.dtype)
    c = cfg.fwd
    _fwd_kernel[(triton.cdiv(T, c.bm), B * H)](
        q, k, v, o, lse, float(scale) * _LOG2E, H, H // Hkv, T, block + 1,
        D=D, DV=Dv, BM=c.bm, BN=block, LC=cfg.lc, **_flags(q), num_warps=c.warps, num_stages=c.stages)
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
        D=D, DV=Dv, BM=c.bm, BN=block, LC=16, **flags, num_warps=c.warps, num_stages=c.stages)  # 16: smallest dot
    c = cfg.dq
    _bwd_dq_kernel[(triton.cdiv(T, c.bm), B * H)](
        q, k, v, do, lse2, delta, dq, qk_scale, float(scale), H, G, T, W,
        D=D, DV=Dv, BM=c.bm, BN=block, LC=cfg.lc, **flags, num_warps=c.warps, num_stages=c.stages)
    return dq, dk, dv
