"""Sequence parallelism for linear attention by passing states (the LASP idea).

Each SP rank holds a contiguous shard of every row. It runs lightning attention on its shard
with a zero initial state, keeping its final state F_r. The state entering rank r is an
exclusive prefix over ranks,

    S_in_r = sum_{m<r} g(m -> r) * lam^(T_loc * (r - 1 - m)) * F_m,

where g is 1 when the document running at the end of rank m continues, unbroken, to the start
of rank r (every rank in between holds a single, continuing document) and 0 otherwise. One
all-gather of the P final states gives every rank all it needs (no chain of P-1 waits as in
LASP-1); the backward is the same prefix transposed, one all-gather of the P state gradients.
Each rank then adds the correction scale * lam^(t+1) q_t @ S_in_r to the tokens of its first
document. Communication per layer and direction: P * B * H * K * V values, whatever the length.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from longctx.kernels.lightning import lightning_attn_rows
from longctx.parallel.comm import all_gather, send_recv, wait_all
from longctx.parallel.groups import SPHandle

Tensor = torch.Tensor


class _StatePrefix(torch.autograd.Function):
    """S_in = sum_m M[rank, m] F_m over the group; backward dF = sum_r M[r, rank] dS_r."""

    @staticmethod
    def forward(ctx, F, M, rank, group):
        G = all_gather(F, group, op="lightning_state")  # (P, B, H, K, V)
        ctx.save_for_backward(M)
        ctx.rank, ctx.group = rank, group
        return torch.einsum("mbh,mbhkv->bhkv", M[rank].to(G.dtype), G)

    @staticmethod
    def backward(ctx, dS):
        (M,) = ctx.saved_tensors
        Gd = all_gather(dS, ctx.group, op="lightning_state_grad")  # (P, B, H, K, V)
        return torch.einsum("rbh,rbhkv->bhkv", M[:, ctx.rank].to(Gd.dtype), Gd), None, None, None


class _RingPrefix(torch.autograd.Function):
    """The same prefix as a chain (LASP-1 style): rank r waits for rank r-1's outgoing state,
    S_in = cont * S_out[r-1], S_out = single * lam^T_loc * S_in + F, and sends S_out on.
    The backward runs the chain in reverse. P - 1 dependent hops per layer and direction."""

    @staticmethod
    def forward(ctx, F, lam_T, cont, single, sp):
        prev = sp.rank - 1 if sp.rank > 0 else None
        nxt = sp.rank + 1 if sp.rank < sp.size - 1 else None
        g = dist.get_global_rank
        S_prev = send_recv(None, None, F, g(sp.group, prev) if prev is not None else None, sp.group,
                           op="lightning_state_ring")
        S_in = torch.zeros_like(F) if S_prev is None else S_prev * cont[:, None, None, None].to(F.dtype)
        S_out = S_in * (single[:, None].to(F.dtype) * lam_T[None, :].to(F.dtype))[..., None, None] + F
        send_recv(S_out, g(sp.group, nxt) if nxt is not None else None, None, None, sp.group)
        ctx.save_for_backward(lam_T, cont, single)
        ctx.sp = sp
        return S_in

    @staticmethod
    def backward(ctx, dS_in):
        lam_T, cont, single = ctx.saved_tensors
        sp = ctx.sp
        g = dist.get_global_rank
        nxt = sp.rank + 1 if sp.rank < sp.size - 1 else None
        prev = sp.rank - 1 if sp.rank > 0 else None
        gout = send_recv(None, None, dS_in, g(sp.group, nxt) if nxt is not None else None, sp.group,
                         op="lightning_state_ring_grad")
        dS_out = torch.zeros_like(dS_in) if gout is None else gout
        total = dS_in + dS_out * (single[:, None].to(dS_in.dtype) * lam_T[None, :].to(dS_in.dtype))[..., None, None]
        send_recv(total * cont[:, None, None, None].to(total.dtype), g(sp.group, prev) if prev is not None else None,
                  None, None, sp.group)
        return dS_out, None, None, None, None


def _prefix_matrix(decay: Tensor, T_loc: int, cont: Tensor, single: Tensor) -> Tensor:
    """M (P, P, B, H): weight of rank m's final state in rank r's incoming state.

    cont[l, b]: rank l's first document continues rank l-1's last one; single[l, b]: rank l
    holds one document only (so a state passes through it)."""
    P, B = cont.shape
    H = decay.shape[0]
    M = torch.zeros(P, P, B, H, dtype=torch.float64, device=decay.device)
    lam_T = torch.exp(-decay.double() * T_loc)  # (H,) decay over one whole shard
    for r in range(1, P):  # P is small (the SP degree): a P x P table, not a loop over tokens
        ok = cont[r].clone()  # (B,)
        w = torch.ones(H, dtype=torch.float64, device=decay.device)
        for m in range(r - 1, -1, -1):
            M[r, m] = (ok.double()[:, None] * w[None, :])
            ok = ok & single[m] & cont[m]  # cont[0] is False: nothing comes before rank 0
            w = w * lam_T
    return M


def lightning_attn_sp(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, scale: float, sp: SPHandle,
                      doc_ids: Optional[Tensor] = None, mode: str = "allgather") -> Tensor:
    """Exact lightning attention of the whole sequence; each rank passes its contiguous shard.

    q, k: (B, H, T_loc, K); v: (B, H, T_loc, V); doc_ids: (B, T_loc) global document ids of
    this shard's tokens (equal ids across a shard boundary mean the same document), or None.
    mode: "allgather" (one collective) or "ring" (a chain of P - 1 hops); same result.
    Returns this shard's output (B, H, T_loc, V)."""
    if mode not in ("allgather", "ring"):
        raise ValueError(f"mode={mode!r}: use 'allgather' or 'ring'")
    if sp.layout != "contiguous":
        raise ValueError(f"lightning attention needs the contiguous sequence layout, got {sp.layout!r}")
    B, H, T_loc, K = q.shape
    o, F, first_len = lightning_attn_rows(q, k, v, decay, scale, doc_ids)
    if sp.size == 1:
        return o
    if doc_ids is None:
        ends = torch.zeros(B, 2, dtype=torch.long, device=q.device)
    else:
        ends = torch.stack([doc_ids[:, 0], doc_ids[:, -1]], dim=1)  # (B, 2) first / last document
    E = all_gather(ends, sp.group, op="lightning_doc_ids")  # (P, B, 2)
    cont = torch.zeros(sp.size, B, dtype=torch.bool, device=q.device)
    cont[1:] = E[1:, :, 0] == E[:-1, :, 1]
    single = E[:, :, 0] == E[:, :, 1]
    F = F.float() if F.dtype != torch.float64 else F
    if mode == "ring":
        lam_T = torch.exp(-decay.to(F.dtype) * T_loc)
        S_in = _RingPrefix.apply(F, lam_T, cont[sp.rank], single[sp.rank], sp)
    else:
        S_in = _StatePrefix.apply(F, _prefix_matrix(decay, T_loc, cont, single), sp.rank, sp.group)
    return o + _Correction.apply(q, S_in, decay, first_len, float(scale))


