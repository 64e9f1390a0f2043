"""Landmark attention's grouped softmax (Mohtashami & Jaggi, 2023), tile by tile in torch:
the CPU path and the specification the fused kernel is tested against.

Layout: positions come in groups of block + 1: `block` regular tokens, then the group's
landmark token (position p is a landmark when p % (block + 1) == block; its group is
p // (block + 1)). For a query i in group b:

    Z   = sum_{j regular in b, j <= i} e^{s_ij} + sum_{c < b} e^{s_i,L(c)}
    w_ij = e^{s_ij} / Z                                        j regular in b, j <= i
    w_ij = e^{s_i,L(c)} / Z * e^{s_ij} / sum_{j' regular in c} e^{s_ij'}   j regular in c < b
    w_ij = 0                                                   landmarks (they carry no value)
    o_i = sum_j w_ij v_j

(i's own landmark is excluded: for a regular i it lies in the future, for a landmark i it is i.)
Equivalently o_i is an ordinary softmax over modified scores s'_ij = s_ij for local j and
s'_ij = s_ij - lse_c(s_i) + s_i,L(c) for j in an earlier group c, because sum_{j in c}
e^{s'_ij} = e^{s_i,L(c)}. So the computation is flash attention whose key tiles hold whole groups:
each tile gives the per-group lse and landmark score it needs, nothing T x T is ever formed.

Backward, with P' = softmax(s') and dS' = P' (dP' - rowsum(dO o)): for j in an earlier group c,
dS_ij = dS'_ij - softmax_c(s_i)_j * sum_{j' in c} dS'_ij' and dS_i,L(c) = sum_{j in c} dS'_ij;
local j: dS_ij = dS'_ij.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from longctx.kernels.flash_torch import online_softmax_finish, online_softmax_step
from longctx.kernels.lightning import pick_backend

Tensor = torch.Tensor


def landmark_mask(T: int, block: int, device=None) -> Tensor:
    """(T,) bool: which positions 0..T-1 are landmark tokens."""
    return (torch.arange(T, device=device) % (block + 1)) == block


def _tile_scores(qt: Tensor, kt: Tensor, qp: Tensor, ks: int, ke: int, block: int, scale: float):
    """Modified scores of one (query tile, key tile) pair.

    qt (B, Hkv, G, bq, D) fp; kt (B, Hkv, nk, D) for key positions ks..ke-1, ks a group start.
    Returns s' (B, Hkv, G, bq, ng, block) (-inf where not attended), the within-group softmax
    sm (same shape, for earlier groups; 0 elsewhere), the regular-key mask (ng, block) and
    `earlier` (bq, ng): the group is earlier than the query's own."""
    W = block + 1
    nk = ke - ks
    ng = -(-nk // W)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qt, kt) * scale
    pad = ng * W - nk
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=-math.inf)
    s = s.unflatten(-1, (ng, W))  # (B, Hkv, G, bq, ng, W)
    reg, lm = s[..., :block], s[..., block]
    kpos = ks + torch.arange(ng * W, device=qt.device).view(ng, W)[:, :block]  # (ng, block)
    exists = kpos < ke
    qg = qp // W  # query's own group
    kg = (ks // W) + torch.arange(ng, device=qt.device)  # (ng,)
    earlier = kg[None, :] < qg[:, None]  # (bq, ng)
    own = kg[None, :] == qg[:, None]
    causal = kpos[None] <= qp[:, None, None]  # (bq, ng, block)
    local = own[..., None] & causal & exists[None]
    # within-group log-sum-exp of an earlier group (complete: every earlier group is whole)
    lse_c = torch.logsumexp(reg.masked_fill(~exists, -math.inf), dim=-1, keepdim=True)
    lse_safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    sm = torch.exp(reg - lse_safe).masked_fill(~(earlier[..., None] & exists[None]), 0.0)
    s_mod = torch.where(earlier[..., None], reg - lse_safe + lm[..., None], reg)
    s_mod = s_mod.masked_fill(~((earlier[..., None] & exists[None]) | local), -math.inf)
    return s_mod, sm, earlier


def _vt(v: Tensor, ks: int, ke: int, block: int, dtype) -> Tensor:
    """Values of the regular keys of a group-aligned tile: (B, Hkv, ng, block, Dv) (zeros as padding)."""
    W = block + 1
    x = v[:, :, ks:ke].to(dtype)
    ng = -(-x.shape[2] // W)
    pad = ng * W - x.shape[2]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (ng, W))[:, :, :, :block]


def _key_tiles(T: int, block: int, tile: int):
    W = block + 1
    step = max(1, tile // W) * W  # whole groups per tile
    return [(s, min(T, s + step)) for s in range(0, T, step)]


def landmark_fwd_torch(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float,
                       tile: int = 256) -> Tuple[Tensor, Tensor]:
    """q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv), positions 0..T-1 in groups of
    block + 1. Returns o (B, H, T, Dv) in q's dtype and lse (B, H, T) of the modified scores."""
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.view(B, Hkv, G, T, D)
    o = torch.empty(B, Hkv, G, T, Dv, dtype=cdt, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=cdt, device=q.device)
    pos = torch.arange(T, device=q.device)
    for qs in range(0, T, tile):
        qe = min(T, qs + tile)
        qt, qp = qg[:, :, :, qs:qe].to(cdt), pos[qs:qe]
        m = torch.full((B, Hkv, G, qe - qs), -math.inf, dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, G, qe - qs, Dv, dtype=cdt, device=q.device)
        for ks, ke in _key_tiles(T, block, tile):
            if ks > qe - 1:
                break
            s_mod, _, _ = _tile_scores(qt, k[:, :, ks:ke].to(cdt), qp, ks, ke, block, scale)
            s_mod = s_mod.flatten(-2)  # (B, Hkv, G, bq, ng*block)
            m, l, acc = online_softmax_step(m, l, acc, s_mod, _vt(v, ks, ke, block, cdt).flatten(2, 3))
        o[:, :, :, qs:qe], lse[:, :, :, qs:qe] = online_softmax_finish(m, l, acc)
    return o.view(B, H, T, Dv).to(q.dtype), lse.view(B, H, T)


def landmark_bwd_torch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block: int,
                       scale: float, tile: int = 256):
    """(dq, dk, dv) by recomputing each tile from lse (see the module docstring)."""
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    W = block + 1
    cdt = lse.dtype
    qg = q.view(B, Hkv, G, T, D)
    dog = do.view(B, Hkv, G, T, Dv).to(cdt)
    lseg = lse.view(B, Hkv, G, T)
    Dterm = (dog * o.view(B, Hkv, G, T, Dv).to(cdt)).sum(-1)
    dq = torch.zeros(B, Hkv, G, T, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hkv, T, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hkv, T, Dv, dtype=cdt, device=q.device)
    pos = torch.arange(T, device=q.device)
    for qs in range(0, T, tile):
        qe = min(T, qs + tile)
        qt, qp = qg[:, :, :, qs:qe].to(cdt), pos[qs:qe]
        lt = lseg[:, :, :, qs:qe]
        lt = torch.where(torch.isinf(lt), torch.full_like(lt, math.inf), lt)
        for ks, ke in _key_tiles(T, block, tile):
            if ks > qe - 1:
                break
            kt = k[:, :, ks:ke].to(cdt)
            s_mod, sm, earlier = _tile_scores(qt, kt, qp, ks, ke, block, scale)
            ng = s_mod.shape[-2]
            p = torch.exp(s_mod - lt[..., None, None])  # (B, Hkv, G, bq, ng, block)
            vt = _vt(v, ks, ke, block, cdt)  # (B, Hkv, ng, block, Dv)
            dot = dog[:, :, :, qs:qe]
            dvt = torch.einsum("bhgqcj,bhgqd->bhcjd", p, dot)
            dp = torch.einsum("bhgqd,bhcjd->bhgqcj", dot, vt)
            ds_mod = p * (dp - Dterm[:, :, :, qs:qe, None, None])
            tot = ds_mod.sum(-1)  # (B, Hkv, G, bq, ng): per-group sums (earlier groups only matter)
            ds_reg = ds_mod - sm * tot[..., None]
            ds_lm = torch.where(earlier, tot, torch.zeros_like(tot))
            ds = torch.cat([ds_reg, ds_lm[..., None]], dim=-1).flatten(-2)[..., :ke - ks] * scale  # (.., bq, nk)
            dq[:, :, :, qs:qe] += torch.einsum("bhgqk,bhkd->bhgqd", ds, kt)
            dk[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", ds, qt)
            n = ke - ks
            dv_full = torch.nn.functional.pad(dvt, (0, 0, 0, 1)).flatten(2, 3)[:, :, :n]  # landmarks: 0
            dv[:, :, ks:ke] += dv_full
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Landmark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block, scale, tile, backend):
        if backend == "triton":
            from longctx.kernels.landmark_triton import landmark_fwd_triton
            o, lse = landmark_fwd_triton(q, k, v, block, scale)
        else:
            o, lse = landmark_fwd_torch(q, k, v, block, scale, tile)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (block, scale, tile, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        block, scale, tile, backend = ctx.args
        if backend == "triton":
            from longctx.kernels.landmark_triton import landmark_bwd_triton
            dq, dk, dv = landmark_bwd_triton(do.contiguous(), q, k, v, o, lse, block, scale)
        else:
            dq, dk, dv = landmark_bwd_torch(do.contiguous(), q, k, v, o, lse, block, scale, tile)
        return dq, dk, dv, None, None, None, None


def _backend(q: Tensor, k: Tensor, v: Tensor, block: int, backend: str) -> str:
    """'auto': the Triton kernel for CUDA tensors it supports (float16/bfloat16/float32, block 16,
    32, 64 or 128, head dims 16..128), the torch path otherwise. 'triton' asked by name is checked
    here, so bad input fails before autograd with a ValueError naming what is supported."""
    be = pick_backend(q, backend)
    if be == "triton":
        from longctx.kernels.landmark_triton import check_supported
        if backend == "auto":
            try:
                check_supported(q, k, v, block)
            except ValueError:
                return "torch"
        else:
            check_supported(q, k, v, block)
    return be


def landmark_attn(q: Tensor, k: Tensor, v: Tensor, block: int, scale: Optional[float] = None,
                  tile: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Grouped-softmax landmark attention over a whole sequence (positions 0..T-1, a landmark
    at every position p with p % (block + 1) == block). q (B, H, T, D); k, v (B, Hkv, T, D|Dv).
    Returns (B, H, T, Dv). tile: the torch path's tile (the Triton kernel tiles by `block`); None
    picks 128 up to T = 2048 (fewer masked pairs) and 256 above (fewer Python steps): on this
    2-core CPU 128 cuts a 528-token step by ~40% against 256, and 256 wins at 4K.
    backend: "auto" (the fused Triton kernel for CUDA tensors it supports, else torch), "torch",
    or "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1; float16/bfloat16/float32,
    block 16/32/64/128, head dims 16/32/64/128; anything else is a ValueError)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected (batch, heads, seq, dim), got shape {tuple(x.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: expected a positive int (regular tokens per landmark)")
    if q.shape[1] % k.shape[1] or k.shape[2] != q.shape[2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need the same length and "
                         f"query heads a multiple of KV heads")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: batch and head dim must agree")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    be = _backend(q, k, v, block, backend)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if tile is None:
        tile = 128 if q.shape[2] <= 2048 else 256
    return _Landmark.apply(q, k, v, block, sc, int(tile), be)


def landmark_dense_reference(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float) -> Tensor:
    """The paper's formula written out with a dense T x T weight matrix (tests only)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    W = block + 1
    pos = torch.arange(T)
    grp, is_lm = pos // W, pos % W == block
    w = torch.zeros_like(s)
    for i in range(T):
        b = int(grp[i])
        local = (grp == b) & ~is_lm & (pos <= i)
        earlier_lm = is_lm & (grp < b)
        es = torch.exp(s[:, :, i])  # (B, H, T)
        Z = (es * local).sum(-1) + (es * earlier_lm).sum(-1)
        w[:, :, i] = es * local / Z[..., None]
        for c in range(b):
            members = (grp == c) & ~is_lm
            lm = int(((grp == c) & is_lm).nonzero()[0])
            within = es * members / (es * members).sum(-1, keepdim=True)
            w[:, :, i] += es[..., lm:lm + 1] / Z[..., None] * within
    return w @ v
