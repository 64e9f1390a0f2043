"""Landmark attention mixer: grouped softmax over blocks, each closed by a landmark token
(kernels/landmark_torch.py). Same projections as softmax attention (weights import alike).

The sequence must follow the landmark layout from position 0: a landmark at every position p
with p % (block + 1) == block (the data pipeline inserts them: train/data.py). Under sequence
parallelism it runs Ulysses (each rank sees whole sequences for its heads), contiguous layout.
"""
from __future__ import annotations

import torch

import math
from typing import List, Optional

import numpy as np
from longctx.kernels.landmark_torch import landmark_attn
from longctx.model.mixers import register_mixer
from longctx.model.rope import apply_rope, apply_rope_nograd
from longctx.model.softmax import SoftmaxAttention


@register_mixer("landmark")
class LandmarkAttention(SoftmaxAttention):
    supports_sp = True
    sp_layouts = ("contiguous",)
    ring_ok = False  # Ulysses only

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.block = cfg.landmark_block
        self.layer_idx = layer_idx

    def forward(self, x_BLD: torch.Tensor, ctx) -> torch.Tensor:
        if ctx.carry and ctx.state.get("landmark_retrieval"):
            return self._retrieve(x_BLD, ctx)
        q, k, v = self.project(x_BLD, ctx)
        attn = lambda q_, k_, v_: landmark_attn(q_, k_, v_, self.block)  # noqa: E731
        if ctx.sp is not None and ctx.sp.size > 1:
            from longctx.parallel.ulysses import ulysses_apply
            return self.merge(ulysses_apply(q, k, v, ctx.sp, attn))
        return self.merge(attn(q, k, v))

    def _retrieve(self, x_BLD: torch.Tensor, ctx) -> torch.Tensor:
        """Streaming inference: ctx.state["landmark_retrieval"] = dict(top_k=, compressed_positions=,
        offload=, local_groups=, capacity=) turns it on (LandmarkCache's arguments); this layer's
        cache lives in ctx.state."""
        if ctx.sp is not None and ctx.sp.size > 1:
            raise ValueError("landmark retrieval inference runs on one rank: pass ctx.sp=None")
        key = f"landmark_cache_{self.layer_idx}"
        if key not in ctx.state:
            ctx.state[key] = LandmarkCache(self.block, **ctx.state["landmark_retrieval"])
        cache = ctx.state[key]
        if int(ctx.positions[0, 0]) != cache.next_pos:
            raise ValueError(f"landmark cache of layer {self.layer_idx} expects position {cache.next_pos} next, "
                             f"got {int(ctx.positions[0, 0])}: feed the stream in order from a fresh ctx.state")
        return retrieval_forward(self, x_BLD, cache)


# -- inference with retrieval ----------------------------------------------------------------

# The local window of retrieval inference: the latest completed groups, attended always and at
# their true distance (the paper's l_local ~ 250 tokens). Without it the recent text is reached
# only through top-k, and every group a head skips moves the others to new distances. Measured
# on the sweep's var512-more passkey model (benchmarks/passkey_sweep.py; exact answers, k = 4,
# 32-64 trials):
# no window 0.64 at 512 tokens, 0.62 at 8K; 3 groups 0.83 at 512, 0.72 at 8K; 4 groups 1.00 at
# 512, 1.00 at 8K, 0.97 at 32K (docs/landmark.md).
LOCAL_GROUPS = 4
_warned: list = []


