"""`flash_attn`: softmax attention returning (out, lse), forward and backward, grouped-query
heads, causal / sliding-window / document masks from global positions, over two backends: the
fused Triton kernel (flash_triton.py, CUDA) and the torch path (flash_torch.py: CPU, float64,
and the reference). Gradients also flow through lse, which log-sum-exp merges of partial
results (ring attention) need.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from longctx.kernels.flash_torch import flash_bwd_torch, flash_fwd_torch
from longctx.kernels.lightning import pick_backend

Tensor = torch.Tensor
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block, backend, arange_pos):
        if backend == "triton":
            from longctx.kernels.flash_triton import flash_fwd_triton
            o, lse = flash_fwd_triton(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc,
                                      arange_positions=arange_pos)
        else:
            o, lse = flash_fwd_torch(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block)
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.args = (causal, scale, window, block, backend, arange_pos)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        causal, scale, window, block, backend, arange_pos = ctx.args
        if do is None:
            do = torch.zeros_like(o)
        if backend == "triton":
            from longctx.kernels.flash_triton import flash_bwd_triton
            dq, dk, dv = flash_bwd_triton(do.contiguous(), q, k, v, o, lse, causal, scale, window, q_pos, k_pos,
                                          q_doc, k_doc, dlse, arange_positions=arange_pos)
        else:
            dq, dk, dv = flash_bwd_torch(do.contiguous(), q, k, v, o, lse, causal, scale, window, q_pos, k_pos,
                                         q_doc, k_doc, block, dlse)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def flash_fwd(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block=256, backend="auto"):
    """Forward kernel without autograd (ring attention drives it): (o, lse) as flash_attn."""
    if _backend(q, k, v, backend) == "triton":
        from longctx.kernels.flash_triton import flash_fwd_triton
        return flash_fwd_triton(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc)
    return flash_fwd_torch(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block)


def flash_bwd(do, q, k, v, o, lse, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block=256, dlse=None,
              backend="auto", out=None):
    """Backward kernel without autograd: (dq, dk, dv) for probabilities recomputed from `lse`
    (which may be the log-sum-exp over more keys than k holds: ring attention). out: fp32
    accumulators (dq, dk, dv) to add into; returned."""
    if _backend(q, k, v, backend) == "triton":
        from longctx.kernels.flash_triton import flash_bwd_triton
        g = flash_bwd_triton(do, q, k, v, o, lse, causal, scale, window, q_pos, k_pos, q_doc, k_doc, dlse)
        if out is None:
            return g
        for acc, x in zip(out, g):
            acc += x
        return out
    return flash_bwd_torch(do, q, k, v, o, lse, causal, scale, window, q_pos, k_pos, q_doc, k_doc, block, dlse,
                           out=out)


def _backend(q: Tensor, k: Tensor, v: Tensor, backend: str) -> str:
    """'auto': Triton for CUDA tensors it supports (float16/bfloat16/float32, head dims 16, 32,
    64, 128) when triton imports, the torch path otherwise. 'triton' asked by name is checked
    here, so bad input fails before autograd with a ValueError naming what is supported."""
    be = pick_backend(q, backend)
    if be == "triton":
        from longctx.kernels.flash_triton import check_supported
        if backend == "auto":
            try:
                check_supported(q, k, v)
            except ValueError:
                return "torch"
        else:
            check_supported(q, k, v)
    return be


def _docs_from_cu(cu: Tensor, T: int, name: str) -> Tensor:
    c = cu.tolist()
    if cu.dim() != 1 or len(c) < 2 or c[0] != 0 or c[-1] != T or any(b <= a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name}: expected strictly increasing offsets from 0 to the sequence length {T}")
    return torch.searchsorted(cu.to(torch.long), torch.arange(T, device=cu.device), right=True)[None] - 1


def flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
               window: Optional[int] = None, doc_ids=None, cu_seqlens: Optional[Tensor] = None,
               q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None,
               block: int = 256, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Attention with log-sum-exp.

    q: (B, H, Tq, D); k: (B, Hkv, Tk, D); v: (B, Hkv, Tk, Dv); H % Hkv == 0 (grouped-query).
    causal / window (keys i - window < j <= i, both sides when not causal) use global positions
    q_pos (Tq,) and k_pos (Tk,) (default 0..T-1). doc_ids: (B, T) ids shared by q and k, or a
    pair (q_doc (B, Tq), k_doc (B, Tk)); cu_seqlens (B == 1) is the same as document ids.
    Returns out (B, H, Tq, Dv) and lse (B, H, Tq) in fp32 (-inf where a row sees no key).
    block: tile size of the torch path (the Triton kernel picks its tiles by head dim and dtype).
    backend: "auto" (Triton for CUDA tensors when triton imports and supports the dtype and head
    dims, else torch), "torch", or "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1;
    float16/bfloat16/float32, head dims 16, 32, 64, 128; anything else is a ValueError).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, dim)")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16, float32 or float64")
    B, H, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k, v: shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)} "
                         f"(batch and head dim must agree; v must match k's batch, heads and length)")
    if H % k.shape[1]:
        raise ValueError(f"q: {H} heads are not a multiple of k's {k.shape[1]} heads (grouped-query attention)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window: expected a positive int, got {window!r}")
    if block < 1:
        raise ValueError(f"block: expected >= 1, got {block}")
    Tk = k.shape[2]
    dev = q.device
    arange_pos = q_pos is None and k_pos is None  # lets the Triton path cache its tile bounds per shape
    q_pos = torch.arange(Tq, device=dev) if q_pos is None else q_pos.to(dev, torch.long)
    k_pos = torch.arange(Tk, device=dev) if k_pos is None else k_pos.to(dev, torch.long)
    if q_pos.shape != (Tq,) or k_pos.shape != (Tk,):
        raise ValueError(f"q_pos, k_pos: expected shapes ({Tq},) and ({Tk},)")
    q_doc = k_doc = None
    if cu_seqlens is not None:
        if doc_ids is not None:
            raise ValueError("doc_ids and cu_seqlens: pass one of them")
        if B != 1 or Tq != Tk:
            raise ValueError("cu_seqlens: needs batch size 1 and self-attention (Tq == Tk); use doc_ids otherwise")
        q_doc = k_doc = _docs_from_cu(cu_seqlens, Tq, "cu_seqlens")
    elif doc_ids is not None:
        q_doc, k_doc = doc_ids if isinstance(doc_ids, (tuple, list)) else (doc_ids, doc_ids)
        if q_doc.shape != (B, Tq) or k_doc.shape != (B, Tk):
            raise ValueError(f"doc_ids: expected shapes ({B}, {Tq}) and ({B}, {Tk})")
    be = _backend(q, k, v, backend)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _Flash.apply(q, k, v, bool(causal), sc, window, q_pos, k_pos, q_doc, k_doc, int(block), be, arange_pos)
