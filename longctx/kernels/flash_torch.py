"""Softmax attention with log-sum-exp, tile by tile, in plain torch: the CPU path of
`flash_attn` and the specification a Triton kernel will be tested against (issue 4).

    o_i = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j,    lse_i = log sum_j exp(scale * q_i . k_j + mask_ij)

Only one (query block x key block) score tile exists at a time (memory linear in length); key
blocks a query block cannot see (causal, window) are never computed. Grouped-query heads:
the G query heads of a KV head are stacked as rows of one matmul, so K/V are never repeated.
Masks come from global positions (so shards of a sequence, as ring attention passes them,
mask correctly) and optional document ids. A query row that sees no key gets o = 0 and
lse = -inf (never NaN), which is what a log-sum-exp merge of partial results needs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _tile_mask(qp: Tensor, kp: Tensor, qd: Optional[Tensor], kd: Optional[Tensor], causal: bool,
               window: Optional[int]) -> Optional[Tensor]:
    """Boolean (Bd, 1, 1, bq, bk) allowed-mask of one tile, or None when everything is allowed."""
    m = None
    if causal:
        m = kp[None, :] <= qp[:, None]
    if window is not None:
        w = (qp[:, None] - kp[None, :]) < window
        if not causal:
            w = w & ((kp[None, :] - qp[:, None]) < window)
        m = w if m is None else m & w
    if m is not None:
        m = m[None, None, None]
    if qd is not None:
        d = (qd[:, :, None] == kd[:, None, :])[:, None, None]  # (B, 1, 1, bq, bk)
        m = d if m is None else m & d
    return m


def _visible(qp: Tensor, kp: Tensor, causal: bool, window: Optional[int]) -> bool:
    """Can any query of this block see any key of that block (positions only)?"""
    if causal and int(kp.min()) > int(qp.max()):
        return False
    if window is not None:
        if int(qp.min()) - int(kp.max()) >= window:
            return False
        if not causal and int(kp.min()) - int(qp.max()) >= window:
            return False
    return True


def _visible_blocks(q_pos: Tensor, k_pos: Tensor, Tq: int, Tk: int, block: int, causal: bool,
                    window: Optional[int]):
    """For each query block (qs, qe), the key blocks (ks, ke) it can see (the same test as
    `_visible`), with every block's position range read once as Python ints. When the key blocks'
    positions are non-decreasing (contiguous shards, any ring piece in order) the candidates are
    found by bisection, so a causal sliding window costs O(Tq / block) blocks, not O(Tq·Tk / block²)
    Python-level tests (at 1M tokens the tests alone took minutes)."""
    import bisect

    def ranges(pos: Tensor, T: int):
        bl = _blocks(T, block)
        n_full = T // block
        mins, maxs = [], []
        if n_full:
            v = pos[:n_full * block].view(n_full, block)
            mins, maxs = v.amin(1).tolist(), v.amax(1).tolist()
        if n_full * block < T:
            tail = pos[n_full * block:]
            mins.append(int(tail.min()))
            maxs.append(int(tail.max()))
        return bl, mins, maxs

    qb, qmin, qmax = ranges(q_pos, Tq)
    kb, kmin, kmax = ranges(k_pos, Tk)
    ordered = all(a <= b for a, b in zip(kmin, kmin[1:])) and all(a <= b for a, b in zip(kmax, kmax[1:]))

    def ok(i: int, j: int) -> bool:
        if causal and kmin[j] > qmax[i]:
            return False
        if window is not None:
            if qmin[i] - kmax[j] >= window:
                return False
            if not causal and kmin[j] - qmax[i] >= window:
                return False
        return True

    out = []
    for i, qr in enumerate(qb):
        lo, hi = 0, len(kb)
        if ordered:
            if window is not None:  # kmax[j] > qmin - window
                lo = bisect.bisect_right(kmax, qmin[i] - window)
            if causal:  # kmin[j] <= qmax
                hi = bisect.bisect_right(kmin, qmax[i])
            elif window is not None:  # kmin[j] < qmax + window
                hi = bisect.bisect_left(kmin, qmax[i] + window)
        out.append((qr, [kb[j] for j in range(lo, hi) if ok(i, j)]))
    return out


def online_softmax_step(m: Tensor, l: Tensor, acc: Tensor, s: Tensor, v: Tensor):
    """One key tile of the running softmax: s (..., bq, bk) scores (-inf = masked), v (B, Hkv,
    bk, Dv); m, l (..., bq) running max and sum, acc (..., bq, Dv). Returns the new (m, l, acc)."""
    m_new = torch.maximum(m, s.amax(-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
    p = torch.exp(s - safe[..., None])
    corr = torch.exp(m - safe)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, v)


def online_softmax_finish(m: Tensor, l: Tensor, acc: Tensor):
    """(o, lse) of a finished running softmax; rows that saw no key: o = 0, lse = -inf."""
    empty = l == 0
    o = torch.where(empty[..., None], torch.zeros_like(acc), acc / l.clamp_min(1e-300)[..., None])
    return o, torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l.clamp_min(1e-300)))


def _blocks(T: int, b: int):
    return [(s, min(T, s + b)) for s in range(0, T, b)]


def flash_fwd_torch(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window: Optional[int],
                    q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor], k_doc: Optional[Tensor],
                    block: int = 256) -> Tuple[Tensor, Tensor]:
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D|Dv). Returns o (B, H, Tq, Dv) in q's dtype and
    lse (B, H, Tq) in fp32 (fp64 for fp64 inputs)."""
    n = band_offset(q_pos, k_pos, causal, window) if window is not None and window <= BAND_MAX_WINDOW else None
    if n is not None:  # a causal sliding window over contiguous positions: the banded path
        return band_fwd_torch(q, k, v, scale, window, n, q_doc, k_doc)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.view(B, Hkv, G, Tq, D)
    o = torch.empty(B, Hkv, G, Tq, Dv, dtype=cdt, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=cdt, device=q.device)
    for (qs, qe), kbs in _visible_blocks(q_pos, k_pos, Tq, Tk, block, causal, window):
        qt = qg[:, :, :, qs:qe].to(cdt) * scale  # (B, Hkv, G, bq, D)
        m = torch.full((B, Hkv, G, qe - qs), -math.inf, dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, G, qe - qs, Dv, dtype=cdt, device=q.device)
        for ks, ke in kbs:
            s = torch.einsum("bhgqd,bhkd->bhgqk", qt, k[:, :, ks:ke].to(cdt))
            mask = _tile_mask(q_pos[qs:qe], k_pos[ks:ke], None if q_doc is None else q_doc[:, qs:qe],
                              None if k_doc is None else k_doc[:, ks:ke], causal, window)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m, l, acc = online_softmax_step(m, l, acc, s, v[:, :, ks:ke].to(cdt))
        o[:, :, :, qs:qe], lse[:, :, :, qs:qe] = online_softmax_finish(m, l, acc)
    return o.view(B, H, Tq, Dv).to(q.dtype), lse.view(B, H, Tq)