class LandmarkCache:
    """One layer's memory for streaming inference (the paper's retrieval).

    Completed groups: their landmark keys stay on the compute device (one vector per KV head:
    what top-k selection reads); their block keys and values live on `store` (host memory
    with offload) and only the k retrieved blocks per head travel to the device. The current,
    unfinished group's keys and values are kept whole. Keys are kept before RoPE, so retrieved
    blocks can be given compressed positions. The latest `local_groups` completed groups are
    always attended (the local window) and the top_k are chosen among the older ones.

    Completed groups go into buffers that double when full, so appending a group costs O(1)
    amortised and reading all of them is a view (a list re-stacked per group would copy the
    whole cache every group: quadratic in the input length). `capacity` (groups), when the
    input length is known up front, sizes them once: no regrowth copies."""

    def __init__(self, block: int, top_k: int, compressed_positions: bool = True, offload: bool = False,
                 capacity: int = 0, local_groups: int = LOCAL_GROUPS, fused: bool = True):
        if top_k < 1:
            raise ValueError(f"landmark retrieval top_k={top_k}: use k >= 1 (the paper uses 4-5)")
        if local_groups < 0:
            raise ValueError(f"landmark retrieval local_groups={local_groups}: use >= 0 (the most recent completed "
                             f"groups always attended, besides the top-k retrieved)")
        self.block, self.top_k, self.compressed, self.offload = block, top_k, compressed_positions, offload
        self.capacity, self.local_groups = int(capacity), int(local_groups)
        # the retrieved blocks' gather + RoPE and the grouped softmax through the C helper
        # (kernels/landmark_cpu.py) for float32 / float64 CPU tensors: fused_ok()
        self.fused = bool(fused)
        self._buf: dict = {}  # name -> (B, Hkv, capacity, ...) buffer; lm_k on device, blk_k/blk_v on the store
        self.n_groups = 0
        self.cur_k: Optional[torch.Tensor] = None  # (B, Hkv, n, D) regular tokens of the open group
        self.cur_v: Optional[torch.Tensor] = None
        self.next_pos = 0
        self._rope: dict = {}  # (dtype, device) -> (cos, sin) (P, D) of positions 0..P-1: rope_table

    def rope_table(self, mixer, dtype, device, need: int) -> Optional[tuple]:
        """cos, sin (P, head_dim) of positions 0..P-1, P >= need, computed once per stream (every
        group call ropes its queries, window and retrieved blocks: computing the angles and
        cosines each time cost more than the rotations). Only with compressed positions, which
        stay below (local_groups + top_k + 1) x (block + 1): original positions run to the
        stream's length, and a table per layer of that size would cost what offloading saves.
        None then, and under dynamic NTK, whose frequencies depend on each call's largest
        position."""
        if not self.compressed or dict(mixer.rope_scaling or ()).get("rope_type") == "dynamic":
            return None
        key = (dtype, torch.device(device))
        t = self._rope.get(key)
        if t is None or t[0].shape[0] < need:
            from longctx.model.transformer import SeqContext
            P = max(need, 2 * t[0].shape[0] if t is not None else 512)
            cos, sin = SeqContext(positions=torch.arange(P, device=device)[None]).rope(
                mixer.head_dim, mixer.rope_theta, dtype, mixer.rope_scaling)
            self._rope[key] = t = (cos[0, 0], sin[0, 0])
        return t

    def stacked(self, name: str) -> torch.Tensor:
        """The completed groups' landmark keys "lm_k" (B, Hkv, groups, D), or block keys / values
        "blk_k" / "blk_v" (B, Hkv, groups, block, D) on the store: views, no copy."""
        if name not in ("lm_k", "blk_k", "blk_v"):
            raise ValueError(f"LandmarkCache.stacked({name!r}): use 'lm_k', 'blk_k' or 'blk_v'")
        if self.n_groups == 0:
            raise ValueError("LandmarkCache.stacked: no group has completed yet (check n_groups first)")
        return self._buf[name][:, :, :self.n_groups]

    def append(self, lm_k: torch.Tensor, blk_k: torch.Tensor, blk_v: torch.Tensor) -> None:
        """Close a group: its landmark key (B, Hkv, D) and block keys / values (B, Hkv, block, D)."""
        for name, x in (("lm_k", lm_k), ("blk_k", self.store(blk_k)), ("blk_v", self.store(blk_v))):
            buf = self._buf.get(name)
            if buf is None or buf.shape[2] == self.n_groups:  # full: double (start at 16 groups)
                cap = max(16, 2 * self.n_groups, self.capacity)
                new = x.new_empty(x.shape[:2] + (cap,) + x.shape[2:])
                if buf is not None:
                    new[:, :, :self.n_groups] = buf
                self._buf[name] = buf = new
            buf[:, :, self.n_groups] = x
        self.n_groups += 1

    def store(self, x: torch.Tensor) -> torch.Tensor:
        return x.to("cpu") if self.offload else x

    def fused_ok(self, x: torch.Tensor) -> bool:
        """Whether retrieval_forward takes the C helper's path for queries x: asked for (fused),
        compressed positions (one RoPE table for every row), no gradient (the helper rotates
        as apply_rope_nograd), float32 / float64 on the CPU with the blocks stored there too.
        When the helper cannot be built: a warning, once, and the torch path."""
        if not (self.fused and self.compressed and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64)):
            return False
        from longctx.kernels.landmark_cpu import available
        ok, why = available()
        if not ok and not _warned:
            import warnings
            warnings.warn(f"{why}; landmark retrieval runs the torch path (same results, slower)")
            _warned.append(True)
        return ok

    def repeat_rows(self, rows: int, capacity: int = 0) -> "LandmarkCache":
        """A cache of `rows` rows, each a copy of this one-row cache (RetrievalStream.fork), with
        buffers for max(capacity, n_groups) groups (sized once: regrowing a many-row cache copies it)."""
        if (self.cur_k is not None and self.cur_k.shape[0] != 1) or \
                (self._buf and next(iter(self._buf.values())).shape[0] != 1):
            raise ValueError("LandmarkCache.repeat_rows: only a one-row cache can be repeated")
        new = LandmarkCache(self.block, self.top_k, self.compressed, self.offload, max(capacity, self.capacity),
                            self.local_groups, self.fused)
        new.n_groups, new.next_pos, new._rope = self.n_groups, self.next_pos, self._rope
        cap = max(capacity, self.n_groups, 16)
        for name, buf in self._buf.items():
            nb = buf.new_empty((rows,) + buf.shape[1:2] + (cap,) + buf.shape[3:])
            nb[:, :, :self.n_groups] = buf[:, :, :self.n_groups]  # broadcast over the rows
            new._buf[name] = nb
        if self.cur_k is not None:
            new.cur_k = self.cur_k.expand(rows, *self.cur_k.shape[1:]).contiguous()
            new.cur_v = self.cur_v.expand(rows, *self.cur_v.shape[1:]).contiguous()
        return new


