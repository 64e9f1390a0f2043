"""Landmark attention's grouped softmax (Mohtashami & Jaggi, 2023) in torch, a tile of query
rows at a time: the CPU path and the specification the fused kernel is tested against.

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
e^{s'_ij} = e^{s_i,L(c)}. The Triton kernel runs it as flash attention whose key tiles hold
whole groups (each tile gives the per-group lse and landmark score it needs). This path takes a
tile of query rows against all the keys they may see at once (_tile_weights): memory
O(rows x T) per tile, no T x T matrix; the within-group softmax and the landmark weights are
then elementwise factors of one weight matrix per tile.

Backward, with P' = softmax(s') and dS' = P' (dP' - rowsum(dO o)): for j in an earlier group c,
dS_ij = dS'_ij - softmax_c(s_i)_j * sum_{j' in c} dS'_ij' and dS_i,L(c) = sum_{j in c} dS'_ij;
local j: dS_ij = dS'_ij.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from longctx.kernels.lightning import pick_backend

Tensor = torch.Tensor


def landmark_mask(T: int, block: int, device=None) -> Tensor:
    """(T,) bool: which positions 0..T-1 are landmark tokens."""
    return (torch.arange(T, device=device) % (block + 1)) == block


def _group_ends(T: int, block: int, qe: int) -> int:
    """End of the keys a query tile ending at qe needs: the end of the group holding qe - 1."""
    W = block + 1
    return min(T, -(-qe // W) * W)


def _tile_weights(qt: Tensor, k: Tensor, qs: int, qe: int, T: int, block: int, scale: float,
                  lse: Optional[Tensor] = None, keep_e: bool = False):
    """The attention weights of query rows qs..qe-1 over every regular key they may see, at once.

    qt (B, Hkv, G, bq, D) in the compute dtype; k (B, Hkv, T, D). Keys 0..ke-1 (whole groups up
    to the query's last group) as ng groups of `block` regular keys. With reg / lm the scores of
    the regular and landmark keys, e = exp(reg - max_c) and ssum_c = sum_j e (so the
    within-group softmax is e / ssum_c):

        P_ij = e_ij * exp(lm_c - lse_i) / ssum_c    j in an earlier group c
        P_ij = exp(s_ij - lse_i)                    j in the query's own group, j <= i
        lse_i = log(sum_local e^{s_ij} + sum_{c earlier} e^{lm_c})

    Returns P (B, Hkv, G, bq, ng, block), e (keep_e, else None), ssum (.., bq, ng), the
    earlier-group mask (bq, ng), lse (B, Hkv, G, bq) (recomputed unless given) and ke.
    Memory O(bq * T): the tile's rows against all their keys, no T x T matrix. The full-size
    steps work in place (on CPU each pass over a fresh tensor also pays for its pages)."""
    W = block + 1
    ke = _group_ends(T, block, qe)
    ng = -(-ke // W)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qt * scale, k[:, :, :ke].to(qt.dtype))
    if ng * W > ke:
        s = torch.nn.functional.pad(s, (0, ng * W - ke), value=-math.inf)
    s = s.unflatten(-1, (ng, W))  # (B, Hkv, G, bq, ng, W)
    reg, lm = s[..., :block], s[..., block]  # views; the in-place steps below touch reg only
    pos = torch.arange(qs, qe, device=qt.device)
    own = pos // W  # (bq,)
    earlier = torch.arange(ng, device=qt.device)[None, :] < own[:, None]  # (bq, ng)
    # own group's regular keys, causal (and inside the sequence: the last group may be partial)
    idx = own.view(1, 1, 1, -1, 1, 1).expand(*reg.shape[:3], -1, 1, block)
    loc = torch.gather(reg, -2, idx).squeeze(-2)  # (B, Hkv, G, bq, block)
    kpos = own[:, None] * W + torch.arange(block, device=qt.device)[None, :]  # (bq, block)
    loc = loc.masked_fill(~((kpos <= pos[:, None]) & (kpos < T)), -math.inf)
    lmE = lm.masked_fill(~earlier, -math.inf)
    if lse is None:
        lse = torch.logsumexp(torch.cat([loc, lmE], dim=-1), dim=-1)
    # earlier groups: within-group softmax e / ssum (complete groups: every earlier group is whole)
    mx = reg.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = reg.sub_(mx).exp_()  # in place in s; a strided view
    ssum = e.sum(-1)
    # ssum >= 1 (the group's max contributes e^0) unless every score of the group is -inf (only
    # with infinite inputs): clamped so that such a group gets weight 0, not NaN
    tiny = torch.finfo(ssum.dtype).tiny
    coef = torch.exp(lmE - lse[..., None]) / ssum.clamp_min(tiny)  # 0 for non-earlier groups
    p = e * coef[..., None] if keep_e else e.mul_(coef[..., None])
    p.scatter_(-2, idx, torch.exp(loc - lse[..., None]).unsqueeze(-2))  # own group: the local weights
    return p, (e if keep_e else None), ssum, earlier, lse, ke


def _v_regular(v: Tensor, ke: int, block: int, dtype) -> Tensor:
    """Values of the regular keys 0..ke-1 as (B, Hkv, ng * block, Dv) (zeros as padding)."""
    W = block + 1
    x = v[:, :, :ke].to(dtype)
    ng = -(-ke // W)
    if ng * W > ke:
        x = torch.nn.functional.pad(x, (0, 0, 0, ng * W - ke))
    return x.unflatten(2, (ng, W))[:, :, :, :block].flatten(2, 3)


def _rows_per_tile(B: int, H: int, T: int, tile: Optional[int]) -> int:
    """Query rows per tile: `tile` if given, else as many as keep one (rows x T) score tensor of
    all heads near 2^22 elements (measured on this CPU: 528 tokens x batch 8 x 4 heads runs
    fastest in one to three tiles), and at least 16 (fewer Python steps). The backward holds ~4
    such tensors at once: peak ~16 x rows x B x H x T bytes in fp32 (B = 1, H = 32, T = 128K:
    16 rows, ~1 GiB)."""
    if tile is not None:
        return max(1, int(tile))
    return max(16, min(T, (1 << 22) // max(1, B * H * T)))


@torch.no_grad()  # in-place steps: not differentiable by autograd (the backward is below)
def landmark_fwd_torch(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float,
                       tile: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv), positions 0..T-1 in groups of
    block + 1. Returns o (B, H, T, Dv) in q's dtype and lse (B, H, T) of the modified scores.
    tile: query rows per step (None: sized to the batch, _rows_per_tile)."""
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.view(B, Hkv, G, T, D)
    o = torch.empty(B, Hkv, G, T, Dv, dtype=cdt, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=cdt, device=q.device)
    rows = _rows_per_tile(B, H, T, tile)
    for qs in range(0, T, rows):
        qe = min(T, qs + rows)
        p, _, _, _, lt, ke = _tile_weights(qg[:, :, :, qs:qe].to(cdt), k, qs, qe, T, block, scale)
        o[:, :, :, qs:qe] = torch.einsum("bhgqk,bhkd->bhgqd", p.flatten(-2), _v_regular(v, ke, block, cdt))
        lse[:, :, :, qs:qe] = lt
    return o.view(B, H, T, Dv).to(q.dtype), lse.view(B, H, T)


@torch.no_grad()
def landmark_bwd_torch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block: int,
                       scale: float, tile: Optional[int] = None):
    """(dq, dk, dv) by recomputing each query tile's weights from lse (see the module docstring):
    with P the weights and dS' = P (dP - rowsum(dO o)), an earlier group's regular keys get
    dS' - softmax_c * sum_c dS' and its landmark sum_c dS'; own-group keys get dS'."""
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    W = block + 1
    cdt = lse.dtype
    qg = q.view(B, Hkv, G, T, D)
    dog = do.view(B, Hkv, G, T, Dv).to(cdt)
    lseg = lse.view(B, Hkv, G, T)
    Dterm = (dog * o.view(B, Hkv, G, T, Dv).to(cdt)).sum(-1)
    dq = torch.empty(B, Hkv, G, T, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hkv, T, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hkv, T, Dv, dtype=cdt, device=q.device)
    rows = _rows_per_tile(B, H, T, tile)
    for qs in range(0, T, rows):
        qe = min(T, qs + rows)
        qt = qg[:, :, :, qs:qe].to(cdt)
        p, e, ssum, earlier, _, ke = _tile_weights(qt, k, qs, qe, T, block, scale, lse=lseg[:, :, :, qs:qe],
                                                   keep_e=True)
        ng = p.shape[-2]
        dot = dog[:, :, :, qs:qe]
        kr, vr = _v_regular(k, ke, block, cdt), _v_regular(v, ke, block, cdt)  # (B, Hkv, ng * block, D)
        kl = k[:, :, block:ke:W].to(cdt)  # the landmarks' keys (B, Hkv, ng, D); a partial last group has none
        if kl.shape[2] < ng:
            kl = torch.nn.functional.pad(kl, (0, 0, 0, ng - kl.shape[2]))
        # dS' = P (dP - rowsum(dO o)), in place in dP
        ds = torch.einsum("bhgqd,bhkd->bhgqk", dot, vr).unflatten(-1, (ng, block))
        ds.sub_(Dterm[:, :, :, qs:qe, None, None]).mul_(p)
        tot = ds.sum(-1)  # per-group sums: the landmark's gradient (earlier groups)
        zero = torch.zeros_like(tot)
        ds.addcmul_(e, torch.where(earlier, tot / ssum.clamp_min(torch.finfo(cdt).tiny), zero)[..., None], value=-1.0)
        dl = torch.where(earlier, tot, zero)  # (B, Hkv, G, bq, ng)
        ds = ds.flatten(-2)
        dq[:, :, :, qs:qe] = (torch.einsum("bhgqk,bhkd->bhgqd", ds, kr) +
                              torch.einsum("bhgqc,bhcd->bhgqd", dl, kl)) * scale
        dkr = torch.einsum("bhgqk,bhgqd->bhkd", ds, qt).unflatten(2, (ng, block))
        dkl = torch.einsum("bhgqc,bhgqd->bhcd", dl, qt)
        dk[:, :, :ke] += torch.cat([dkr, dkl[:, :, :, None]], dim=3).flatten(2, 3)[:, :, :ke] * scale
        dvr = torch.einsum("bhgqk,bhgqd->bhkd", p.flatten(-2), dot).unflatten(2, (ng, block))
        dv[:, :, :ke] += torch.nn.functional.pad(dvr, (0, 0, 0, 1)).flatten(2, 3)[:, :, :ke]  # landmarks: 0
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Landmark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block, scale, tile, backend):
        if backend == "triton":
            from longctx.kernels.landmark_triton import landmark_fwd_triton
            o, lse = landmark_fwd_triton(q, k, v, block, scale)
        elif backend == "cpu":
            from longctx.kernels.landmark_cpu import landmark_fwd_cpu
            o, lse = landmark_fwd_cpu(q, k, v, block, scale, tile)
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
        elif backend == "cpu":
            from longctx.kernels.landmark_cpu import landmark_bwd_cpu
            dq, dk, dv = landmark_bwd_cpu(do.contiguous(), q, k, v, o, lse, block, scale, tile)
        else:
            dq, dk, dv = landmark_bwd_torch(do.contiguous(), q, k, v, o, lse, block, scale, tile)
        return dq, dk, dv, None, None, None, None


