"""Ring attention: K/V blocks travel round a ring of R ranks; each rank merges the partial
results of its queries against every block by log-sum-exp, in fp32.

    forward, step s:  send (K, V, positions, doc ids) to the next rank and receive the previous
                      rank's while computing (o_s, lse_s) = flash(q, K_s, V_s);
                      lse = logaddexp(lse, lse_s); o = o e^(lse_old - lse) + o_s e^(lse_s - lse)
    backward, step s: the same circulation of K/V; each rank adds its (dK, dV) for the block it
                      holds to an fp32 accumulator that travels with the block and reaches the
                      block's owner after R hops. dQ stays local. Probabilities are recomputed
                      from the final lse, so dS = P (dP - rowsum(dO o) + dlse) needs no other state.

Masks come from the global positions and document ids that travel with each block, so any
layout works; with the zigzag layout (parallel/sharding.py) every step costs every rank the
same under a causal mask. Per rank and direction the ring moves (R - 1) K/V blocks forward;
backward (R - 1) K/V blocks plus R fp32 dK/dV accumulators.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from longctx.kernels.flash import flash_bwd, flash_fwd
from longctx.parallel.comm import Exchange

Tensor = torch.Tensor


def _merge(o: Optional[Tensor], lse: Optional[Tensor], o_s: Tensor, lse_s: Tensor):
    """Log-sum-exp merge of two partial softmax results (rows with no key: lse = -inf, o = 0),
    into o in place (o is the fp32 accumulator; no temporaries the size of o)."""
    if o is None:
        return o_s.to(lse_s.dtype), lse_s
    new = torch.logaddexp(lse, lse_s)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # -inf on both sides: keep 0
    o.mul_(torch.exp(lse - safe)[..., None]).addcmul_(o_s, torch.exp(lse_s - safe)[..., None].to(o_s.dtype))
    return o, new


class _RingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_doc, k_doc, causal, scale, window, ring_ranks, ring_rank, group,
                block, backend):
        R = len(ring_ranks)
        nxt, prv = ring_ranks[(ring_rank + 1) % R], ring_ranks[(ring_rank - 1) % R]
        blk: List[Tensor] = [k, v, k_pos] + ([k_doc] if k_doc is not None else [])
        o = lse = None
        for s in range(R):
            ex = Exchange(blk, nxt, prv, group, op="ring_kv") if s < R - 1 else None
            o_s, lse_s = flash_fwd(q, blk[0], blk[1], causal, scale, window, q_pos, blk[2], q_doc,
                                   blk[3] if k_doc is not None else None, block, backend)
            o, lse = _merge(o, lse, o_s, lse_s)
            del o_s
            if ex is not None:
                blk = ex.wait()
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.args = (causal, scale, window, ring_ranks, ring_rank, group, block, backend)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        causal, scale, window, ring_ranks, ring_rank, group, block, backend = ctx.args
        R = len(ring_ranks)
        nxt, prv = ring_ranks[(ring_rank + 1) % R], ring_ranks[(ring_rank - 1) % R]
        if do is None:
            do = torch.zeros_like(o)
        do = do.contiguous()
        blk: List[Tensor] = [k, v, k_pos] + ([k_doc] if k_doc is not None else [])
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        acc_ex = None
        for s in range(R):
            ex = Exchange(blk, nxt, prv, group, op="ring_kv_grad") if s < R - 1 else None
            if acc_ex is None:
                acc = [torch.zeros(k.shape, dtype=lse.dtype, device=k.device),
                       torch.zeros(v.shape, dtype=lse.dtype, device=v.device)]
            else:
                acc = acc_ex.wait()
            # gradients are added straight into dq and the travelling dK/dV accumulator
            flash_bwd(do, q, blk[0], blk[1], o, lse, causal, scale, window, q_pos, blk[2], q_doc,
                      blk[3] if k_doc is not None else None, block, dlse, backend, out=(dq, acc[0], acc[1]))
            # the accumulator follows its block; after R hops it is home
            if R > 1:
                acc_ex = Exchange(acc, nxt, prv, group, op="ring_dkv")
            if ex is not None:
                blk = ex.wait()
        dk, dv = acc_ex.wait() if R > 1 else acc
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 12


def ring_attn(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, ring_ranks: List[int], ring_rank: int,
              group, causal: bool = True, scale: Optional[float] = None, window: Optional[int] = None,
              q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None, block: int = 256,
              backend: str = "auto"):
    """Exact attention of this rank's queries against the keys of every rank in the ring.

    q: (B, H, L, D); k, v: (B, Hkv, Lk, D|Dv) this rank's block (every rank the same Lk);
    q_pos (L,), k_pos (Lk,): global positions; q_doc (B, L), k_doc (B, Lk): document ids or None.
    ring_ranks: the ring's global ranks in order (this rank at ring_rank); group: a process
    group that contains them. Returns (out (B, H, L, Dv), lse (B, H, L) fp32); both carry gradients.
    """
    if len(ring_ranks) < 1 or not 0 <= ring_rank < len(ring_ranks):
        raise ValueError(f"ring_rank={ring_rank} is not an index into ring_ranks (length {len(ring_ranks)})")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc: pass both or neither")
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttn.apply(q, k, v, q_pos.to(torch.long), k_pos.to(torch.long), q_doc, k_doc, bool(causal), sc,
                           window, list(ring_ranks), int(ring_rank), group, int(block), backend)