def _rope_at(mixer, x_BHLD: torch.Tensor, pos_L: torch.Tensor, cache: Optional[LandmarkCache] = None) -> torch.Tensor:
    """RoPE of x at positions pos_L (L,), with the mixer's own rotary settings; from the cache's
    table of cos / sin when it has one (cache.rope_table)."""
    need = int(pos_L.max()) + 1 if pos_L.numel() else 1
    tab = None if cache is None else cache.rope_table(mixer, x_BHLD.dtype, x_BHLD.device, need)
    if tab is not None:
        p = pos_L.to(tab[0].device)
        rot = apply_rope if torch.is_grad_enabled() else apply_rope_nograd  # equal up to rounding, fewer passes
        return rot(x_BHLD, tab[0][p], tab[1][p])
    from longctx.model.transformer import SeqContext
    c = SeqContext(positions=pos_L.to(x_BHLD.device)[None])
    cos, sin = c.rope(mixer.head_dim, mixer.rope_theta, x_BHLD.dtype, mixer.rope_scaling)
    return apply_rope(x_BHLD, cos, sin)


def compressed_selection_scores(mixer, q_BHnD: torch.Tensor, dist_n: torch.Tensor, lm_k: torch.Tensor,
                                cache: Optional[LandmarkCache] = None) -> torch.Tensor:
    """Top-k selection scores with compressed positions: query i (pre-RoPE, (B, H, n, D)) against
    every landmark key (pre-RoPE, (B, Hkv, C, D)) as if that landmark sat dist_n[i] positions
    before it. Returns (B, Hkv, G, n, C), unscaled.

    RoPE is a rotation, so the queries turn by the distance and the landmark keys are read as
    stored (at position 0: only the rotary scaling's attention factor): O(n) rotations per call.
    Roping every landmark at one shared position instead cost O(C) per call, quadratic in the
    input length. Dynamic NTK picks its frequencies from the largest position it is given: here
    a distance of at most one group, so plain RoPE's frequencies; the roped form took them from
    the compressed positions (different ones for q and k), which differs only once the selected
    groups span more than the original context."""
    B, H, n, D = q_BHnD.shape
    Hkv = lm_k.shape[1]
    tab = None if cache is None else cache.rope_table(mixer, q_BHnD.dtype, q_BHnD.device, int(dist_n.max()) + 1)
    gain = tab[0][0, 0] if tab is not None else _rope_gain(mixer, q_BHnD.dtype, q_BHnD.device)
    q_sel = _rope_at(mixer, q_BHnD, dist_n, cache) * gain
    return torch.einsum("bhgqd,bhcd->bhgqc", q_sel.view(B, Hkv, H // Hkv, n, D), lm_k)


def _rope_gain(mixer, dtype, device) -> torch.Tensor:
    """The rotary embedding's gain (cos at position 0: 1, or YaRN's attention factor), a scalar."""
    from longctx.model.transformer import SeqContext
    cos, _ = SeqContext(positions=torch.zeros(1, 1, dtype=torch.long, device=device)).rope(
        mixer.head_dim, mixer.rope_theta, dtype, mixer.rope_scaling)
    return cos.reshape(-1)[0]


def retrieval_forward(mixer: "LandmarkAttention", x_BLD: torch.Tensor, cache: LandmarkCache) -> torch.Tensor:
    """Attention for n new tokens (all in one group, positions cache.next_pos...) against the
    open group, the local window (the latest cache.local_groups groups) and the top-k older
    groups per head, with the grouped softmax. Compressed positions: the selected groups sit
    side by side in their original order just before the open group, so the local window keeps
    its true distances and the retrieved groups come right before it."""
    B, n, _ = x_BLD.shape
    W, blk = mixer.block + 1, mixer.block
    p0 = cache.next_pos
    pos = torch.arange(p0, p0 + n)
    if pos[0] // W != pos[-1] // W:
        raise ValueError(f"retrieval chunk at positions {p0}..{p0 + n - 1} crosses a group boundary "
                         f"(groups of {W}): feed at most one group per call")
    H, Hkv, D = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    G = H // Hkv
    q = mixer.q_proj(x_BLD).view(B, n, H, D).transpose(1, 2)
    k = mixer.k_proj(x_BLD).view(B, n, Hkv, D).transpose(1, 2)
    v = mixer.v_proj(x_BLD).view(B, n, Hkv, D).transpose(1, 2)
    is_lm = (pos % W) == blk
    reg = ~is_lm
    loc_k = k[:, :, reg] if cache.cur_k is None else torch.cat([cache.cur_k, k[:, :, reg]], 2)
    loc_v = v[:, :, reg] if cache.cur_v is None else torch.cat([cache.cur_v, v[:, :, reg]], 2)
    g0 = (p0 // W) * W
    loc_pos = g0 + torch.arange(loc_k.shape[2])  # regular positions of the open group
    n_loc = min(cache.local_groups, cache.n_groups)  # the local window: the latest groups, always
    n_sel = n_loc + min(cache.top_k, cache.n_groups - n_loc)
    base = n_sel * W if cache.compressed else g0  # where the open group sits
    q_pos = pos - g0 + base
    qr = _rope_at(mixer, q, q_pos, cache)
    kl = _rope_at(mixer, loc_k, loc_pos - g0 + base, cache)
    scale = 1.0 / math.sqrt(D)
    qg = qr.view(B, Hkv, G, n, D)
    s_loc = torch.einsum("bhgqd,bhkd->bhgqk", qg, kl) * scale  # (B, Hkv, G, n, Lc)
    s_loc = s_loc.masked_fill(loc_pos[None, :].to(q.device) > pos[:, None].to(q.device), -math.inf)
    out = None
    if n_sel:
        lmk = cache.stacked("lm_k")  # (B, Hkv, Gr, D)
        Gr = lmk.shape[2]
        old = Gr - n_loc  # the groups top-k chooses from; the local window's are not scored
        if cache.compressed:  # select by content: every landmark scored at one relative distance
            s_sel = compressed_selection_scores(mixer, q, pos - g0 + 1, lmk[:, :, :old], cache).amax(3)
        else:
            lm_sel_pos = torch.arange(Gr) * W + blk
            s_sel = torch.einsum("bhgqd,bhcd->bhgqc", qg, _rope_at(mixer, lmk[:, :, :old], lm_sel_pos[:old])).amax(3)
        idx = select_groups(s_sel, n_loc, n_sel - n_loc)  # (B, Hkv, G, n_sel), in original order
        bi = torch.arange(B)[:, None, None, None]
        hi = torch.arange(Hkv)[None, :, None, None]
        # (no table under dynamic NTK, whose frequencies follow each call's positions: torch path)
        fused = cache.fused_ok(q) and cache.rope_table(mixer, q.dtype, q.device, n_sel * W) is not None
        gpos = torch.arange(n_sel)
        rl = lmk[bi, hi, idx.to(lmk.device)]  # (B, Hkv, G, k, D)
        if fused:  # gathered and rotated in one pass, as the torch path below does it in three
            from longctx.kernels.landmark_cpu import gather_blocks
            tok_pos = (gpos[:, None] * W + torch.arange(blk)[None]).reshape(-1)
            cos, sin = cache.rope_table(mixer, q.dtype, q.device, n_sel * W)
            rk = gather_blocks(cache._buf["blk_k"], idx, cos[tok_pos], sin[tok_pos])  # (B, Hkv, G, k, blk, D)
            rv = gather_blocks(cache._buf["blk_v"], idx)
        else:
            sidx = idx.to(cache.stacked("blk_k").device)
            rk = cache.stacked("blk_k")[bi, hi, sidx].to(q.device)  # (B, Hkv, G, k, blk, D): only k blocks move
            rv = cache.stacked("blk_v")[bi, hi, sidx].to(q.device)
        if cache.compressed:
            if not fused:
                tok_pos = gpos[:, None] * W + torch.arange(blk)[None]  # (k, blk)
                rk = _rope_at(mixer, rk.flatten(3, 4).flatten(1, 2), tok_pos.reshape(-1), cache).view(
                    B, Hkv, G, n_sel, blk, D)
            rl = _rope_at(mixer, rl.flatten(1, 2), gpos * W + blk, cache).view(B, Hkv, G, n_sel, D)
        else:  # original positions: each head's own groups
            tok_pos = idx[..., None] * W + torch.arange(blk)  # (B, Hkv, G, k, blk)
            rk = _rope_rows(mixer, rk, tok_pos)
            rl = _rope_rows(mixer, rl[..., None, :], idx[..., None] * W + blk)[..., 0, :]
        s_blk = torch.einsum("bhgqd,bhgcjd->bhgqcj", qg, rk) * scale  # (B, Hkv, G, n, k, blk)
        s_lm = torch.einsum("bhgqd,bhgcd->bhgqc", qg, rl) * scale  # (B, Hkv, G, n, k)
        if fused:
            from longctx.kernels.landmark_cpu import combine_scores
            p_loc, w_blk = combine_scores(s_loc, s_blk, s_lm)
        else:
            logZ = torch.logsumexp(torch.cat([s_loc, s_lm], -1), -1, keepdim=True)  # (B, Hkv, G, n, 1)
            within = torch.softmax(s_blk, -1)
            w_blk = torch.exp(s_lm - logZ)[..., None] * within
            p_loc = torch.exp(s_loc - logZ)
        out = torch.einsum("bhgqcj,bhgcjd->bhgqd", w_blk, rv)
    else:
        p_loc = torch.exp(s_loc - torch.logsumexp(s_loc, -1, keepdim=True))
    o_loc = torch.einsum("bhgqk,bhkd->bhgqd", p_loc, loc_v)
    o = o_loc if out is None else o_loc + out
    # the open group grows; a landmark closes it
    if bool(is_lm[-1]):
        cache.append(k[:, :, -1].detach(), loc_k.detach(), loc_v.detach())
        cache.cur_k = cache.cur_v = None
    else:
        cache.cur_k, cache.cur_v = loc_k.detach(), loc_v.detach()
    cache.next_pos = p0 + n
    return mixer.merge(o.view(B, H, n, D))


def select_groups(s_old: torch.Tensor, n_loc: int, k: int) -> torch.Tensor:
    """Indices of the groups a head attends, ascending: the top-k by landmark score among the
    older groups s_old (..., G_old) and the n_loc local ones after them (G_old..G_old+n_loc-1),
    appended rather than scored (no score, however large or NaN, can push one out)."""
    top = s_old.topk(k, dim=-1).indices
    loc = torch.arange(s_old.shape[-1], s_old.shape[-1] + n_loc, device=s_old.device).expand(*s_old.shape[:-1], n_loc)
    return torch.cat([top.sort(-1).values, loc], -1)


def _rope_rows(mixer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE with a position per element: x (..., m, D), pos (..., m)."""
    from longctx.model.transformer import SeqContext
    flat = pos.reshape(-1)
    c = SeqContext(positions=flat.to(x.device)[None])
    cos, sin = c.rope(mixer.head_dim, mixer.rope_theta, x.dtype, mixer.rope_scaling)
    cos, sin = cos[0, 0].view(*pos.shape, -1), sin[0, 0].view(*pos.shape, -1)
    return apply_rope(x, cos, sin)


def insert_landmarks(ids: np.ndarray, block: int, landmark_id: int, start: int = 0) -> np.ndarray:
    """Regular token ids -> the landmark layout (a landmark after every `block` regular tokens),
    for a stream whose first token sits at position `start` (a group boundary or not)."""
    W = block + 1
    out: List[int] = []
    p = start
    for t in np.asarray(ids, dtype=np.int64).tolist():
        if p % W == block:
            out.append(landmark_id)
            p += 1
        out.append(t)
        p += 1
    return np.asarray(out, dtype=np.int64)


class RetrievalStream:
    """Streams a landmark model over an arbitrarily long input, one group at a time, keeping
    per layer only landmark keys on the device and the k retrieved blocks per head (plus the
    local window of `local_groups` latest groups and the open group) in the attention. Every
    attention layer must be `landmark`; recurrent mixers (lightning) carry their state."""

    def __init__(self, model, block: int, landmark_id: int, top_k: int = 4, compressed_positions: bool = True,
                 offload: bool = False, local_groups: int = LOCAL_GROUPS, fused: bool = True):
        from longctx.model.transformer import SeqContext  # noqa: F401 (import check)
        bad = sorted({type(l.mixer).__name__ for l in model.layers
                      if not isinstance(l.mixer, LandmarkAttention) and not getattr(l.mixer, "carries_state", False)})
        if bad:
            raise ValueError(f"landmark retrieval streams every layer: {', '.join(bad)} cannot carry state "
                             f"(use landmark attention in every attention layer)")
        self.model, self.block, self.landmark_id = model.eval(), block, landmark_id
        self.state = {"landmark_retrieval": dict(top_k=top_k, compressed_positions=compressed_positions,
                                                 offload=offload, local_groups=local_groups, fused=fused)}
        self.pos = 0
        self.last_hidden: Optional[torch.Tensor] = None

    @torch.no_grad()
    def feed(self, stream_ids: np.ndarray) -> torch.Tensor:
        """Feed ids already in the landmark layout (continuing at self.pos): (n,) for one row or
        (B, n) for B rows in step (every row at the same positions; each row and head picks its
        own top-k blocks). Returns the final hidden states (B, n, D) of the fed tokens."""
        from longctx.model.transformer import SeqContext
        W = self.block + 1
        dev = self.model.head_weight.device  # the model's device (the cache's store may be the host)
        ids = torch.as_tensor(np.asarray(stream_ids, dtype=np.int64), device=dev)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise ValueError(f"RetrievalStream.feed: ids of shape {tuple(ids.shape)}; pass (n,) or (rows, n)")
        B, outs, a = ids.shape[0], [], 0
        while a < ids.shape[1]:
            b = min(ids.shape[1], a + W - (self.pos % W))  # up to the end of the open group
            ctx = SeqContext(positions=torch.arange(self.pos, self.pos + b - a, device=dev)[None].expand(B, -1),
                             state=self.state, carry=True)
            outs.append(self.model.hidden(ids[:, a:b], ctx))
            self.pos += b - a
            a = b
        h = torch.cat(outs, 1)
        self.last_hidden = h[:, -1]
        return h

    def fork(self, rows: int, capacity: int = 0) -> "RetrievalStream":
        """A stream of `rows` rows, each continuing this one-row stream from where it stands (a
        shared prompt prefix computed once: RetrievalStream.generate_shared). Every cached tensor is
        copied per row; landmark caches get buffers for `capacity` groups (0: as many as they hold)."""
        if self.last_hidden is not None and self.last_hidden.shape[0] != 1:
            raise ValueError(f"RetrievalStream.fork: this stream has {self.last_hidden.shape[0]} rows; fork a one-row stream")
        new = object.__new__(RetrievalStream)
        new.model, new.block, new.landmark_id, new.pos = self.model, self.block, self.landmark_id, self.pos
        new.last_hidden = None if self.last_hidden is None else self.last_hidden.expand(rows, -1).contiguous()
        new.state = {}
        for key, val in self.state.items():
            if key == "landmark_retrieval":
                new.state[key] = dict(val)
            elif isinstance(val, LandmarkCache):
                new.state[key] = val.repeat_rows(rows, capacity)
            elif isinstance(val, torch.Tensor) and val.dim() and val.shape[0] == 1:  # carried recurrent state
                new.state[key] = val.expand(rows, *val.shape[1:]).contiguous()
            else:
                raise ValueError(f"RetrievalStream.fork: state entry {key!r} ({type(val).__name__}) cannot be copied "
                                 f"per row; fork supports landmark caches and one-row tensors")
        return new

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, eos_id: Optional[int] = None):
        """Greedy continuation of regular prompt ids (landmarks inserted on the way).

        prompt_ids (Lp,) -> List[int]; (B, Lp), or a list of B prompts of different lengths -> B
        lists, the rows decoded in step: the rows share positions, so a row whose prompt ends
        first feeds its own greedy tokens while the longer ones feed the rest of theirs, one token
        per call. Each row sees its own tokens at their own positions, but top-k selection is
        made per call (the largest landmark score over the call's queries): a longer row's prompt
        tail, fed a token at a time, may select other blocks than when its whole prompt is fed
        at once. Rows of equal length decode exactly as alone (up to rounding). A row stops at
        eos_id or after max_new_tokens; the others go on."""
        if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim == 1 or \
                isinstance(prompt_ids, (list, tuple)) and prompt_ids and np.isscalar(prompt_ids[0]):
            return self.generate([np.asarray(prompt_ids)], max_new_tokens, eos_id)[0]
        rows = [np.asarray(r, dtype=np.int64) for r in prompt_ids]
        if not rows or any(r.ndim != 1 for r in rows):
            raise ValueError("RetrievalStream.generate: pass one prompt (n,), a (rows, n) array or a list of 1-D prompts")
        lens = [len(r) for r in rows]
        if self.last_hidden is not None and self.last_hidden.shape[0] != len(rows):
            raise ValueError(f"RetrievalStream.generate: {len(rows)} prompts for a stream of "
                             f"{self.last_hidden.shape[0]} rows")
        if self.pos == 0:  # the caches are sized for the whole input (plus landmarks) at once
            total = max(lens) + max_new_tokens + 1
            self.state["landmark_retrieval"]["capacity"] = total // self.block + 1
        W, m = self.block + 1, min(lens)
        if m:
            self.feed(np.stack([insert_landmarks(r[:m], self.block, self.landmark_id, self.pos) for r in rows]))
        elif self.last_hidden is None:
            raise ValueError("RetrievalStream.generate: an empty prompt on a fresh stream has nothing to continue")
        if self.pos % W == self.block:  # the common part filled a group: its landmark comes next
            self.feed(np.full((len(rows), 1), self.landmark_id))
        out: List[List[int]] = [[] for _ in rows]
        if max_new_tokens < 1:
            return out
        done = np.zeros(len(rows), dtype=bool)
        t = m  # the regular index of the token fed next (the last hidden state predicts it)
        while True:
            logits = torch.nn.functional.linear(self.last_hidden, self.model.head_weight)  # (B, V)
            pred = logits.argmax(-1).cpu().numpy()
            for i, ti in enumerate(pred.tolist()):
                if t >= lens[i] and not done[i]:  # past row i's prompt: a generated token
                    done[i] = eos_id is not None and ti == eos_id
                    if not done[i]:
                        out[i].append(ti)
                    done[i] |= len(out[i]) >= max_new_tokens
            if done.all():
                break
            nxt = np.array([rows[i][t] if t < lens[i] else pred[i] for i in range(len(rows))], dtype=np.int64)[:, None]
            if (self.pos + 1) % W == self.block:
                nxt = np.concatenate([nxt, np.full((len(rows), 1), self.landmark_id)], 1)
            self.feed(nxt)
            t += 1
        return out

    @classmethod
    @torch.no_grad()
    def generate_shared(cls, model, block: int, landmark_id: int, prompts, max_new_tokens: int, batch: int,
                        eos_id: Optional[int] = None, progress=None, **stream_kw) -> List[List[int]]:
        """generate() for many prompts, `batch` rows at a time, computing shared prompt prefixes
        once: the prompts are taken in sorted order (prompts with a long common prefix side by
        side), one one-row "trunk" stream is fed each batch's common prefix (continuing from the
        batch before when that batch's prefix is a prefix of this one's) and fork()ed into the
        batch's rows, which go on with their own tokens (greedy, the same positions). Not exactly
        as alone: top-k selection is made per fed call (the largest landmark score over its
        queries), and the group holding the fork point is fed in two calls (the trunk's part,
        then the rows'), as are the prompt tails of a batch's longer rows (generate): those
        groups may select other blocks than one whole-group call would. A passkey set of one
        length shares everything before each key: the rows compute about half their tokens. progress(n): called after each batch with its rows. Returns the
        continuations in the prompts' order."""
        if batch < 1:
            raise ValueError(f"generate_shared: batch={batch}; use >= 1 rows per batch")
        rows = [np.asarray(p, dtype=np.int64) for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: rows[i].tolist())
        out: List[Optional[List[int]]] = [None] * len(rows)

        def lcp(a: np.ndarray, b: np.ndarray) -> int:
            n = min(len(a), len(b))
            d = np.flatnonzero(a[:n] != b[:n])
            return int(d[0]) if len(d) else n

        trunk, fed = None, np.zeros(0, dtype=np.int64)  # fed: the regular ids the trunk holds
        for a in range(0, len(order), batch):
            idx = order[a:a + batch]
            first = rows[idx[0]]
            f = min(lcp(first, rows[i]) for i in idx)
            # every row keeps at least one token of its own to feed (a prompt that is the whole
            # prefix still gets its first answer from its own step)
            f = max(0, min(f, min(len(rows[i]) for i in idx) - 1))
            if trunk is None or f < len(fed) or lcp(fed, first) < len(fed):
                trunk, fed = cls(model, block, landmark_id, **stream_kw), np.zeros(0, dtype=np.int64)
                trunk.state["landmark_retrieval"]["capacity"] = f // block + 2
            if f > len(fed):
                trunk.feed(insert_landmarks(first[len(fed):f], block, landmark_id, trunk.pos))
                fed = first[:f]
            total = max(len(rows[i]) for i in idx) + max_new_tokens + 1
            st = trunk.fork(len(idx), capacity=total // block + 1) if f else cls(model, block, landmark_id, **stream_kw)
            if not f:
                st.state["landmark_retrieval"]["capacity"] = total // block + 1
            for i, o in zip(idx, st.generate([rows[i][f:] for i in idx], max_new_tokens, eos_id)):
                out[i] = o
            del st
            if progress is not None:
                progress(len(idx))
        return out  # type: ignore[return-value]