_warned: list = []


def _backend(q: Tensor, k: Tensor, v: Tensor, block: int, backend: str) -> str:
    """'auto': the Triton kernel for CUDA tensors it supports (float16/bfloat16/float32, block 16,
    32, 64 or 128, head dims 16..128); for float32 / float64 CPU tensors the torch path with its
    elementwise middle in C (landmark_cpu.py; a warning, once, and the plain torch path when it
    cannot be built); the torch path otherwise. 'triton' or 'cpu' asked by name is checked here,
    so bad input fails before autograd with a ValueError naming what is supported."""
    if backend not in ("auto", "torch", "cpu", "triton"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'torch', 'cpu' or 'triton'")
    if backend == "cpu":
        from longctx.kernels.landmark_cpu import available
        ok, why = available()
        if any(x.device.type != "cpu" for x in (q, k, v)) or q.dtype not in (torch.float32, torch.float64) or not ok:
            raise ValueError(f"backend='cpu' needs float32 / float64 CPU tensors and the C helper; got "
                             f"{q.dtype} on {q.device}{'' if ok else ' (' + why + ')'}")
        return "cpu"
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
    if backend == "auto" and be == "torch" and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        from longctx.kernels.landmark_cpu import available
        ok, why = available()
        if ok:
            return "cpu"
        if not _warned:
            import warnings
            warnings.warn(f"{why}; landmark attention runs the torch path (same results, ~1.7x slower)")
            _warned.append(True)
    return be


def landmark_attn(q: Tensor, k: Tensor, v: Tensor, block: int, scale: Optional[float] = None,
                  tile: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Grouped-softmax landmark attention over a whole sequence (positions 0..T-1, a landmark
    at every position p with p % (block + 1) == block). q (B, H, T, D); k, v (B, Hkv, T, D|Dv).
    Returns (B, H, T, Dv). tile: the torch path's query rows per step (each against all its keys:
    memory O(tile * T), peak ~16 x tile x B x H x T bytes in fp32); None sizes it to the batch
    (_rows_per_tile).
    backend: "auto" (the fused Triton kernel for CUDA tensors it supports, "cpu" for float32 /
    float64 CPU tensors, else torch), "torch" (the specification), "cpu" (torch's matrix
    products with the elementwise middle in C: landmark_cpu.py) or "triton" (CUDA, or CPU tensors
    under TRITON_INTERPRET=1; float16/bfloat16/float32, block 16/32/64/128, head dims
    16/32/64/128; anything else is a ValueError)."""
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
    if tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1:
            raise ValueError(f"tile={tile!r}: expected a positive int (query rows per step) or None")
        tile = int(tile)
    return _Landmark.apply(q, k, v, block, sc, tile, be)


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
