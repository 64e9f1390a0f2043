"""Fused Triton flash attention with log-sum-exp, forward and backward (FlashAttention-2 tiling).

Same function as `flash_torch.py` (the specification):

    o_i = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j,    lse_i = log sum_j exp(scale * q_i . k_j + mask_ij)

q (B, H, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv); query head h reads kv head h // (H // Hkv)
by index (K/V are never repeated). Masks come from global int64 positions q_pos (Tq,), k_pos (Tk,)
and optional document ids q_doc (B, Tq), k_doc (B, Tk), loaded tile by tile in the kernels, so any
position arrays work (ring-attention shards, zigzag chunks, keys after the queries).

Tile skipping. Before a launch, torch classifies every (row block, column block) tile from the
blocks' position / document min and max: invisible (no pair can be allowed), full (every pair is
allowed: no mask needed) or partial. Each row block gets four bounds [lo, flo, fhi, hi]: every
visible tile lies in lo..hi-1, and flo..fhi-1 is a run of full tiles. A program walks
lo..flo-1 and fhi..hi-1 with the element mask and flo..fhi-1 without it, three branch-free
loops that the compiler can pipeline. Invisible tiles inside lo..hi-1 (gaps of a zigzag layout)
are still computed, masked, which is correct and only costs time; contiguous increasing
positions (the common case) have no such gaps. The classification runs on the device (no host
sync) and costs O(row blocks x column blocks) booleans, chunked to bound memory.

Rows that see no key get o = 0 and lse = -inf: the running max is replaced by 0 while it is
-inf (no exp(-inf - -inf) = NaN). The backward masks their p to 0 like any other disallowed
pair, and also reads their lse as +inf (p = 0 before the mask; rows past the end read +inf too).

Backward: a preprocess kernel forms Dterm_i = rowsum(dO_i * O_i) - dlse_i and lse in base 2; a
kernel over key blocks accumulates dK, dV in fp32 registers, looping inside the program over
the G query heads that share the kv head (deterministic, no atomics, no G-times-larger buffer);
a separate kernel over query blocks accumulates dQ.

Precision: fp32 inputs use IEEE fp32 dots (input_precision="ieee"), so they match the torch path
to ~1e-6; fp16 / bf16 feed the matrix units in the input dtype (p and dS are rounded to it
before their products, as in every flash kernel) with fp32 accumulation.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
__all__ = ["FlashConfig", "pick_config", "flash_fwd_triton", "flash_bwd_triton", "SUPPORTED_HEAD_DIMS",
           "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_TILE_FLAGS = 1 << 24  # booleans per chunk of the tile classification


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around the Triton interpreter's bf16 tl.dot, which multiplies the raw uint16
    # bit patterns (numpy has no bf16); it is only set under TRITON_INTERPRET=1.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _allowed(qp, kp, qd, kd, inb, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_DOC: tl.constexpr):
    """Allowed-mask of a tile. qp, qd broadcast along the key axis and kp, kd along the query
    axis (either orientation: (BM, 1) x (1, BN) or (1, BM) x (BN, 1)); inb: in-bounds mask."""
    ok = inb
    if CAUSAL:
        ok = ok & (kp <= qp)
    if HAS_WINDOW:
        ok = ok & ((qp - kp) < window)
        if not CAUSAL:
            ok = ok & ((kp - qp) < window)
    if HAS_DOC:
        ok = ok & (qd == kd)
    return ok


@triton.jit
def _load_bounds(BOUNDS, b, row, bounds_bstride):
    ptr = BOUNDS + b * bounds_bstride + row * 4
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale, start, end,
                offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    """Online softmax over key blocks start..end-1 of one query block (scores in base-2 units)."""
    for kb in range(start, end):
        offs_n = kb * BN + tl.arange(0, BN)
        n_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)  # (BN, D)
        v = tl.load(v_base + offs_n[:, None] * DV + offs_dv[None, :], mask=n_ok[:, None], other=0.0)  # (BN, DV)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # (BM, BN)
        if MASK:
            kp = tl.load(KPOS + offs_n, mask=n_ok, other=0)
            kd = kp
            if HAS_DOC:
                kd = tl.load(kdoc_base + offs_n, mask=n_ok, other=-1)
            ok = _allowed(qp[:, None], kp[None, :], qd[:, None], kd[None, :], n_ok[None, :], window,
                          CAUSAL, HAS_WINDOW, HAS_DOC)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf) = 0, not NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QPOS, KPOS, QDOC, KDOC, BOUNDS,
                qk_scale, window, H, G, Tq, Tk, bounds_bstride,
                D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(Tq, BM), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_ok = offs_m < Tq
    q = tl.load(Q + bh64 * Tq * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    qp = tl.load(QPOS + offs_m, mask=m_ok, other=0)
    qd = qp
    if HAS_DOC:
        qd = tl.load(QDOC + b.to(tl.int64) * Tq + offs_m, mask=m_ok, other=-1)
    k_base = K + bkv * Tk * D
    v_base = V + bkv * Tk * DV
    kdoc_base = KDOC + b.to(tl.int64) * Tk
    lo, flo, fhi, hi = _load_bounds(BOUNDS, b, pid_m, bounds_bstride)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale,
                                lo, flo, offs_d, offs_dv, D, DV, BN, True, CAUSAL, HAS_WINDOW, HAS_DOC, PREC, UPCAST)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale,
                                flo, fhi, offs_d, offs_dv, D, DV, BN, False, CAUSAL, HAS_WINDOW, HAS_DOC, PREC,
                                UPCAST)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale,
                                fhi, hi, offs_d, offs_dv, D, DV, BN, True, CAUSAL, HAS_WINDOW, HAS_DOC, PREC, UPCAST)

    empty = l_i == 0.0  # the row saw no key: o = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + bh64 * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh64 * Tq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_pre_kernel(O, DO, LSE, DLSE, DELTA, LSE2, Tq, DV: tl.constexpr, BM: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    """Dterm = rowsum(dO * O) - dlse and lse in base 2 (+inf for rows that saw no key, so p = 0).
    Grid (cdiv(Tq, BM), B * H)."""
    pid_m = tl.program_id(0)
    bh64 = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_dv = tl.arange(0, DV)
    m_ok = offs_m < Tq
    ptrs = bh64 * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    o = tl.load(O + ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh64 * Tq + offs_m, mask=m_ok, other=0.0)
    lse = tl.load(LSE + bh64 * Tq + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + bh64 * Tq + offs_m, delta, mask=m_ok)
    tl.store(LSE2 + bh64 * Tq + offs_m, lse2, mask=m_ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, kp, kd, q_base, do_base, row_base, LSE2, DELTA, QPOS, qdoc_base, Tq, window,
                 qk_scale, start, end, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of one key block from query blocks start..end-1 of one query head, transposed
    (keys as rows) so that no tile needs transposing for the accumulating products."""
    for qb in range(start, end):
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < Tq
        q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)  # (BM, D)
        do = tl.load(do_base + offs_m[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None], other=0.0)  # (BM, DV)
        l2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=float("inf"))  # rows past Tq: p = 0
        dl = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale  # (BN, BM)
        pt = tl.exp2(st - l2[None, :])
        if MASK:
            qp = tl.load(QPOS + offs_m, mask=m_ok, other=0)
            qd = qp
            if HAS_DOC:
                qd = tl.load(qdoc_base + offs_m, mask=m_ok, other=-1)
            ok = _allowed(qp[None, :], kp[:, None], qd[None, :], kd[:, None], m_ok[None, :], window,
                          CAUSAL, HAS_WINDOW, HAS_DOC)
            pt = tl.where(ok, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)  # (BN, DV)
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)  # (BN, BM)
        dst = pt * (dpt - dl[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)  # (BN, D)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV_, QPOS, KPOS, QDOC, KDOC, BOUNDS,
                     qk_scale, scale, window, H, G, Tq, Tk, bounds_bstride,
                     D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BN keys of one (batch, kv head), summed over its G query heads.
    Grid (cdiv(Tk, BN), B * Hkv)."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    Hkv = H // G
    b = bkv // Hkv
    hk = bkv % Hkv
    bkv64 = bkv.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    n_ok = offs_n < Tk
    k = tl.load(K + bkv64 * Tk * D + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + bkv64 * Tk * DV + offs_n[:, None] * DV + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    kp = tl.load(KPOS + offs_n, mask=n_ok, other=0)
    kd = kp
    if HAS_DOC:
        kd = tl.load(KDOC + b.to(tl.int64) * Tk + offs_n, mask=n_ok, other=-1)
    qdoc_base = QDOC + b.to(tl.int64) * Tq
    lo, flo, fhi, hi = _load_bounds(BOUNDS, b, pid_n, bounds_bstride)

    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    for g in range(G):
        bh64 = (b * H + hk * G + g).to(tl.int64)
        q_base = Q + bh64 * Tq * D
        do_base = DO + bh64 * Tq * DV
        row_base = bh64 * Tq
        dk, dv = _dkdv_blocks(dk, dv, k, v, kp, kd, q_base, do_base, row_base, LSE2, DELTA, QPOS, qdoc_base, Tq,
                              window, qk_scale, lo, flo, offs_d, offs_dv, D, DV, BM, True, CAUSAL, HAS_WINDOW,
                              HAS_DOC, PREC, UPCAST)
        dk, dv = _dkdv_blocks(dk, dv, k, v, kp, kd, q_base, do_base, row_base, LSE2, DELTA, QPOS, qdoc_base, Tq,
                              window, qk_scale, flo, fhi, offs_d, offs_dv, D, DV, BM, False, CAUSAL, HAS_WINDOW,
                              HAS_DOC, PREC, UPCAST)
        dk, dv = _dkdv_blocks(dk, dv, k, v, kp, kd, q_base, do_base, row_base, LSE2, DELTA, QPOS, qdoc_base, Tq,
                              window, qk_scale, fhi, hi, offs_d, offs_dv, D, DV, BM, True, CAUSAL, HAS_WINDOW,
                              HAS_DOC, PREC, UPCAST)
    dk = dk * scale  # dS carries the softmax scale once
    tl.store(DK + bkv64 * Tk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(DV_ + bkv64 * Tk * DV + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=n_ok[:, None])


@triton.jit
def _dq_blocks(dq, q, do, l2, dl, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale, start, end,
               offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """dQ of one query block from key blocks start..end-1."""
    for kb in range(start, end):
        offs_n = kb * BN + tl.arange(0, BN)
        n_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)  # (BN, D)
        v = tl.load(v_base + offs_n[:, None] * DV + offs_dv[None, :], mask=n_ok[:, None], other=0.0)  # (BN, DV)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # (BM, BN)
        p = tl.exp2(s - l2[:, None])
        if MASK:
            kp = tl.load(KPOS + offs_n, mask=n_ok, other=0)
            kd = kp
            if HAS_DOC:
                kd = tl.load(kdoc_base + offs_n, mask=n_ok, other=-1)
            ok = _allowed(qp[:, None], kp[None, :], qd[:, None], kd[None, :], n_ok[None, :], window,
                          CAUSAL, HAS_WINDOW, HAS_DOC)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)  # (BM, BN)
        ds = p * (dp - dl[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)  # (BM, D)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, QPOS, KPOS, QDOC, KDOC, BOUNDS,
                   qk_scale, scale, window, H, G, Tq, Tk, bounds_bstride,
                   D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BM query rows of one (batch, query head). Grid (cdiv(Tq, BM), B * H)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    Hkv = H // G
    bkv = (b * Hkv + (bh % H) // G).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    m_ok = offs_m < Tq
    q = tl.load(Q + bh64 * Tq * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + bh64 * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
    l2 = tl.load(LSE2 + bh64 * Tq + offs_m, mask=m_ok, other=float("inf"))
    dl = tl.load(DELTA + bh64 * Tq + offs_m, mask=m_ok, other=0.0)
    qp = tl.load(QPOS + offs_m, mask=m_ok, other=0)
    qd = qp
    if HAS_DOC:
        qd = tl.load(QDOC + b.to(tl.int64) * Tq + offs_m, mask=m_ok, other=-1)
    k_base = K + bkv * Tk * D
    v_base = V + bkv * Tk * DV
    kdoc_base = KDOC + b.to(tl.int64) * Tk
    lo, flo, fhi, hi = _load_bounds(BOUNDS, b, pid_m, bounds_bstride)

    dq = tl.zeros([BM, D], tl.float32)
    dq = _dq_blocks(dq, q, do, l2, dl, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale, lo, flo,
                    offs_d, offs_dv, D, DV, BN, True, CAUSAL, HAS_WINDOW, HAS_DOC, PREC, UPCAST)
    dq = _dq_blocks(dq, q, do, l2, dl, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale, flo, fhi,
                    offs_d, offs_dv, D, DV, BN, False, CAUSAL, HAS_WINDOW, HAS_DOC, PREC, UPCAST)
    dq = _dq_blocks(dq, q, do, l2, dl, qp, qd, k_base, v_base, KPOS, kdoc_base, Tk, window, qk_scale, fhi, hi,
                    offs_d, offs_dv, D, DV, BN, True, CAUSAL, HAS_WINDOW, HAS_DOC, PREC, UPCAST)
    dq = dq * scale
    tl.store(DQ + bh64 * Tq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: BM query rows x BN keys per tile, warps, pipeline stages."""
    bm: int
    bn: int
    warps: int = 4
    stages: int = 2


@dataclass(frozen=True)
class FlashConfig:
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles


def pick_config(head_dim: int, dtype: torch.dtype) -> FlashConfig:
    """Fixed H100-sized tiles by head dim (max of D, Dv) and dtype.

    bf16 d=128 picked by a sweep on an H100 (T=16K, H=16, causal): fwd 128x64, 8 warps, 3 stages
    (460 TFLOP/s; 128x128 and 64x64 within 1 %); dK/dV 32 queries x 64 keys, 4 warps, 3 stages
    (the whole backward 7.4 ms against 12.2 ms with 64x64 / 8 warps, 16.7 ms with 32x128 / 4
    warps, which runs out of registers); dQ 128x32, 8 warps (tilings within 5 %). Shared memory
    at d=128 bf16: fwd q 32 KiB + 3 stages x (k + v) 32 KiB; dK/dV k, v 32 KiB + 3 stages x
    (q + dO) 16 KiB; dQ q, dO 64 KiB + 3 stages x 16 KiB: all within the H100's 227 KiB. fp32
    halves the tiles (it exists for accuracy checks, not speed). d <= 64 is not tuned."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return FlashConfig(Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2))
        return FlashConfig(Tiles(64, 32, 4, 2), Tiles(32, 64, 4, 2), Tiles(64, 32, 8, 2))
    if head_dim <= 64:
        return FlashConfig(Tiles(128, 64, 4, 3), Tiles(32, 64, 4, 3), Tiles(128, 32, 4, 3))
    return FlashConfig(Tiles(128, 64, 8, 3), Tiles(32, 64, 4, 3), Tiles(128, 32, 8, 3))


# ------------------------------------------------------------------------------------------------
# tile classification (torch, on the device)
# ------------------------------------------------------------------------------------------------
def _block_minmax(x: Tensor, blk: int) -> Tuple[Tensor, Tensor]:
    """x (..., T) -> per block of blk entries (min, max), each (..., cdiv(T, blk)). The last,
    partial block repeats x's last entry, which leaves its min and max unchanged."""
    T = x.shape[-1]
    n = triton.cdiv(T, blk)
    idx = torch.arange(n * blk, device=x.device).clamp_max_(T - 1)
    xb = x[..., idx].reshape(*x.shape[:-1], n, blk)
    return xb.amin(-1), xb.amax(-1)


@dataclass
class _Stats:
    """Block statistics along one axis: positions (n,) and document ids (Bm, n) or None."""
    pmin: Tensor
    pmax: Tensor
    dmin: Optional[Tensor]
    dmax: Optional[Tensor]
    partial_last: bool  # the last block is cut short by the sequence end

    @staticmethod
    def of(pos: Tensor, doc: Optional[Tensor], blk: int) -> "_Stats":
        pmin, pmax = _block_minmax(pos, blk)
        dmin = dmax = None
        if doc is not None:
            dmin, dmax = _block_minmax(doc, blk)
        return _Stats(pmin, pmax, dmin, dmax, pos.shape[0] % blk != 0)

    def rows(self, sl: slice) -> "_Stats":
        d = (None, None) if self.dmin is None else (self.dmin[:, sl], self.dmax[:, sl])
        return _Stats(self.pmin[sl], self.pmax[sl], d[0], d[1], False)


def _classify(qs: _Stats, ks: _Stats, causal: bool, window: Optional[int]) -> Tuple[Tensor, Tensor]:
    """(visible, full), each (Bm, nq, nk) bool, Bm = batch with documents else 1. visible: some
    (query, key) pair of the tile may be allowed; full: every pair is (no mask needed)."""
    qmin, qmax = qs.pmin[:, None], qs.pmax[:, None]
    kmin, kmax = ks.pmin[None, :], ks.pmax[None, :]
    vis = torch.ones(qmin.shape[0], kmin.shape[1], dtype=torch.bool, device=qmin.device)
    full = vis.clone()
    if causal:
        vis &= kmin <= qmax
        full &= kmax <= qmin
    if window is not None:
        vis &= (qmin - kmax) < window
        full &= (qmax - kmin) < window
        if not causal:
            vis &= (kmin - qmax) < window
            full &= (kmax - qmin) < window
    vis, full = vis[None], full[None]
    if qs.dmin is not None:
        qdn, qdx = qs.dmin[:, :, None], qs.dmax[:, :, None]
        kdn, kdx = ks.dmin[:, None, :], ks.dmax[:, None, :]
        vis = vis & (qdn <= kdx) & (kdn <= qdx)  # the two blocks' document ranges overlap
        full = full & (qdn == qdx) & (kdn == kdx) & (qdn == kdn)  # one and the same document
    full = full & vis
    # tiles cut short by a sequence end always take the masked path (it checks the bounds)
    if qs.partial_last:
        full[:, -1, :] = False
    if ks.partial_last:
        full[:, :, -1] = False
    return vis, full


def _ranges(vis: Tensor, full: Tensor) -> Tensor:
    """vis, full (Bm, R, C) -> (Bm, R, 4) int32 [lo, flo, fhi, hi] per row block: every visible
    column block lies in lo..hi-1 (lo = hi = 0 when none); flo..fhi-1 is the first run of full
    blocks (flo = fhi = hi when none)."""
    C = vis.shape[-1]
    ar = torch.arange(C, device=vis.device)
    any_v = vis.any(-1)
    lo = torch.where(any_v, vis.int().argmax(-1), 0)  # argmax gives the first maximum
    hi = torch.where(any_v, C - vis.flip(-1).int().argmax(-1), 0)
    any_f = full.any(-1)
    flo = torch.where(any_f, full.int().argmax(-1), hi)
    brk = ~full & (ar >= flo[..., None])  # first non-full block at or after flo ends the run
    fhi = torch.where(any_f, torch.where(brk.any(-1), brk.int().argmax(-1), C), hi)
    return torch.stack([lo, flo, fhi, hi], -1).to(torch.int32)


def _bounds(q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor], k_doc: Optional[Tensor], bm: int, bn: int,
            causal: bool, window: Optional[int], by_keys: bool) -> Tensor:
    """Per query block (by_keys False) the key-block bounds, or per key block the query-block
    bounds: (Bm, n_rows, 4) int32, contiguous. Chunked so that at most ~2^24 flags exist at once."""
    qs, ks = _Stats.of(q_pos, q_doc, bm), _Stats.of(k_pos, k_doc, bn)
    rows, cols = (ks, qs) if by_keys else (qs, ks)
    n_rows, n_cols = rows.pmin.shape[0], cols.pmin.shape[0]
    Bm = 1 if q_doc is None else q_doc.shape[0]
    step = max(1, _MAX_TILE_FLAGS // max(1, Bm * n_cols))
    out = []
    for r0 in range(0, n_rows, step):
        sl = slice(r0, min(n_rows, r0 + step))
        part = rows.rows(sl)
        part.partial_last = rows.partial_last and sl.stop == n_rows
        if by_keys:
            vis, full = _classify(qs, part, causal, window)
            vis, full = vis.transpose(1, 2), full.transpose(1, 2)
        else:
            vis, full = _classify(part, ks, causal, window)
        out.append(_ranges(vis, full))
    return torch.cat(out, 1).contiguous()


@functools.lru_cache(maxsize=64)
def _arange_bounds(Tq: int, Tk: int, bm: int, bn: int, causal: bool, window: Optional[int], by_keys: bool,
                   device: torch.device) -> Tensor:
    """`_bounds` for positions 0..T-1 and no documents, which depend on the shapes alone: computed
    once per shape (the ~50 small torch ops cost ~10% of a forward at 8K tokens)."""
    return _bounds(torch.arange(Tq, device=device), torch.arange(Tk, device=device), None, None, bm, bn, causal,
                   window, by_keys)


def _tile_bounds(q_pos, k_pos, q_doc, k_doc, bm, bn, causal, window, by_keys, arange_positions):
    if arange_positions and q_doc is None:
        return _arange_bounds(q_pos.shape[0], k_pos.shape[0], bm, bn, causal, window, by_keys, q_pos.device)
    return _bounds(q_pos, k_pos, q_doc, k_doc, bm, bn, causal, window, by_keys)


# ------------------------------------------------------------------------------------------------
# host wrappers
# ------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_supported(q: Tensor, k: Tensor, v: Tensor) -> None:
    """ValueError unless the Triton kernel can take these tensors (dtype, head dims, device)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton flash kernel; use float16, bfloat16 "
                         f"or float32 (backend='torch' takes float64)")
    D, Dv = q.shape[-1], v.shape[-1]
    for name, d in (("q, k head dim D", D), ("v head dim Dv", Dv)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{name}={d} is not supported by the Triton flash kernel; supported: "
                             f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))} (backend='torch' takes any)")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"q: tensors on {q.device} need TRITON_INTERPRET=1 for the Triton flash kernel "
                         f"(set before triton is imported); use CUDA tensors or backend='torch'")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")


def _common(q, k, v, causal, window, q_pos, k_pos, q_doc, k_doc):
    """Contiguous inputs, int64 positions / documents (documents: the positions as placeholders
    when absent, never read) and the kernels' flags."""
    check_supported(q, k, v)
    dev = q.device
    q_pos = q_pos.to(dev, torch.int64).contiguous()
    k_pos = k_pos.to(dev, torch.int64).contiguous()
    has_doc = q_doc is not None
    if has_doc:
        q_doc = q_doc.to(dev, torch.int64).contiguous()
        k_doc = k_doc.to(dev, torch.int64).contiguous()
    flags = dict(CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_DOC=has_doc,
                 PREC="ieee" if q.dtype == torch.float32 else None,
                 UPCAST=q.dtype == torch.bfloat16 and _interpreting())
    return (q.contiguous(), k.contiguous(), v.contiguous(), q_pos, k_pos, q_doc, k_doc,
            flags, 0 if window is None else int(window))


def flash_fwd_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window: Optional[int],
                     q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor], k_doc: Optional[Tensor],
                     config: Optional[FlashConfig] = None, arange_positions: bool = False) -> Tuple[Tensor, Tensor]:
    """q (B, H, Tq, D); k, v (B, Hkv, Tk, D|Dv). Returns o (B, H, Tq, Dv) in q's dtype and
    lse (B, H, Tq) fp32 (-inf where a row sees no key). arange_positions: the caller promises
    q_pos = 0..Tq-1 and k_pos = 0..Tk-1 (tile bounds are then cached per shape)."""
    q, k, v, q_pos, k_pos, q_doc, k_doc, flags, win = _common(q, k, v, causal, window, q_pos, k_pos, q_doc, k_doc)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Tq == 0 or Tk == 0 or B * H == 0:  # no key anywhere: o = 0, lse = -inf
        return (torch.zeros(B, H, Tq, Dv, dtype=q.dtype, device=q.device),
                torch.full((B, H, Tq), -math.inf, dtype=torch.float32, device=q.device))
    o = torch.empty(B, H, Tq, Dv, dtype=q.dtype, device=q.device)  # every row is written
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    cfg = (config or pick_config(max(D, Dv), q.dtype)).fwd
    bounds = _tile_bounds(q_pos, k_pos, q_doc, k_doc, cfg.bm, cfg.bn, causal, window, False, arange_positions)
    grid = (triton.cdiv(Tq, cfg.bm), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, q_pos, k_pos, q_pos if q_doc is None else q_doc,
                      k_pos if k_doc is None else k_doc, bounds,
                      float(scale) * _LOG2E, win, H, H // Hkv, Tq, Tk, bounds.stride(0) if q_doc is not None else 0,
                      D=D, DV=Dv, BM=cfg.bm, BN=cfg.bn, **flags, num_warps=cfg.warps, num_stages=cfg.stages)
    return o, lse


def flash_bwd_triton(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                     scale: float, window: Optional[int], q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor],
                     k_doc: Optional[Tensor], dlse: Optional[Tensor] = None,
                     config: Optional[FlashConfig] = None,
                     arange_positions: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes. do (B, H, Tq, Dv); lse (B, H, Tq) from the
    forward; dlse (B, H, Tq): gradient flowing into lse, or None. arange_positions: as in
    `flash_fwd_triton`."""
    q, k, v, q_pos, k_pos, q_doc, k_doc, flags, win = _common(q, k, v, causal, window, q_pos, k_pos, q_doc, k_doc)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    if Tq == 0 or Tk == 0 or B * H == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.empty_like(q)  # every row is written, zero where no key / query is visible
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = config or pick_config(max(D, Dv), q.dtype)
    do = do.to(q.dtype).contiguous()
    o = o.contiguous()
    lse = lse.float().contiguous()
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _bwd_pre_kernel[(triton.cdiv(Tq, 64), B * H)](
        o, do, lse, lse if dlse is None else dlse.float().contiguous(), delta, lse2, Tq,
        DV=Dv, BM=64, HAS_DLSE=dlse is not None, num_warps=4)

    qk_scale = float(scale) * _LOG2E
    q_doc_arg = q_pos if q_doc is None else q_doc
    k_doc_arg = k_pos if k_doc is None else k_doc
    c = cfg.dkdv
    bounds = _tile_bounds(q_pos, k_pos, q_doc, k_doc, c.bm, c.bn, causal, window, True, arange_positions)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, c.bn), B * Hkv)](
        q, k, v, do, lse2, delta, dk, dv, q_pos, k_pos, q_doc_arg, k_doc_arg, bounds,
        qk_scale, float(scale), win, H, G, Tq, Tk, bounds.stride(0) if q_doc is not None else 0,
        D=D, DV=Dv, BM=c.bm, BN=c.bn, **flags, num_warps=c.warps, num_stages=c.stages)
    c = cfg.dq
    bounds = _tile_bounds(q_pos, k_pos, q_doc, k_doc, c.bm, c.bn, causal, window, False, arange_positions)
    _bwd_dq_kernel[(triton.cdiv(Tq, c.bm), B * H)](
        q, k, v, do, lse2, delta, dq, q_pos, k_pos, q_doc_arg, k_doc_arg, bounds,
        qk_scale, float(scale), win, H, G, Tq, Tk, bounds.stride(0) if q_doc is not None else 0,
        D=D, DV=Dv, BM=c.bm, BN=c.bn, **flags, num_warps=c.warps, num_stages=c.stages)
    return dq, dk, dv