def flash_bwd_torch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                    scale: float, window: Optional[int], q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor],
                    k_doc: Optional[Tensor], block: int = 256, dlse: Optional[Tensor] = None,
                    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None):
    """Gradients (dq, dk, dv) by recomputing each tile's probabilities from lse.
    dlse (B, H, Tq): gradient flowing into lse (ring merges use it), or None.
    out: (dq, dk, dv) accumulators in lse's dtype, shaped like q, k, v, that the gradients are
    added into (ring attention: no fresh buffers per step); they are returned as they are."""
    if out is None and window is not None and window <= BAND_MAX_WINDOW:
        n = band_offset(q_pos, k_pos, causal, window)
        if n is not None:
            return band_bwd_torch(do, q, k, v, o, lse, scale, window, n, q_doc, k_doc, dlse)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = lse.dtype
    qg = q.view(B, Hkv, G, Tq, D)
    dog = do.view(B, Hkv, G, Tq, Dv).to(cdt)
    lseg = lse.view(B, Hkv, G, Tq)
    # D_i = rowsum(dO_i * O_i) - dlse_i: the softmax Jacobian's diagonal term (and lse's own gradient)
    Dterm = (dog * o.view(B, Hkv, G, Tq, Dv).to(cdt)).sum(-1)
    if dlse is not None:
        Dterm = Dterm - dlse.view(B, Hkv, G, Tq).to(cdt)
    if out is not None:
        for name, buf, like in zip(("dq", "dk", "dv"), out, (q, k, v)):
            if buf.shape != like.shape or buf.dtype != cdt or not buf.is_contiguous():
                raise ValueError(f"out {name}: expected a contiguous {cdt} tensor of shape {tuple(like.shape)}")
        dq, dk, dv = out[0].view(B, Hkv, G, Tq, D), out[1], out[2]
    else:
        dq = torch.zeros(B, Hkv, G, Tq, D, dtype=cdt, device=q.device)
        dk = torch.zeros(B, Hkv, Tk, D, dtype=cdt, device=q.device)
        dv = torch.zeros(B, Hkv, Tk, Dv, dtype=cdt, device=q.device)
    for (qs, qe), kbs in _visible_blocks(q_pos, k_pos, Tq, Tk, block, causal, window):
        qt = qg[:, :, :, qs:qe].to(cdt)
        lt = lseg[:, :, :, qs:qe]
        lt = torch.where(torch.isinf(lt), torch.full_like(lt, math.inf), lt)  # empty rows: p = 0
        for ks, ke in kbs:
            kt, vt = k[:, :, ks:ke].to(cdt), v[:, :, ks:ke].to(cdt)
            s = torch.einsum("bhgqd,bhkd->bhgqk", qt, kt) * scale
            mask = _tile_mask(q_pos[qs:qe], k_pos[ks:ke], None if q_doc is None else q_doc[:, qs:qe],
                              None if k_doc is None else k_doc[:, ks:ke], causal, window)
            p = torch.exp(s - lt[..., None])
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            dot = dog[:, :, :, qs:qe]
            dv[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", p, dot)
            dp = torch.einsum("bhgqd,bhkd->bhgqk", dot, vt)
            ds = p * (dp - Dterm[:, :, :, qs:qe, None]) * scale
            dq[:, :, :, qs:qe] += torch.einsum("bhgqk,bhkd->bhgqd", ds, kt)
            dk[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", ds, qt)
    if out is not None:
        return out
    return dq.view(B, H, Tq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- sliding-window fast path (banded) ----------------------------------------------------------
# A causal window over contiguous positions (one shard, or a shard with its halo of keys in
# front) has the same band of visible keys for every chunk of C queries: the C + W - 1 keys
# ending at the chunk's last query. So all chunks are taken at once as batched matmuls over
# overlapping key windows (`unfold`: views, no copies) with one fixed band mask, instead of a
# Python loop over (query tile x key tile) pairs with an online softmax: on the CPU the per-tile
# loop spent most of its time in small ops and repeated dtype conversions (a window of 256 over
# 128K tokens: 3x fewer ops per token).
BAND_SCORES = 1 << 20  # score elements per batch of chunks (4 MiB in fp32; measured: 2^18-2^22 at window 256)
BAND_MAX_WINDOW = 4096  # wider windows: the tile loop (a chunk's C + W - 1 keys grow with W)


def band_offset(q_pos: Tensor, k_pos: Tensor, causal: bool, window: Optional[int]) -> Optional[int]:
    """n such that k_pos = q_pos[0] - n + arange(Tk) and Tk = n + Tq (keys: n earlier tokens,
    then the queries' own), for a causal window; None when the layout is anything else."""
    if not causal or window is None:
        return None
    Tq, Tk = q_pos.numel(), k_pos.numel()
    n = Tk - Tq
    if n < 0 or Tq == 0:
        return None
    start = int(q_pos[0]) - n
    ar = torch.arange(start, start + Tk, device=k_pos.device)
    if not torch.equal(k_pos, ar) or not torch.equal(q_pos, ar[n:]):
        return None
    return n


def _band_chunk(window: int) -> int:
    return max(16, min(64, window))  # 64 at window 256: measured fastest of 32-256 (1 thread, bf16)


class _Band:
    """Index bookkeeping of the banded layout: C queries per chunk, K = C + W - 1 keys per
    chunk window; keys left-padded by P so the first window starts at index >= 0."""

    def __init__(self, Tq: int, n: int, W: int, device):
        self.C = C = _band_chunk(W)
        self.W, self.K = W, C + W - 1
        self.nc = -(-Tq // C)
        self.P = max(0, W - 1 - n)
        self.base = n + self.P - (W - 1)             # padded key index of chunk 0's first key
        self.Tk_pad = self.base + self.nc * C + W - 1  # padded keys the windows span
        r = torch.arange(C, device=device)[:, None]
        t = torch.arange(self.K, device=device)[None, :]
        self.band = (t >= r) & (t <= r + W - 1)     # (C, K): key column t of query row r
        self.device = device

    def pad_keys(self, x: Tensor, n_real: int) -> Tensor:
        """(B, Hkv, Tk, D) -> (B, Hkv, Tk_pad, D): P zeros in front, zeros after."""
        right = self.Tk_pad - self.P - n_real
        return torch.nn.functional.pad(x, (0, 0, self.P, max(0, right)))[:, :, :self.Tk_pad]

    def windows(self, xp: Tensor, c0: int, c1: int) -> Tensor:
        """(B, Hkv, c1 - c0, K, D) key windows of chunks c0..c1 (a strided view of xp)."""
        s = self.base + c0 * self.C
        return xp[:, :, s:s + (c1 - c0 - 1) * self.C + self.K].unfold(2, self.K, self.C).transpose(-1, -2)

    def mask(self, c0: int, c1: int, q_doc: Optional[Tensor], kdoc_p: Optional[Tensor]) -> Tensor:
        """Allowed mask (Bd, 1, 1, nc, C, K): band, no left padding, same document."""
        first = self.base + torch.arange(c0, c1, device=self.device) * self.C  # padded index of column 0
        real = (first[:, None] + torch.arange(self.K, device=self.device)[None]) >= self.P  # (nc, K)
        m = self.band[None] & real[:, None, :]
        m = m[None, None, None]
        if q_doc is not None:
            qd = q_doc[:, c0 * self.C:c1 * self.C]
            qd = torch.nn.functional.pad(qd, (0, (c1 - c0) * self.C - qd.shape[1]), value=-1)
            qd = qd.view(qd.shape[0], c1 - c0, self.C)
            s = self.base + c0 * self.C
            kd = kdoc_p[:, s:s + (c1 - c0 - 1) * self.C + self.K].unfold(1, self.K, self.C)  # (B, nc, K)
            m = m & (qd[:, :, :, None] == kd[:, :, None, :])[:, None, None]
        return m

    def batches(self, B: int, H: int):
        step = max(1, BAND_SCORES // max(1, B * H * self.C * self.K))
        return [(c, min(self.nc, c + step)) for c in range(0, self.nc, step)]


def _band_q(x: Tensor, L: _Band, c0: int, c1: int, cdt) -> Tensor:
    """(B, Hkv, G, T, D) -> (B, Hkv, G, c1 - c0, C, D) in cdt, zero rows past the end."""
    a, b = c0 * L.C, min(x.shape[3], c1 * L.C)
    t = x[:, :, :, a:b].to(cdt)
    if b - a < (c1 - c0) * L.C:
        t = torch.nn.functional.pad(t, (0, 0, 0, (c1 - c0) * L.C - (b - a)))
    return t.view(*t.shape[:3], c1 - c0, L.C, t.shape[-1])


def band_fwd_torch(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, n: int,
                   q_doc: Optional[Tensor], k_doc: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """flash_fwd_torch for a causal window over contiguous positions (band_offset(...) = n)."""
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = _Band(Tq, n, window, q.device)
    kp, vp = L.pad_keys(k, Tk), L.pad_keys(v, Tk)
    kdp = None if k_doc is None else torch.nn.functional.pad(k_doc, (L.P, L.Tk_pad - L.P - Tk), value=-2)
    qg = q.view(B, Hkv, G, Tq, D)
    o = torch.empty(B, Hkv, G, L.nc * L.C, Dv, dtype=cdt, device=q.device)
    lse = torch.empty(B, Hkv, G, L.nc * L.C, dtype=cdt, device=q.device)
    for c0, c1 in L.batches(B, H):
        qt = _band_q(qg, L, c0, c1, cdt)                                     # (B, Hkv, G, n, C, D)
        kw, vw = L.windows(kp, c0, c1).to(cdt), L.windows(vp, c0, c1).to(cdt)  # (B, Hkv, n, K, D)
        s = torch.einsum("bhgncd,bhnkd->bhgnck", qt, kw).mul_(scale)
        s.masked_fill_(~L.mask(c0, c1, q_doc, kdp), -math.inf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)              # padded rows: no key
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        ot = torch.einsum("bhgnck,bhnkd->bhgncd", p, vw).div_(l.clamp_min(torch.finfo(cdt).tiny))  # padded rows: l = 0
        sl = slice(c0 * L.C, c1 * L.C)
        o[:, :, :, sl] = ot.flatten(3, 4)
        lse[:, :, :, sl] = (m + torch.log(l)).squeeze(-1).flatten(3, 4)
    o = o[:, :, :, :Tq].reshape(B, H, Tq, Dv).to(q.dtype)
    return o, lse[:, :, :, :Tq].reshape(B, H, Tq).contiguous()


def band_bwd_torch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                   window: int, n: int, q_doc: Optional[Tensor], k_doc: Optional[Tensor],
                   dlse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """flash_bwd_torch for the banded layout (probabilities recomputed from lse)."""
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    cdt = lse.dtype
    L = _Band(Tq, n, window, q.device)
    kp, vp = L.pad_keys(k, Tk), L.pad_keys(v, Tk)
    kdp = None if k_doc is None else torch.nn.functional.pad(k_doc, (L.P, L.Tk_pad - L.P - Tk), value=-2)
    qg, dog = q.view(B, Hkv, G, Tq, D), do.view(B, Hkv, G, Tq, Dv)
    Dterm = (dog.to(cdt) * o.view(B, Hkv, G, Tq, Dv).to(cdt)).sum(-1)
    if dlse is not None:
        Dterm = Dterm - dlse.view(B, Hkv, G, Tq).to(cdt)
    lseg = lse.view(B, Hkv, G, Tq)
    dq = torch.empty(B, Hkv, G, L.nc * L.C, D, dtype=cdt, device=q.device)
    dkp = torch.zeros(B, Hkv, L.Tk_pad, D, dtype=cdt, device=q.device)
    dvp = torch.zeros(B, Hkv, L.Tk_pad, Dv, dtype=cdt, device=q.device)
    for c0, c1 in L.batches(B, H):
        nb = c1 - c0
        qt, dot = _band_q(qg, L, c0, c1, cdt), _band_q(dog, L, c0, c1, cdt)
        lt = _band_q(lseg[..., None], L, c0, c1, cdt)                        # (..., C, 1)
        dt = _band_q(Dterm[..., None], L, c0, c1, cdt)
        kw, vw = L.windows(kp, c0, c1).to(cdt), L.windows(vp, c0, c1).to(cdt)
        s = torch.einsum("bhgncd,bhnkd->bhgnck", qt, kw).mul_(scale)
        p = s.sub_(lt).exp_().masked_fill_(~L.mask(c0, c1, q_doc, kdp), 0.0)  # padded rows: dot = 0
        dvw = torch.einsum("bhgnck,bhgncd->bhnkd", p, dot)
        ds = torch.einsum("bhgncd,bhnkd->bhgnck", dot, vw).sub_(dt).mul_(p).mul_(scale)
        dq[:, :, :, c0 * L.C:c1 * L.C] = torch.einsum("bhgnck,bhnkd->bhgncd", ds, kw).flatten(3, 4)
        dkw = torch.einsum("bhgnck,bhgncd->bhnkd", ds, qt)
        # overlapping windows: add each chunk's K rows at its keys (one index_add per batch)
        idx = (L.base + torch.arange(c0, c1, device=q.device)[:, None] * L.C
               + torch.arange(L.K, device=q.device)[None]).flatten()
        dkp.index_add_(2, idx, dkw.flatten(2, 3))
        dvp.index_add_(2, idx, dvw.flatten(2, 3))
    dq = dq[:, :, :, :Tq].reshape(B, H, Tq, D).to(q.dtype)
    return dq, dkp[:, :, L.P:L.P + Tk].to(k.dtype), dvp[:, :, L.P:L.P + Tk].to(v.dtype)
