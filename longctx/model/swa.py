"""The `swa` mixer: sliding-window causal softmax attention (window `model.swa_window`: token i
sees tokens i - window < j <= i), grouped-query heads and RoPE at global positions, over the
`flash_attn` dispatch (the torch path visits only the key blocks inside the window, so the cost
per token is constant at any length).

Under sequence parallelism (contiguous layout) a rank needs the window - 1 keys and values
before its first token: a halo exchange. Every rank sends its last window - 1 keys/values to
rank r + 1 and receives rank r - 1's, all at once (no chain of waits); the backward sends the
gradients of the received keys/values back. Bytes per layer and direction: 2 (window - 1)
Hkv hd values per row. Exact (tests: SP=2 equals one process).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from longctx.kernels.flash import flash_attn
from longctx.parallel.comm import wait_all
from longctx.model.mixers import register_mixer
from longctx.model.softmax import SoftmaxAttention

Tensor = torch.Tensor


def _exchange(sp, send, like, op: str):
    """Send `send` (a list of tensors, or None) to rank r + 1 and receive tensors shaped like
    `like` from rank r - 1, in one batch (every rank both at once: no chain). Ranks without a
    neighbour on one side skip that side. Returns the received list, or None on rank 0."""
    g = dist.get_global_rank
    ops, bufs = [], None
    if send is not None and sp.rank < sp.size - 1:
        ops += [dist.P2POp(dist.isend, t.contiguous(), g(sp.group, sp.rank + 1), group=sp.group) for t in send]
    if sp.rank > 0:
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
        ops += [dist.P2POp(dist.irecv, b, g(sp.group, sp.rank - 1), group=sp.group) for b in bufs]
    if ops:
        wait_all(dist.batch_isend_irecv(ops))
    if bufs:
        from longctx.parallel.comm import COMM
        COMM.add(op, sum(b.numel() * b.element_size() for b in bufs))
    return bufs


def _exchange_back(sp, send, like, op: str):
    """The reverse direction: send to rank r - 1, receive from rank r + 1 (None on the last rank)."""
    g = dist.get_global_rank
    ops, bufs = [], None
    if send is not None and sp.rank > 0:
        ops += [dist.P2POp(dist.isend, t.contiguous(), g(sp.group, sp.rank - 1), group=sp.group) for t in send]
    if sp.rank < sp.size - 1:
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
        ops += [dist.P2POp(dist.irecv, b, g(sp.group, sp.rank + 1), group=sp.group) for b in bufs]
    if ops:
        wait_all(dist.batch_isend_irecv(ops))
    if bufs:
        from longctx.parallel.comm import COMM
        COMM.add(op, sum(b.numel() * b.element_size() for b in bufs))
    return bufs


class _Halo(torch.autograd.Function):
    """Forward: send `tails` to the next rank, receive the previous rank's (empty along dim 2 on
    rank 0). Backward: the gradients of what was received go back to the previous rank; the
    gradients of what was sent arrive from the next one (zero on the last rank)."""

    @staticmethod
    def forward(ctx, sp, op, *tails):
        ctx.sp, ctx.op = sp, op
        ctx.meta = [(t.shape, t.dtype, t.device) for t in tails]
        got = _exchange(sp, [t.detach() for t in tails], tails, op)
        if got is None:  # rank 0: nothing before it
            got = [t.new_empty(t.shape[:2] + (0,) + t.shape[3:]) for t in tails]
        return tuple(got)

    @staticmethod
    def backward(ctx, *grads):
        sp = ctx.sp
        like = [torch.empty(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
        send = None
        if sp.rank > 0:
            send = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]
        got = _exchange_back(sp, send, like, ctx.op + "_grad")
        if got is None:  # the last rank's tail went nowhere
            got = [torch.zeros_like(t) for t in like]
        return (None, None) + tuple(got)


def halo(sp, op: str, *tails: Tensor):
    """The previous rank's `tails` (autograd-aware; see _Halo)."""
    return _Halo.apply(sp, op, *tails)


@register_mixer("swa")
class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention over the last `model.swa_window` tokens (itself included)."""
    supports_sp = True  # halo exchange of the window's keys/values
    sp_layouts = ("contiguous",)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int):
        """q, k, v, o projections; QK^T and AV over min(window, seq_len) keys per query (the
        mask's exact count, not the tiles the torch path computes)."""
        d = cfg.d_model
        kv = (cfg.n_kv_heads or cfg.n_heads) * (d // cfg.n_heads)
        w = min(cfg.swa_window, seq_len)
        return 2 * d * d + 2 * d * kv, 4 * w * d

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.window = int(cfg.swa_window)
        # tile of the torch path's tile loop, used only where the banded path does not apply
        # (windows above flash_torch.BAND_MAX_WINDOW); the Triton kernel picks its own tiles
        self.block = 256

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        q, k, v = self.project(x_BLD, ctx)
        B, _, L, _ = q.shape
        pos = ctx.positions
        if pos.dim() == 2 and pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
            raise ValueError("swa: ctx.positions must be the same for every batch row")
        pos = pos.reshape(-1, L)[0]
        doc = ctx.doc_ids
        k_pos, k_doc = pos, doc
        keep = self.window - 1
        if ctx.sp is not None and ctx.sp.size > 1 and keep > 0:
            if ctx.sp.layout != "contiguous":
                raise ValueError(f"swa: needs the contiguous sequence layout, got {ctx.sp.layout!r}")
            if L < keep:
                raise ValueError(f"swa: a shard of {L} tokens is shorter than model.swa_window - 1 = {keep}: "
                                 f"use fewer ranks, a longer sequence or a smaller window")
            tk, tv = halo(ctx.sp, "swa_halo", k[:, :, L - keep:], v[:, :, L - keep:])
            n = tk.shape[2]  # 0 on rank 0
            k, v = torch.cat([tk, k], 2), torch.cat([tv, v], 2)
            k_pos = torch.cat([pos[0] - n + torch.arange(n, device=pos.device), pos])
            if doc is not None:
                td = _exchange(ctx.sp, [doc[:, L - keep:]], [doc[:, L - keep:]], "swa_halo_docs")
                k_doc = torch.cat([td[0] if td else doc[:, :0], doc], 1)
        o, _ = flash_attn(q, k, v, causal=True, window=self.window, doc_ids=None if doc is None else (doc, k_doc),
                          q_pos=pos, k_pos=k_pos, block=self.block)
        return self.merge(o)

