"""Lightning attention (linear attention with per-head decay) in plain torch: the CPU path and
the specification the Triton kernel is tested against.

One forward primitive serves forward and backward (the backward is three calls of it on
time-reversed inputs, see kernels/lightning.py). Per head h with lam = exp(-decay_h), for a
segment [s, e] (a batch row, or a packed document of `cu_seqlens`) and t in it:

    o_t   = sum_{s<=j<=t} lam^(t-j) (q_t . k_j) v_j  +  lam^(t-s+off) q_t @ init_seg
    final = sum_{s<=j<=e} lam^(e-j) k_j^T v_j        +  lam^(e-s+off) init_seg

Tiling as in Lightning Attention-2: chunks of C tokens; inside a chunk the masked quadratic
form ((Q K^T) * D) V; across chunks a running (K x V) state, here computed for all chunks at
once by a two-level scan (`decay_scan`) instead of a loop over chunks, so the cost per token is
constant. Every decay factor is exp of a non-positive number: nothing overflows, and a large
decay underflows to an exact 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def decay_scan(rate: Tensor, pos: Tensor, R: Tensor, X: Tensor, block: int = 64) -> Tensor:
    """Inclusive scan Y_n = sum_{i<=n, R_i == R_n} exp(-rate * (pos_n - pos_i)) X_i, vectorised.

    rate: (1 or B, H) decay per unit of position; pos: (N,) int64 non-decreasing positions;
    R: (B, N) non-decreasing reset counters (the recurrence restarts where R changes);
    X: (B, H, N, F). Position differences are formed in int64 before the multiply, so weights
    stay exact at any length (an absolute exponent rate * pos in fp32 would lose digits to
    cancellation: 0.6% at 1M tokens). Blocks of `block` are scanned with one batched matmul each;
    block totals are scanned recursively (depth log_block N) and carried into the next block with
    one in-place multiply-add.
    """
    B, H, N, F = X.shape
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    r = rate.to(X.dtype)

    def weights(dp: Tensor, keep: Tensor) -> Tensor:
        """exp(-rate * dp) where keep, else 0; dp: int64 (..., ) broadcast after (Bd, H)."""
        e = torch.exp(-r.view(r.shape + (1,) * dp.dim()) * dp.clamp(min=0).to(X.dtype))
        return torch.where(keep, e, zero)

    if N <= block:
        keep = (R[:, :, None] == R[:, None, :]).tril()[:, None]  # (B, 1, N, N)
        return weights(pos[:, None] - pos[None, :], keep) @ X
    G = N // block  # full blocks; a shorter tail block is scanned on its own
    n = G * block
    Y = torch.empty(X.shape, dtype=X.dtype, device=X.device)  # contiguous whatever X's strides
    pb, Rb = pos[:n].view(G, block), R[:, :n].reshape(B, G, block)
    keep = (Rb[..., :, None] == Rb[..., None, :]).tril()[:, None]  # (B, 1, G, M, M)
    Yb = Y[:, :, :n].view(B, H, G, block, F)
    torch.matmul(weights(pb[:, :, None] - pb[:, None, :], keep), X[:, :, :n].reshape(B, H, G, block, F), out=Yb)
    if n < N:
        Y[:, :, n:] = decay_scan(rate, pos[n:], R[:, n:], X[:, :, n:], block)
    # carry the inclusive total of everything before each block into the block
    ends = torch.arange(block - 1, N, block, device=X.device)
    if n < N:
        ends = torch.cat([ends, ends.new_tensor([N - 1])])
    Z = decay_scan(rate, pos[ends], R[:, ends].contiguous(), Y[:, :, ends], block)  # (B, H, Gt, F)
    starts = torch.arange(block, N, block, device=X.device)  # blocks that have a predecessor
    pprev, Rprev = pos[starts - 1], R[:, starts - 1]  # (Gt-1,), (B, Gt-1)
    if G > 1:  # full blocks 1..G-1: broadcast each predecessor's total over the block (no gather)
        f = weights(pb[1:] - pprev[:G - 1, None], (Rb[:, 1:] == Rprev[:, :G - 1, None])[:, None])  # (B, H, G-1, M)
        Yb[:, :, 1:].addcmul_(f[..., None], Z[:, :, :G - 1, None, :])
    if n < N:  # the tail block
        f = weights(pos[n:] - pprev[-1], (R[:, n:] == Rprev[:, -1:])[:, None])  # (B, H, N-n)
        Y[:, :, n:].addcmul_(f[..., None], Z[:, :, -2:-1, :])
    return Y


def _segments(B: int, T: int, cu_seqlens: Optional[Tensor], device):
    """Per-position segment id (B, T) and per segment: row, start, end (inclusive)."""
    if cu_seqlens is None:
        seg = torch.arange(B, device=device)[:, None].expand(B, T)
        starts = torch.zeros(B, dtype=torch.long, device=device)
        return seg, torch.arange(B, device=device), starts, torch.full((B,), T - 1, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = torch.searchsorted(cu[1:], torch.arange(T, device=device), right=True)[None]  # (1, T)
    n = cu.numel() - 1
    return seg, torch.zeros(n, dtype=torch.long, device=device), cu[:-1], cu[1:] - 1


def lightning_fwd_torch(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, init: Optional[Tensor] = None,
                        init_offset: int = 1, cu_seqlens: Optional[Tensor] = None, want_final: bool = False,
                        chunk: int = 64, q_scale: float = 1.0, k_scale: float = 1.0, reverse: bool = False,
                        group_elems: int = 1 << 24) -> Tuple[Tensor, Optional[Tensor]]:
    """The primitive above. q, k: (B, H, T, K); v: (B, H, T, V); decay: (H,) >= 0; init:
    (S, H, K, V) or None with S = B (rows) or N (documents of cu_seqlens, B == 1).
    Returns o (B, H, T, V) in v's dtype and, if want_final, final (S, H, K, V) in fp32
    (fp64 for fp64 inputs). Inputs are assumed validated (kernels/lightning.py does it).

    q_scale / k_scale multiply q / k; reverse=True runs on the time-reversed inputs (documents
    in reverse order) and returns outputs in reversed time too, as if the caller had flipped.
    Both are applied here, a group of heads at a time, so that long sequences need no
    full-size scaled or flipped copies (the backward's three calls use them)."""
    B, H, T, K = q.shape
    hg = max(1, min(H, group_elems // max(1, B * T * max(K, v.shape[-1]))))
    cu = cu_seqlens
    if reverse and cu is not None:
        cu = (T - cu).flip(0)
    per_doc = cu_seqlens is not None

    def prep(x, sl):
        return x[:, sl].flip(2) if reverse else x[:, sl]

    o_all = torch.empty(B, H, T, v.shape[-1], dtype=v.dtype, device=v.device)  # written per group, no cat
    finals = []
    for h0 in range(0, H, hg):
        sl = slice(h0, min(H, h0 + hg))
        ii = None
        if init is not None:
            ii = init[:, sl]
            if reverse and per_doc:
                ii = ii.flip(0)
        og, fg = _fwd(prep(q, sl), prep(k, sl), prep(v, sl), decay[sl], ii, init_offset, cu, want_final, chunk,
                      q_scale, k_scale)
        o_all[:, sl] = og.flip(2) if reverse else og
        del og
        if fg is not None:
            finals.append(fg.flip(0) if reverse and per_doc else fg)
    return o_all, (torch.cat(finals, dim=1) if finals else None)


def _fwd(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, init: Optional[Tensor], init_offset: int,
         cu_seqlens: Optional[Tensor], want_final: bool, chunk: int, q_scale: float = 1.0, k_scale: float = 1.0,
         tile_elems: int = 1 << 21) -> Tuple[Tensor, Optional[Tensor]]:
    """The primitive on one group of heads, in the given time order; scales applied after the
    upcast (scaling bf16 inputs in bf16 would round once more)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    q = q * q_scale if q_scale != 1.0 else q
    k = k * k_scale if k_scale != 1.0 else k
    C = max(1, min(chunk, T))
    N = -(-T // C)
    pad = N * C - T
    seg, seg_row, seg_start, seg_end = _segments(B, T, cu_seqlens, dev)
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        seg = torch.cat([seg, seg.new_full((seg.shape[0], pad), -1)], dim=1)
    qc, kc, vc = q.view(B, H, N, C, K), k.view(B, H, N, C, K), v.view(B, H, N, C, V)
    segc = seg.view(B, N, C)
    ar = torch.arange(C, device=dev, dtype=cdt)
    zero = torch.zeros((), dtype=cdt, device=dev)

    docs = cu_seqlens is not None  # without documents every mask below is all-true: skip them
    last_seg = segc[:, :, -1]  # (B, N) segment running at each chunk end (-1: padding)
    # Work goes head by head, in slices of chunks sized to stay in cache: each slice of one head is
    # contiguous, so the batched matmuls read it in place (no strided copies), and the cost per
    # token stays flat as T grows. Each step is vectorised over thousands of tokens.
    step = max(1, tile_elems // (C * max(C, K, V)))
    BH = B * H
    qf, kf, vf = qc.reshape(BH, N, C, K), kc.reshape(BH, N, C, K), vc.reshape(BH, N, C, V)
    slices = [(bh, n0, min(N, n0 + step)) for bh in range(BH) for n0 in range(0, N, step)]
    dec_h = decay.to(dev, cdt)

    # --- chunk states: dS_n = (K_n * lam^(C-1-j))^T V_n, only tokens of the chunk's last segment --
    w_end = torch.exp(-dec_h[:, None] * (C - 1 - ar))[:, None, :, None]  # (H, 1, C, 1): lam^(C-1-j)
    dS = torch.empty(BH, N, K, V, dtype=cdt, device=dev)
    for bh, n0, n1 in slices:
        kw = kf[bh, n0:n1] * w_end[bh % H]
        if docs:
            kw.mul_((segc[bh // H, n0:n1] == last_seg[bh // H, n0:n1, None])[..., None])
        torch.matmul(kw.transpose(-1, -2), vf[bh, n0:n1], out=dS[bh, n0:n1])
    X = dS.view(B, H, N, K * V)
    seg_first_chunk = seg_start // C
    seg_first_off = seg_start % C
    if init is not None:
        # inject each segment's initial state in the chunk where it starts, if still running there
        init_c = init.to(cdt)
        runs = last_seg[seg_row, seg_first_chunk] == torch.arange(seg_row.numel(), device=dev)  # (S,)
        e = (C - 1 - seg_first_off + init_offset).to(cdt)  # (S,)
        J = torch.exp(-dec_h[None, :] * e[:, None])[..., None, None] * init_c  # (S, H, K, V)
        J = J * runs[:, None, None, None]
        X = _inject(X, seg_row, seg_first_chunk, J.reshape(-1, H, K * V))
    Rch = torch.cat([torch.zeros_like(last_seg[:, :1]), (last_seg[:, 1:] != last_seg[:, :-1]).long()], 1).cumsum(1)
    Sinc = decay_scan(dec_h[None], C * torch.arange(N, device=dev), Rch, X)  # (B, H, N, K*V) after chunk n
    del X, dS
    Sf = Sinc.view(BH, N, K, V)

    # --- per slice: intra ((Q K^T) * D) V plus inter lam^(i+1) Q P_n (P_n: state entering chunk n) ---
    o = torch.empty(BH, N, C, V, dtype=cdt, device=dev)
    Dm = torch.exp(-dec_h[:, None, None] * (ar[:, None] - ar[None, :]).clamp(min=0)) * (ar[:, None] >= ar[None, :])
    w_in = torch.exp(-dec_h[:, None] * (ar + 1))[:, None, :, None]  # (H, 1, C, 1): lam^(i+1)
    prev_last = torch.cat([last_seg.new_full((B, 1), -2), last_seg[:, :-1]], dim=1)  # (B, N)
    for bh, n0, n1 in slices:
        b, h = bh // H, bh % H
        A = torch.matmul(qf[bh, n0:n1], kf[bh, n0:n1].transpose(-1, -2))  # (n, C, C)
        A.mul_(Dm[h])
        if docs:
            A.mul_(segc[b, n0:n1, :, None] == segc[b, n0:n1, None, :])
        oc = o[bh, n0:n1]
        torch.matmul(A, vf[bh, n0:n1], out=oc)
        del A
        p0 = max(n0, 1)  # chunk 0 has nothing before it
        if p0 < n1:
            qw = qf[bh, p0:n1] * w_in[h]
            if docs:
                qw.mul_((segc[b, p0:n1] == prev_last[b, p0:n1, None])[..., None])
            oc[p0 - n0:].baddbmm_(qw, Sf[bh, p0 - 1:n1 - 1])
    o = o.view(B, H, N, C, V)

    # --- initial states of segments starting inside a chunk -----------------------------------------
    if init is not None:
        qs = qc[seg_row, :, seg_first_chunk]  # (S, H, C, K)
        ys = qs @ init_c  # (S, H, C, V)
        rel = ar[None, :] - seg_first_off[:, None].to(cdt)  # (S, C)
        sid = torch.arange(seg_row.numel(), device=dev)
        mine = (segc[seg_row, seg_first_chunk] == sid[:, None])  # (S, C)
        w = torch.where(mine[:, None], torch.exp(-decay.to(dev, cdt)[None, :, None] * (rel[:, None] + init_offset)
                                                  .clamp(min=0)), zero)  # (S, H, C)
        o = _add_rows(o, seg_row, seg_first_chunk, ys * w[..., None])
    out = o.reshape(B, H, N * C, V)[:, :, :T].to(out_dtype)

    final = None
    if want_final:
        S = seg_row.numel()
        ce, re_ = seg_end // C, seg_end % C  # chunk and offset of each segment's last token
        sid = torch.arange(S, device=dev)
        kl, vl = kc[seg_row, :, ce], vc[seg_row, :, ce]  # (S, H, C, K|V)
        mine = (segc[seg_row, ce] == sid[:, None]) & (ar[None, :] <= re_[:, None].to(cdt))  # (S, C)
        dl = (re_[:, None].to(cdt) - ar[None, :]).clamp(min=0)
        w = torch.where(mine[:, None], torch.exp(-decay.to(dev, cdt)[None, :, None] * dl[:, None]), zero)
        final = (kl * w[..., None]).transpose(-1, -2) @ vl  # (S, H, K, V)
        started_before = seg_first_chunk < ce
        wp = torch.exp(-decay.to(dev, cdt)[None, :] * (re_[:, None].to(cdt) + 1)) * started_before[:, None]
        # state entering each last chunk: the scan's state after the chunk before (none for chunk 0;
        # wp is 0 there), gathered per segment rather than copying every chunk's state
        P_end = Sinc[seg_row, :, (ce - 1).clamp(min=0)].view(S, H, K, V)
        final = final + wp[..., None, None] * P_end
        if init is not None:
            here = ~started_before
            wi = torch.exp(-decay.to(dev, cdt)[None, :] * (re_ - seg_first_off + init_offset)[:, None].to(cdt))
            final = final + (wi * here[:, None])[..., None, None] * init_c
    return out, final


def _inject(X: Tensor, rows: Tensor, chunks: Tensor, J: Tensor) -> Tensor:
    """X[rows[s], :, chunks[s]] += J[s] (several segments may share a chunk)."""
    B, H, N, F = X.shape
    flat = X.permute(0, 2, 1, 3).reshape(B * N, H, F)
    flat = flat.index_add(0, rows * N + chunks, J)
    return flat.view(B, N, H, F).permute(0, 2, 1, 3).contiguous()


def _add_rows(o: Tensor, rows: Tensor, chunks: Tensor, Y: Tensor) -> Tensor:
    """o[rows[s], :, chunks[s]] += Y[s]; o: (B, H, N, C, V), Y: (S, H, C, V)."""
    B, H, N, C, V = o.shape
    flat = o.permute(0, 2, 1, 3, 4).reshape(B * N, H, C, V)
    flat = flat.index_add(0, rows * N + chunks, Y)
    return flat.view(B, N, H, C, V).permute(0, 2, 1, 3, 4)


def lightning_naive(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, init: Optional[Tensor] = None,
                    init_offset: int = 1, cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The O(T^2) textbook formula in float64: the oracle of the tests. Returns (o, final)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, K = q.shape
    lam_log = -decay.double().view(1, H, 1, 1)
    seg, seg_row, starts, ends = _segments(B, T, cu_seqlens, q.device)
    t = torch.arange(T, dtype=torch.float64)
    same = (seg[:, :, None] == seg[:, None, :]) & (t[:, None] >= t[None, :])  # (B, T, T)
    W = torch.where(same[:, None], torch.exp(lam_log * (t[:, None] - t[None, :]).clamp(min=0)), 0.0)
    o = (q @ k.transpose(-1, -2) * W) @ v
    finals = []
    for s in range(seg_row.numel()):
        b, st, en = int(seg_row[s]), int(starts[s]), int(ends[s])
        w = torch.exp(lam_log[0, :, 0] * (en - t[st:en + 1]))  # (H, L)
        f = (k[b, :, st:en + 1] * w[..., None]).transpose(-1, -2) @ v[b, :, st:en + 1]
        if init is not None:
            rel = t[st:en + 1] - st + init_offset
            o[b, :, st:en + 1] += torch.exp(lam_log[0, :, 0] * rel)[..., None] * (q[b, :, st:en + 1] @ init[s].double())
            f = f + torch.exp(lam_log[0, :, 0, 0] * (en - st + init_offset))[:, None, None] * init[s].double()
        finals.append(f)
    return o, torch.stack(finals)