class _Correction(torch.autograd.Function):
    """corr_t = scale * w_t q_t @ S_in with w_t = lam^(t+1) on the tokens of each row's first
    document (0 elsewhere): the incoming state's contribution. Computed `step` tokens at a time in
    S_in's dtype and returned in q's; keeps nothing for backward but q (which the kernel keeps
    anyway), S_in and the small (B,) / (H,) inputs: autograd would keep an fp32 copy of q * w."""
    step = 16384

    @staticmethod
    def _w(decay, first_len, a, b, dtype, device):
        t = torch.arange(a, b, device=device)
        in_first = t[None, :] < first_len[:, None]  # (B, b - a)
        return torch.exp(-decay.to(dtype)[None, :, None] * (t + 1).to(dtype)) * in_first[:, None]  # (B, H, n)

    @staticmethod
    def forward(ctx, q, S_in, decay, first_len, scale):
        ctx.save_for_backward(q, S_in, decay, first_len)
        ctx.scale = scale
        T = q.shape[2]
        out = torch.empty(q.shape[:3] + (S_in.shape[-1],), dtype=q.dtype, device=q.device)
        for a in range(0, T, _Correction.step):
            b = min(T, a + _Correction.step)
            w = _Correction._w(decay, first_len, a, b, S_in.dtype, q.device) * scale
            out[:, :, a:b] = ((q[:, :, a:b].to(S_in.dtype) * w[..., None]) @ S_in).to(q.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.needs_input_grad[2]:  # decay is a fixed buffer today; a learnt decay needs its term here
            raise NotImplementedError("lightning SP correction: no gradient for a decay that requires grad")
        q, S_in, decay, first_len = ctx.saved_tensors
        T = q.shape[2]
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dS = torch.zeros_like(S_in) if ctx.needs_input_grad[1] else None
        St = S_in.transpose(-1, -2)
        for a in range(0, T, _Correction.step):
            b = min(T, a + _Correction.step)
            w = _Correction._w(decay, first_len, a, b, S_in.dtype, q.device) * ctx.scale
            gc = g[:, :, a:b].to(S_in.dtype)
            if dq is not None:
                dq[:, :, a:b] = ((gc @ St) * w[..., None]).to(q.dtype)
            if dS is not None:
                dS += (q[:, :, a:b].to(S_in.dtype) * w[..., None]).transpose(-1, -2) @ gc
        return dq, dS, None, None, None


# -- recurrent state handed from rank to rank (Titans memory) ----------------------------------
# A non-linear recurrence (the MLP memory) cannot be combined by a prefix like the linear state
# above: rank r must start from rank r-1's final state. Forward: receive it, run the shard, send
# the final state on. Backward: the reverse chain, gradients of the received state go back to
# the sender. Per layer the chain costs P - 1 dependent hops, but consecutive layers pipeline:
# rank r-1 runs layer l+1 while rank r runs layer l.


class _RecvState(torch.autograd.Function):
    """Forward: the state from the previous rank (tensors shaped like `like`). Backward: their
    gradients are sent back to it."""

    @staticmethod
    def forward(ctx, anchor, sp, op, *like):
        ctx.sp, ctx.op = sp, op
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in like]
        src = dist.get_global_rank(sp.group, sp.rank - 1)
        bufs = [torch.empty_like(t) for t in like]
        ops = [dist.P2POp(dist.irecv, b, src, group=sp.group) for b in bufs]
        wait_all(dist.batch_isend_irecv(ops))
        from longctx.parallel.comm import COMM
        COMM.add(op, sum(b.numel() * b.element_size() for b in bufs))
        return tuple(bufs)

    @staticmethod
    def backward(ctx, *grads):
        sp = ctx.sp
        dst = dist.get_global_rank(sp.group, sp.rank - 1)
        gs = [torch.zeros(s, dtype=d, device=dev) if g is None else g.contiguous()  # unused parts: zero
              for g, (s, d, dev) in zip(grads, ctx.shapes)]
        ops = [dist.P2POp(dist.isend, g, dst, group=sp.group) for g in gs]
        wait_all(dist.batch_isend_irecv(ops))
        return (None, None, None) + (None,) * len(grads)


