"""Ulysses sequence parallelism, and the 2-D hybrid with ring attention around it.

Ulysses (degree U): one all-to-all turns "my L tokens, all H heads" into "all U*L tokens of my
group, H/U heads", attention runs locally on whole sequences, and a second all-to-all turns the
output back. Per rank and direction it moves (U-1)/U of q, k, v and o: O(L * H * d), no
dependence on how long the whole sequence is beyond the local share.

Grouped-query heads: with Hkv KV heads and U ranks, either Hkv % U == 0 (each rank takes its
Hkv/U KV heads) or U % Hkv == 0 (each KV head is replicated to the U/Hkv ranks whose query
heads use it, before the all-to-all; the backward sums the replicas). Anything else is refused.

Hybrid (degree U x R): Ulysses inside groups of U neighbouring ranks, then ring attention
(parallel/ring.py) across the R groups on the gathered sequences, then Ulysses back.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from longctx.kernels.flash import flash_attn
from longctx.parallel.comm import HeadsToSeq, SeqToHeads, all_gather
from longctx.parallel.groups import SPHandle
from longctx.parallel.ring import ring_attn

Tensor = torch.Tensor


def check_heads(n_heads: int, n_kv_heads: int, ulysses: int, sp: int) -> Optional[str]:
    """None when Ulysses of this degree can split these heads, else the reason and the
    alternatives (one line, for config errors)."""
    if ulysses <= 1:
        return None
    if n_heads % ulysses:
        ring_ok = [u for u in range(1, sp + 1) if sp % u == 0 and n_heads % u == 0
                   and (n_kv_heads % u == 0 or u % n_kv_heads == 0)]
        alts = ", ".join(f"sp_ulysses={u} x sp_ring={sp // u}" for u in ring_ok)
        return (f"{n_heads} attention heads are not divisible by the Ulysses degree {ulysses}: "
                f"use ring attention or the hybrid ({alts})")
    if n_kv_heads % ulysses and ulysses % n_kv_heads:
        return (f"{n_kv_heads} KV heads and Ulysses degree {ulysses}: one must divide the other "
                f"(grouped-query heads are split or replicated); pick another parallel.sp_ulysses")
    return None


def _kv_for_ranks(k: Tensor, n_heads: int, U: int) -> Tensor:
    """K or V (B, Hkv, L, D) arranged so that the all-to-all's head split gives each rank the
    KV heads its query heads use: unchanged when Hkv % U == 0, replicated to U heads otherwise."""
    Hkv = k.shape[1]
    if Hkv % U == 0:
        return k
    G = n_heads // Hkv
    idx = torch.tensor([(j * n_heads // U) // G for j in range(U)], device=k.device)
    return k.index_select(1, idx)


def gather_meta(sp: SPHandle, positions_L: Tensor, doc_BL: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Positions (U*L,) and document ids (B, U*L) of the sequence a Ulysses group gathers, in
    the all-to-all's order (rank order of the group)."""
    if sp.ulysses == 1:
        return positions_L, doc_BL
    pos = all_gather(positions_L, sp.ulysses_group, op="ulysses_meta").reshape(-1)
    doc = None
    if doc_BL is not None:
        doc = all_gather(doc_BL, sp.ulysses_group, op="ulysses_meta").permute(1, 0, 2).reshape(doc_BL.shape[0], -1)
    return pos, doc


def ulysses_apply(q: Tensor, k: Tensor, v: Tensor, sp: SPHandle, fn) -> Tensor:
    """Run fn(q, k, v) -> o on whole sequences for this rank's heads (Ulysses over the whole
    SP group), for attention that needs every position in order (landmark attention)."""
    H = q.shape[1]
    why = check_heads(H, k.shape[1], sp.ulysses, sp.size)
    if why:
        raise ValueError(why)
    if sp.ring != 1:
        raise ValueError(f"this attention runs under Ulysses only (got a ring of {sp.ring}): set parallel.sp_ring=1")
    g, U = sp.ulysses_group, sp.ulysses
    q = SeqToHeads.apply(q, g, "ulysses")
    k = SeqToHeads.apply(_kv_for_ranks(k, H, U), g, "ulysses")
    v = SeqToHeads.apply(_kv_for_ranks(v, H, U), g, "ulysses")
    return HeadsToSeq.apply(fn(q, k, v), g, "ulysses")


def sp_attention(q: Tensor, k: Tensor, v: Tensor, sp: SPHandle, positions_L: Tensor, doc_BL: Optional[Tensor] = None,
                 causal: bool = True, scale: Optional[float] = None, window: Optional[int] = None,
                 meta: Optional[Tuple[Tensor, Optional[Tensor]]] = None, backend: str = "auto") -> Tensor:
    """Exact softmax attention of this rank's tokens against the whole (sharded) sequence.

    q: (B, H, L, D), k/v: (B, Hkv, L, D) for this rank's L tokens (any layout: their global
    positions_L (L,) and document ids doc_BL (B, L) say where they are). meta: the result of
    gather_meta (pass it to reuse it across layers). Returns (B, H, L, Dv)."""
    U, R = sp.ulysses, sp.ring
    H, Hkv = q.shape[1], k.shape[1]
    why = check_heads(H, Hkv, U, sp.size)
    if why:
        raise ValueError(why)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pos, doc = meta if meta is not None else gather_meta(sp, positions_L, doc_BL)
    if U > 1:
        g = sp.ulysses_group
        q = SeqToHeads.apply(q, g, "ulysses")
        k = SeqToHeads.apply(_kv_for_ranks(k, H, U), g, "ulysses")
        v = SeqToHeads.apply(_kv_for_ranks(v, H, U), g, "ulysses")
    if R > 1:
        o, _ = ring_attn(q, k, v, pos, pos, sp.ring_ranks, sp.ring_rank, sp.ring_group, causal, scale, window,
                         doc, doc, backend=backend)
    else:
        o, _ = flash_attn(q, k, v, causal, scale, window, doc_ids=doc, q_pos=pos, k_pos=pos)
    if U > 1:
        o = HeadsToSeq.apply(o, sp.ulysses_group, "ulysses")
    return o
