"""Triton forward kernel for lightning attention (decayed linear attention).

Per head ``h`` with ``lambda_h = exp(-decay_h)`` and a segment ``[s, e]``::

    o_t   = sum_{s<=j<=t} lambda^(t-j) (q_t . k_j) v_j + lambda^(t-s+init_offset) q_t @ init
    final = sum_{s<=j<=e} lambda^(e-j) k_j^T v_j     + lambda^(e-s+init_offset) init

Lightning Attention-2 tiling: one program per (segment, head, block of K, block of V)
walks the segment in chunks of ``block`` tokens, computing the intra-chunk part as a
masked quadratic ``((Q K^T) * D) V`` and the inter-chunk part from a running fp32 state
``S`` (BK x BV) kept in registers.  Every decay factor is ``exp(-decay * x)`` with
``x >= 0`` (masked before the exponential), so no negative power of lambda is ever
formed and large decays underflow harmlessly to 0.

Partial outputs of the K blocks are summed with torch (fp32 buffer) when K needs more
than one block.  The backward pass is assembled elsewhere from this forward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lightning_fwd_triton"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BK = 64
_MAX_BV = 64


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around the Triton interpreter's bf16 tl.dot, which multiplies the raw uint16
    # bit patterns (numpy has no bf16); it is only set under TRITON_INTERPRET=1.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _lightning_fwd_kernel(
    q_ptr, k_ptr, v_ptr, decay_ptr, init_ptr, cu_ptr, o_ptr, final_ptr,
    T, H, o_nk_stride,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    INIT_OFFSET: tl.constexpr, HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    n64 = i_n.to(tl.int64)

    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        i_b = n64 * 0  # batch is 1
    else:
        bos = n64 * 0
        eos = bos + T
        i_b = n64
    L = (eos - bos).to(tl.int32)

    # int64 row base of this (batch row, head, segment start): long sequences overflow int32.
    row0 = (i_b * H + i_h) * T + bos
    q_base = q_ptr + row0 * K
    k_base = k_ptr + row0 * K
    v_base = v_ptr + row0 * V
    o_base = o_ptr + i_k.to(tl.int64) * o_nk_stride + row0 * V

    decay = tl.load(decay_ptr + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_kk = i_k * BK + tl.arange(0, BK)
    o_vv = i_v * BV + tl.arange(0, BV)
    m_k = o_kk < K
    m_v = o_vv < V

    if HAS_INIT:
        s_off = ((n64 * H + i_h) * K + o_kk[:, None]) * V + o_vv[None, :]
        b_s = tl.load(init_ptr + s_off, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)

    t_f = o_t.to(tl.float32)
    diff = o_t[:, None] - o_t[None, :]
    causal = diff >= 0
    # D_ij = lambda^(i-j) for i >= j, else 0 (exponent masked to 0 before exp: never positive).
    b_d = tl.where(causal, tl.exp(-decay * tl.where(causal, diff, 0).to(tl.float32)), 0.0)

    for c0 in range(0, L, BT):
        cl = tl.minimum(L - c0, BT)  # real length of this chunk
        # exponent offset of the state: init_offset for the first chunk, 1 afterwards.
        off = tl.where(c0 == 0, INIT_OFFSET, 1)
        off_f = off.to(tl.float32)
        m_t = o_t < cl
        rows = (c0 + o_t).to(tl.int64)

        b_q = tl.load(q_base + rows[:, None] * K + o_kk[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k_base + rows[:, None] * K + o_kk[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v_base + rows[:, None] * V + o_vv[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)

        # intra-chunk: ((Q K^T) * D) V
        b_qk = _dot(b_q, tl.trans(b_k), DOT_PREC, UPCAST)
        b_p = (b_qk * b_d).to(b_v.dtype)
        b_o = _dot(b_p, b_v, DOT_PREC, UPCAST)
        # inter-chunk: lambda^(i + off) Q @ S
        q_dec = tl.exp(-decay * (t_f + off_f))
        b_o += _dot(b_q, b_s.to(b_q.dtype), DOT_PREC, UPCAST) * q_dec[:, None]

        tl.store(o_base + rows[:, None] * V + o_vv[None, :], b_o.to(o_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])

        # state update: S = lambda^(cl-1+off) S + (K * lambda^(cl-1-j))^T V
        k_exp = tl.where(m_t, cl - 1 - o_t, 0).to(tl.float32)
        k_dec = tl.where(m_t, tl.exp(-decay * k_exp), 0.0)
        b_kd = (b_k.to(tl.float32) * k_dec[:, None]).to(b_k.dtype)
        s_dec = tl.exp(-decay * (cl - 1 + off).to(tl.float32))
        b_s = b_s * s_dec + _dot(tl.trans(b_kd), b_v, DOT_PREC, UPCAST)

    if STORE_FINAL:
        f_off = ((n64 * H + i_h) * K + o_kk[:, None]) * V + o_vv[None, :]
        tl.store(final_ptr + f_off, b_s, mask=m_k[:, None] & m_v[None, :])


def _next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def _check(name, cond, msg):
    if not cond:
        raise ValueError(f"{name}: {msg}")


def lightning_fwd_triton(q, k, v, decay, init=None, init_offset=1, cu_seqlens=None, want_final=False, block=64):
    """Lightning-attention forward. Returns ``(o, final)``.

    q, k: (B, H, T, K); v: (B, H, T, V); fp32/bf16/fp16 (all the same dtype).
    decay: (H,) non-negative, lambda_h = exp(-decay_h) (cast to fp32).
    init: None or fp32 (S, H, K, V), S = number of segments (B, or N with cu_seqlens).
    init_offset: 0 or 1 (power offset of the decay applied to ``init``).
    cu_seqlens: None or int32/int64 (N+1,), cu[0] = 0, strictly increasing, cu[N] = T; needs B == 1.
    want_final: also return the fp32 final state (S, H, K, V); otherwise final is None.
    block: chunk length (power of two >= 16).
    o has v's dtype and shape (B, H, T, V); accumulation is fp32.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(name, isinstance(x, torch.Tensor), "must be a torch.Tensor")
        _check(name, x.dim() == 4, f"must have rank 4 (B, H, T, D), got shape {tuple(x.shape)}")
        _check(name, x.dtype in _DTYPES, f"dtype must be one of fp32/bf16/fp16, got {x.dtype}")
    _check("k", k.shape == q.shape, f"shape {tuple(k.shape)} must equal q's {tuple(q.shape)}")
    _check("v", v.shape[:3] == q.shape[:3], f"shape {tuple(v.shape)} must match q's (B, H, T) {tuple(q.shape[:3])}")
    _check("k", k.dtype == q.dtype, f"dtype {k.dtype} differs from q's {q.dtype}")
    _check("v", v.dtype == q.dtype, f"dtype {v.dtype} differs from q's {q.dtype}")
    dev = q.device
    _check("k", k.device == dev, f"device {k.device} differs from q's {dev}")
    _check("v", v.device == dev, f"device {v.device} differs from q's {dev}")
    B, H, T, K = q.shape
    V = v.shape[-1]
    _check("q", B >= 1 and H >= 1 and T >= 1 and K >= 1, f"all dimensions must be >= 1, got {tuple(q.shape)}")
    _check("v", V >= 1, f"all dimensions must be >= 1, got {tuple(v.shape)}")

    _check("decay", isinstance(decay, torch.Tensor), "must be a torch.Tensor")
    _check("decay", decay.dim() == 1 and decay.shape[0] == H, f"must have shape ({H},), got {tuple(decay.shape)}")
    _check("decay", decay.is_floating_point(), f"must be floating point, got {decay.dtype}")
    _check("decay", decay.device == dev, f"device {decay.device} differs from q's {dev}")

    _check("init_offset", not isinstance(init_offset, bool) and init_offset in (0, 1),
           f"must be 0 or 1, got {init_offset!r}")
    _check("block", isinstance(block, int) and block >= 16 and block & (block - 1) == 0,
           f"must be a power of two >= 16, got {block!r}")

    if cu_seqlens is not None:
        _check("cu_seqlens", isinstance(cu_seqlens, torch.Tensor), "must be a torch.Tensor")
        _check("cu_seqlens", cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 2,
               f"must have shape (N+1,) with N >= 1, got {tuple(cu_seqlens.shape)}")
        _check("cu_seqlens", cu_seqlens.dtype in (torch.int32, torch.int64),
               f"dtype must be int32 or int64, got {cu_seqlens.dtype}")
        _check("cu_seqlens", cu_seqlens.device == dev, f"device {cu_seqlens.device} differs from q's {dev}")
        _check("cu_seqlens", B == 1, f"requires batch size 1, got B={B}")
        # one host sync for the three value checks
        first, last, min_step = torch.stack(
            [cu_seqlens[0], cu_seqlens[-1], torch.diff(cu_seqlens).min()]).tolist()
        _check("cu_seqlens", first == 0, f"must start at 0, got {first}")
        _check("cu_seqlens", last == T, f"must end at T={T}, got {last}")
        _check("cu_seqlens", min_step > 0, "must be strictly increasing")
        n_seg = cu_seqlens.shape[0] - 1
    else:
        n_seg = B

    if init is not None:
        _check("init", isinstance(init, torch.Tensor), "must be a torch.Tensor or None")
        _check("init", tuple(init.shape) == (n_seg, H, K, V),
               f"must have shape {(n_seg, H, K, V)}, got {tuple(init.shape)}")
        _check("init", init.dtype == torch.float32, f"dtype must be float32, got {init.dtype}")
        _check("init", init.device == dev, f"device {init.device} differs from q's {dev}")
        init = init.contiguous()

    q = q.contiguous()
    k = k.contiguous()
    v = v.contiguous()
    decay = decay.to(torch.float32).contiguous()

    BK = min(max(16, _next_pow2(K)), _MAX_BK)
    BV = min(max(16, _next_pow2(V)), _MAX_BV)
    NK = triton.cdiv(K, BK)
    NV = triton.cdiv(V, BV)

    if NK == 1:
        o_buf = torch.empty((1, B, H, T, V), dtype=v.dtype, device=dev)
    else:
        o_buf = torch.empty((NK, B, H, T, V), dtype=torch.float32, device=dev)
    final = torch.empty((n_seg, H, K, V), dtype=torch.float32, device=dev) if want_final else None

    grid = (NV, NK, n_seg * H)
    _lightning_fwd_kernel[grid](
        q, k, v, decay, init, cu_seqlens, o_buf, final,
        T, H, B * H * T * V,
        K=K, V=V, BT=block, BK=BK, BV=BV,
        INIT_OFFSET=int(init_offset), HAS_INIT=init is not None, IS_VARLEN=cu_seqlens is not None,
        STORE_FINAL=bool(want_final), DOT_PREC="ieee" if q.dtype == torch.float32 else None,
        UPCAST=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=4,
    )
    o = o_buf[0] if NK == 1 else o_buf.sum(0).to(v.dtype)
    return o, final
