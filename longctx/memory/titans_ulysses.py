"""The Titans memory layer sequence-parallel by Ulysses over heads (model.memory.sp_mode=ulysses).

The memory's recurrence runs along the sequence, so the hand-off (parallel/state_passing.hand_off)
makes rank r+1 wait for rank r's scan in the forward and rank r wait for rank r+1's in the
backward: P scans one after another. Memory heads are independent, so instead one all-to-all
gives each of the P ranks whole sequences for H/P heads, each rank scans its heads alone, and a
second all-to-all brings the outputs back to the sequence shards:

  x (B, L, D) local  -> qkv and gate logits (B, H, L, 3d) / (B, H, L, 3)   local projections
                     -> SeqToHeads                 (B, H/P, P·L, ·)       my heads, every token
                     -> causal conv, SiLU, ℓ2 norm, gates, memory_scan from the initial state
                     -> HeadsToSeq                 (B, H, L, d)           my tokens, every head
                     -> RMSNorm, output gate, W_o                          local

Exact (the same operations in the same order per head; tests/distributed/test_titans_sp.py).
The conv runs on the gathered sequence, so it needs no halo. Per rank and direction it moves
(P−1)/P of L·(3·H·d + 3·H) values forward and L·H·d back, and the same again in the backward.
Contiguous layout only: the all-to-all gathers the shards in rank order, which must be sequence
order. Padded tail tokens (sharding pads the sequence at its end) come after every real token,
so no real output sees them.

With model.memory.recompute = R > 0 the scan runs R gathered tokens at a time, each piece
checkpointed with the state entering it (as NeuralMemory does on one rank), and the output stage
is checkpointed too: what stays between forward and backward is the gathered projections and the
outputs before the output norm, O(L·(4·H·d + 3·H)) per rank.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longctx.memory.titans import Gates, MemoryState, NeuralMemory, causal_conv, init_state, memory_scan
from longctx.parallel.comm import HeadsToSeq, SeqToHeads

Tensor = torch.Tensor


def _scan_heads(mem: NeuralMemory, tail: Tensor, p: Tensor, z: Tensor, w: Tensor,
                state: MemoryState) -> Tuple[Tensor, MemoryState]:
    """One piece for a head group: tail (B, h, K−1, 3d) the projections before it (zeros at the
    sequence start), p (B, h, T, 3d) its projections (per head: q, k, v channels), z (B, h, T, 3)
    its gate logits (η, θ, α), w (h, 1, 3d, K) the conv weights. Returns y (B, h, T, d), state."""
    B, h, T, C = p.shape
    d = C // 3
    act = F.silu(p + causal_conv(torch.cat([tail, p], 2), w, T))
    q, k, v = act.view(B, h, T, 3, d).unbind(3)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = Gates(F.logsigmoid(z[..., 0]), mem.max_lr * torch.sigmoid(z[..., 1]), F.logsigmoid(-z[..., 2]))
    return memory_scan(q, k, v, g, state, mem.chunk, mem.max_state_norm, mem.name, mem.max_lr)


def memory_ulysses(mem: NeuralMemory, x_BLD: Tensor, sp) -> Tensor:
    """The memory layer's output (B, L, D) for this rank's L tokens of a sequence sharded
    contiguously over the SP group `sp` (an SPHandle), by Ulysses over the memory heads."""
    B, L, _ = x_BLD.shape
    H, d, K, P, r = mem.heads, mem.head_dim, mem.kernel, sp.size, sp.rank
    if H % P:
        raise ValueError(f"{mem.name}: model.memory.sp_mode=ulysses needs the {H} memory heads divisible by "
                         f"parallel.sp={P}; use sp_mode=handoff or another head count")
    if sp.layout != "contiguous":
        raise ValueError(f"{mem.name}: memory under Ulysses needs the contiguous sequence layout, got {sp.layout!r}")
    h = H // P
    # channel order of qkv_proj is (q|k|v, head, dim) and of gate_proj (η|θ|α, head): regroup by head
    p = mem.qkv_proj(x_BLD).view(B, L, 3, H, d).permute(0, 3, 1, 2, 4).reshape(B, H, L, 3 * d)
    z = (mem.gate_proj(x_BLD) + mem.gate_bias).view(B, L, 3, H).permute(0, 3, 1, 2)  # (B, H, L, 3)
    p_h = SeqToHeads.apply(p.contiguous(), sp.group, "memory_ulysses")              # (B, h, P·L, 3d)
    z_h = SeqToHeads.apply(z.contiguous(), sp.group, "memory_ulysses")              # (B, h, P·L, 3)
    mine = slice(r * h, (r + 1) * h)
    w = mem.conv_weight.view(3, H, d, K)[:, mine].transpose(0, 1).reshape(h, 1, 3 * d, K).to(p_h.dtype)
    state = init_state(tuple(wi[mine].to(x_BLD.dtype) for wi in mem.init_w), B)
    tail = p_h.new_zeros(B, h, K - 1, 3 * d)
    R = mem.recompute if (mem.recompute and torch.is_grad_enabled()) else p_h.shape[2]
    ys = []
    n = len(state.weights)
    # split, not slicing per piece: each slice's backward would fill a zero tensor of p_h's size
    for p_i, z_i in zip(p_h.split(R, 2), z_h.split(R, 2)):
        if R < p_h.shape[2]:
            def piece(tail, p_i, z_i, *flat):
                y, st = _scan_heads(mem, tail, p_i, z_i, w, MemoryState(tuple(flat[:n]), tuple(flat[n:])))
                return (y, *st.weights, *st.momentum)
            # pieces are multiples of the chunk (config), so every piece but the last ends on a
            # chunk boundary: the state it hands on is weights and momentum alone
            res = checkpoint(piece, tail, p_i, z_i, *state.weights, *state.momentum, use_reentrant=False)
            y, state = res[0], MemoryState(tuple(res[1:1 + n]), tuple(res[1 + n:]))
        else:
            y, state = _scan_heads(mem, tail, p_i, z_i, w, state)
        ys.append(y)
        tail = p_i[:, :, p_i.shape[2] - (K - 1):] if p_i.shape[2] >= K - 1 else \
            torch.cat([tail, p_i], 2)[:, :, -(K - 1):]
    y = HeadsToSeq.apply(torch.cat(ys, 2), sp.group, "memory_ulysses")               # (B, H, L, d)
    if mem.recompute and torch.is_grad_enabled():
        return checkpoint(mem.output, y, x_BLD, use_reentrant=False)
    return mem.output(y, x_BLD)