class _SendState(torch.autograd.Function):
    """Forward: send the final state to the next rank; returns a zero scalar to add to the
    output (so the backward runs). Backward: receive the state's gradients from the next rank."""

    @staticmethod
    def forward(ctx, sp, op, *state):
        ctx.sp, ctx.op = sp, op
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in state]
        dst = dist.get_global_rank(sp.group, sp.rank + 1)
        ops = [dist.P2POp(dist.isend, t.detach().contiguous(), dst, group=sp.group) for t in state]
        wait_all(dist.batch_isend_irecv(ops))
        return state[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        sp = ctx.sp
        src = dist.get_global_rank(sp.group, sp.rank + 1)
        bufs = [torch.empty(s, dtype=d, device=dev) for s, d, dev in ctx.shapes]
        ops = [dist.P2POp(dist.irecv, b, src, group=sp.group) for b in bufs]
        wait_all(dist.batch_isend_irecv(ops))
        from longctx.parallel.comm import COMM
        COMM.add(ctx.op + "_grad", sum(b.numel() * b.element_size() for b in bufs))
        return (None, None) + tuple(bufs)


def hand_off(run, init_state, sp: SPHandle, op: str = "memory_state"):
    """Run a recurrence sequence-parallel and exactly: out, final = run(state_in) where
    state_in is rank r-1's final state (rank 0: init_state). States are flat lists of tensors
    of fixed shapes (every rank the same). Returns out with the hand-off attached to its graph.
    Contiguous layout only (rank order is sequence order)."""
    if sp.layout != "contiguous":
        raise ValueError(f"state hand-off needs the contiguous sequence layout, got {sp.layout!r}")
    if sp.rank > 0:
        anchor = torch.zeros((), requires_grad=True)
        state_in = list(_RecvState.apply(anchor, sp, op, *[t.detach() for t in init_state]))
    else:
        state_in = list(init_state)
    out, final = run(state_in)
    if sp.rank > 0:
        # The initial state's parameters are unused here; ZeRO 1-3 reduce only gradients whose
        # hooks fired, so give them an exact zero gradient to keep every rank's buckets alike.
        out = out + sum((t * 0).sum() for t in init_state if t.requires_grad)
    if sp.rank < sp.size - 1:
        out = out + _SendState.apply(sp, op, *final)
    return out
