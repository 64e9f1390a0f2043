"""The Titans mixers over the neural memory (titans.py), registered by name:

  memory  LMM alone: y = NeuralMemory(x).
  mag     memory as a gate: o = W_o(RMSNorm(SWA(x)) ⊙ sigmoid(RMSNorm(NeuralMemory(x)))),
          SWA = sliding-window softmax attention (window model.memory.window, RoPE).
  mal     memory as a layer: o = W_o SWA(NeuralMemory(x)).
  mac     memory as context, segment by segment (length model.memory.segment), for segment s:
            h = M*_{s−1}(q(x_s))                      retrieval with the segment-start weights
            y = Attn([persistent ‖ h ‖ x_s])           queries from x_s only; x_i sees every
                                                       persistent token, h_j and x_j for j <= i
            r, M_s = NeuralMemory(y; state M_{s−1})    memory updated with the attention output
                                                       (per-token reads, so still causal)
            o = W_o(RMSNorm(y) ⊙ sigmoid(RMSNorm(r)))
          The paper's o_t = y_t ⊗ M*_t(y_t) reads the weights after the whole segment's update,
          which would let token i see tokens j > i of its segment; we read M_i (after token i's
          own update) instead, which keeps the language model causal.

Carried state (ctx.carry): memory weights and momentum, the conv tails, and for mag/mal the
last window−1 keys/values, in ctx.state under "<mixer>.<layer>". Streaming in pieces equals
one pass for memory/mag/mal at any split, and for mac at splits on segment boundaries.
Documents are not masked (the memory would need a reset at each boundary): doc_ids are refused.

Sequence parallel (contiguous layout, rank order = sequence order): all four hand the same
carried state from rank r to r+1 (parallel/state_passing.hand_off; gradients travel back), so
P ranks equal one process exactly. Each shard must end on a chunk boundary, so the memory state
is weights + momentum (no partial chunk); mag/mal also need shards of at least window−1 tokens,
and mac shards that are whole segments (segments are then rank-local: segment boundaries at
multiples of model.memory.segment from the global start), its state being the memory state,
retrieval's x-side conv tail and the update's y-side conv tail. ctx.carry with SP is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from longctx.kernels.flash import flash_attn
from longctx.memory.titans import NeuralMemory, detach_state
from longctx.model.layers import RMSNorm
from longctx.model.mixers import register_mixer
from longctx.model.rope import apply_rope, scaling_key

Tensor = torch.Tensor


def build_memory(cfg, layer_idx: int, name: str) -> NeuralMemory:
    m = cfg.memory
    return NeuralMemory(cfg.d_model, m.heads or cfg.n_heads, m.depth, m.chunk, m.max_lr, m.expansion, m.conv,
                        m.max_state_norm, cfg.norm_eps, name=f"{name} mixer (layer {layer_idx})",
                        recompute=getattr(m, "recompute", 0))


def memory_fwd_flops(cfg, heads: Optional[int] = None):
    """(projection params, forward FLOPs per token) of one NeuralMemory, from the closed forms in
    titans.py (d head dim, h hidden, c chunk): depth 1 H(10d² + 4cd + 2c²), depth 2
    H(22dh + 4cd + 4ch + 2c²); approximate (elementwise work not counted)."""
    m = cfg.memory
    H = heads or m.heads or cfg.n_heads
    d, c = cfg.d_model // H, m.chunk
    h = m.expansion * d
    mix = 10 * d * d + 4 * c * d + 2 * c * c if m.depth == 1 else 22 * d * h + 4 * c * d + 4 * c * h + 2 * c * c
    return 5 * cfg.d_model * H * d + 3 * H * cfg.d_model, H * mix


def _no_docs(ctx, name: str) -> None:
    if ctx.doc_ids is not None:
        raise ValueError(f"{name}: the Titans mixers do not mask documents yet (the memory would need a reset at "
                         f"each boundary); set data.mask_documents=false or use softmax/lightning layers")


class _Attention(nn.Module):
    """Softmax attention projections (n_heads, n_kv_heads, RoPE) over flash_attn."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.head_dim = hd = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = scaling_key(cfg)
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * hd, bias=cfg.attn_bias)

    def heads(self, t: Tensor, n: int) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, n, self.head_dim).transpose(1, 2)  # (B, n, L, hd)

    def rope(self, pos_L: Tensor, dtype) -> tuple:
        """cos, sin with the model's RoPE settings (scaling included), as softmax attention."""
        from longctx.model.transformer import SeqContext
        return SeqContext(positions=pos_L[None]).rope(self.head_dim, self.rope_theta, dtype, self.rope_scaling)

    def sliding(self, x_BLD: Tensor, pos_L: Tensor, window: int, tail: Optional[dict]):
        """Sliding-window causal attention (keys i − window < j <= i) with the carried tail of
        roped keys/values; returns merged heads (B, L, n_heads·hd) and the new tail."""
        cos, sin = self.rope(pos_L, x_BLD.dtype)
        q = apply_rope(self.heads(self.q_proj(x_BLD), self.n_heads), cos, sin)
        k = apply_rope(self.heads(self.k_proj(x_BLD), self.n_kv), cos, sin)
        v = self.heads(self.v_proj(x_BLD), self.n_kv)
        k_pos = pos_L
        if tail is not None:
            k, v, k_pos = torch.cat([tail["k"], k], 2), torch.cat([tail["v"], v], 2), torch.cat([tail["pos"], pos_L])
        o, _ = flash_attn(q, k, v, causal=True, window=window, q_pos=pos_L, k_pos=k_pos)
        keep = max(window - 1, 0)
        new_tail = {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:],  # detached by callers that carry
                    "pos": k_pos[k_pos.shape[0] - keep:]}
        B, _, L, _ = o.shape
        return o.transpose(1, 2).reshape(B, L, -1), new_tail


def _positions(ctx, L: int) -> Tensor:
    """Global positions (L,), shared by the batch rows (as the flash kernel's masks need)."""
    pos = ctx.positions
    if pos.dim() == 2 and pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
        raise ValueError("Titans mixers: ctx.positions must be the same for every batch row")
    return pos.reshape(-1, L)[0]


@register_mixer("memory")
class TitansMemory(nn.Module):
    """LMM: the neural memory alone. Sequence-parallel by handing the memory state (weights,
    momentum, conv tail) from rank r to r+1 (parallel/state_passing.hand_off), or with
    model.memory.sp_mode=ulysses by an all-to-all over memory heads (titans_ulysses.py): exact."""
    supports_sp = True
    kind = "memory"
    sp_layouts = ("contiguous",)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int):
        return memory_fwd_flops(cfg)

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mem = build_memory(cfg, layer_idx, "memory")
        # with model.memory.recompute the module checkpoints its own pieces (the block is then not
        # checkpointed as a whole: transformer.Block.checkpointed)
        self.recomputes_itself = self.mem.recompute > 0
        self.sp_mode = getattr(cfg.memory, "sp_mode", "handoff")  # handoff | ulysses (titans_ulysses.py)

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        _no_docs(ctx, "memory")
        if ctx.sp is not None and ctx.sp.size > 1:
            return self._forward_sp(x_BLD, ctx)
        key = f"memory.{self.layer_idx}"
        y, st = self.mem(x_BLD, ctx.state.get(key) if ctx.carry else None)
        if ctx.carry:
            ctx.state[key] = detach_state(st)
        return y


    def _forward_sp(self, x_BLD: Tensor, ctx) -> Tensor:
        if ctx.carry:
            raise ValueError("memory mixer: streaming with carried state runs on one rank: pass ctx.sp=None")
        if self.sp_mode == "ulysses":
            from longctx.memory.titans_ulysses import memory_ulysses
            return memory_ulysses(self.mem, x_BLD, ctx.sp)
        L = x_BLD.shape[1]
        if L % self.mem.chunk:
            raise ValueError(f"memory mixer: a shard of {L} tokens is not a multiple of model.memory.chunk="
                             f"{self.mem.chunk}: pick data.seq_len so that seq_len / parallel.sp is")

        def body(state, extra):
            y, st = self.mem(x_BLD, state)
            return y, st, extra

        return _hand_off_memory(self, x_BLD, ctx, [], body)


def _detach_tail(tail: dict) -> dict:
    return {"k": tail["k"].detach(), "v": tail["v"].detach(), "pos": tail["pos"]}


def _hand_off_memory(mixer, x_BLD: Tensor, ctx, extra0: list, body) -> Tensor:
    """Run body sequence-parallel with mixer.mem's state (weights, momentum, conv tail) and the
    mixer's own carried tensors (extra0: rank 0's start, shapes fixed on every rank) handed from
    rank r to r+1 (parallel/state_passing.hand_off). The callers check that a shard ends on a
    chunk boundary, so no partial chunk (grad_weights, offset) has to travel.
    body(mem_state, extra) -> (y, mem_state, extra)."""
    from longctx.memory.titans import MemoryState
    from longctx.parallel.state_passing import hand_off
    mem, B = mixer.mem, x_BLD.shape[0]
    st0 = mem.initial_state(B, x_BLD.dtype)
    n = len(st0["mem"].weights)
    conv0 = x_BLD.new_zeros(B, mem.kernel - 1, mem.qkv_proj.out_features)  # = the None tail of one process
    flat0 = [*st0["mem"].weights, *st0["mem"].momentum, conv0, *extra0]

    def run(flat):
        state = {"mem": MemoryState(tuple(flat[:n]), tuple(flat[n:2 * n])), "conv": flat[2 * n]}
        y, mst, extra = body(state, flat[2 * n + 1:])
        return y, [*mst["mem"].weights, *mst["mem"].momentum, mst["conv"], *extra]

    return hand_off(run, flat0, ctx.sp, op=f"{mixer.kind}_state")


def _sp_with_tail(mixer, x_BLD: Tensor, ctx, body) -> Tensor:
    """Sequence-parallel mag / mal: the memory state and the sliding window's last window-1
    keys/values are handed from rank r to r+1 (parallel/state_passing.hand_off).
    body(x, pos, mem_state, swa_tail) -> (y, mem_state, swa_tail)."""
    if ctx.carry:
        raise ValueError(f"{mixer.kind}: streaming with carried state runs on one rank: pass ctx.sp=None")
    B, L, _ = x_BLD.shape
    mem, attn, keep = mixer.mem, mixer.attn, max(mixer.window - 1, 0)
    if L % mem.chunk or L < keep:
        raise ValueError(f"{mixer.kind}: a shard of {L} tokens must be a multiple of model.memory.chunk={mem.chunk} "
                         f"and at least model.memory.window - 1 = {keep} long: change data.seq_len or parallel.sp")
    pos = _positions(ctx, L)
    kv0 = [x_BLD.new_zeros(B, attn.n_kv, keep, attn.head_dim) for _ in range(2 if keep else 0)]  # window 1: none
    # rank 0 has no previous keys: its zero tail sits a full window before the first query (masked)
    first = int(pos[0]) - (mixer.window if ctx.sp.rank == 0 else 0) - keep
    tail_pos = first + torch.arange(keep, device=pos.device)

    def run(mem_state, kv):
        tail_in = {"k": kv[0], "v": kv[1], "pos": tail_pos} if keep else None
        y, mst, tail = body(x_BLD, pos, mem_state, tail_in)
        return y, mst, ([tail["k"], tail["v"]] if keep else [])

    return _hand_off_memory(mixer, x_BLD, ctx, kv0, run)


@register_mixer("mag")
class TitansMAG(nn.Module):
    """Memory as a gate over sliding-window attention."""
    supports_sp = True  # memory state and window tail handed rank to rank
    kind = "mag"
    sp_layouts = ("contiguous",)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int):
        p, f = memory_fwd_flops(cfg)
        w = min(cfg.memory.window, seq_len)
        return p + 4 * cfg.d_model * cfg.d_model, f + 4 * w * cfg.d_model

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, cfg.memory.window
        self.attn = _Attention(cfg)
        self.mem = build_memory(cfg, layer_idx, "mag")
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mem_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.n_heads * self.attn.head_dim, cfg.d_model, bias=False)

    def _body(self, x_BLD, pos, mem_state, tail):
        a, tail = self.attn.sliding(x_BLD, pos, self.window, tail)
        m, mst = self.mem(x_BLD, mem_state)
        return self.o_proj(self.attn_norm(a) * torch.sigmoid(self.mem_norm(m))), mst, tail

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        _no_docs(ctx, "mag")
        if ctx.sp is not None and ctx.sp.size > 1:
            return _sp_with_tail(self, x_BLD, ctx, self._body)
        key = f"mag.{self.layer_idx}"
        st = ctx.state.get(key, {}) if ctx.carry else {}
        a, tail = self.attn.sliding(x_BLD, _positions(ctx, x_BLD.shape[1]), self.window, st.get("swa"))
        m, mst = self.mem(x_BLD, st.get("mem"))
        if ctx.carry:
            ctx.state[key] = {"swa": _detach_tail(tail), "mem": detach_state(mst)}
        return self.o_proj(self.attn_norm(a) * torch.sigmoid(self.mem_norm(m)))


@register_mixer("mal")
class TitansMAL(nn.Module):
    """Memory as a layer: sliding-window attention over the memory's output."""
    supports_sp = True  # memory state and window tail handed rank to rank
    kind = "mal"
    sp_layouts = ("contiguous",)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int):
        p, f = memory_fwd_flops(cfg)
        w = min(cfg.memory.window, seq_len)
        return p + 4 * cfg.d_model * cfg.d_model, f + 4 * w * cfg.d_model

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, cfg.memory.window
        self.mem = build_memory(cfg, layer_idx, "mal")
        self.attn = _Attention(cfg)
        self.o_proj = nn.Linear(cfg.n_heads * self.attn.head_dim, cfg.d_model, bias=False)

    def _body(self, x_BLD, pos, mem_state, tail):
        m, mst = self.mem(x_BLD, mem_state)
        a, tail = self.attn.sliding(m, pos, self.window, tail)
        return self.o_proj(a), mst, tail

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        _no_docs(ctx, "mal")
        if ctx.sp is not None and ctx.sp.size > 1:
            return _sp_with_tail(self, x_BLD, ctx, self._body)
        key = f"mal.{self.layer_idx}"
        st = ctx.state.get(key, {}) if ctx.carry else {}
        m, mst = self.mem(x_BLD, st.get("mem"))
        a, tail = self.attn.sliding(m, _positions(ctx, x_BLD.shape[1]), self.window, st.get("swa"))
        if ctx.carry:
            ctx.state[key] = {"swa": _detach_tail(tail), "mem": detach_state(mst)}
        return self.o_proj(a)


@register_mixer("mac")
class TitansMAC(nn.Module):
    """Memory as context: per segment, retrieval + persistent tokens + segment attention, then
    the memory is updated with the attention output (see the module docstring). Sequence-parallel
    with shards that are whole segments: the memory state and both conv tails (retrieval's x-side,
    update's y-side) are handed from rank r to r+1 (parallel/state_passing.hand_off): exact."""
    supports_sp = True
    kind = "mac"
    sp_layouts = ("contiguous",)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int):
        p, f = memory_fwd_flops(cfg)
        S = min(cfg.memory.segment, seq_len)
        # memory scan over y, retrieval q·W (~2 d² per head), attention over Np + 2S keys (half: causal)
        d = cfg.d_model
        return p + 4 * d * d + d * d, f + 2 * d * d // (cfg.memory.heads or cfg.n_heads) + 2 * d * (cfg.memory.n_persistent + 2 * S)

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx, self.segment = layer_idx, cfg.memory.segment
        self.mem = build_memory(cfg, layer_idx, "mac")
        self.attn = _Attention(cfg)
        self.attn_out = nn.Linear(cfg.n_heads * self.attn.head_dim, cfg.d_model, bias=False)
        self.persistent = nn.Parameter(torch.randn(cfg.memory.n_persistent, cfg.d_model) * cfg.init_std)
        self.y_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.r_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _segment_attention(self, x_BSD: Tensor, h_BSD: Tensor) -> Tensor:
        """Attention of x's queries over [persistent ‖ h ‖ x] (segment-local, causal in j)."""
        B, S, _ = x_BSD.shape
        Np = self.persistent.shape[0]
        at = self.attn
        ctx_BTD = torch.cat([self.persistent.to(x_BSD.dtype).expand(B, Np, -1), h_BSD, x_BSD], 1)
        loc = torch.arange(S, device=x_BSD.device)
        rope_k = torch.cat([torch.zeros(Np, dtype=torch.long, device=loc.device), loc, loc])
        mask_k = torch.cat([torch.full((Np,), -1, dtype=torch.long, device=loc.device), loc, loc])
        cq, sq = at.rope(loc, x_BSD.dtype)
        ck, sk = at.rope(rope_k, x_BSD.dtype)
        q = apply_rope(at.heads(at.q_proj(x_BSD), at.n_heads), cq, sq)
        k = apply_rope(at.heads(at.k_proj(ctx_BTD), at.n_kv), ck, sk)
        v = at.heads(at.v_proj(ctx_BTD), at.n_kv)
        o, _ = flash_attn(q, k, v, causal=True, q_pos=loc, k_pos=mask_k)
        return self.attn_out(o.transpose(1, 2).reshape(B, S, -1))

    def _segments(self, x_BLD: Tensor, mem_y: dict, x_conv: Optional[Tensor]):
        """The segment loop over x_BLD, segments counted from its first token. mem_y: the memory's
        state (its conv tail is the y side's); x_conv: retrieval's conv tail. Returns (o_BLD, mem_y,
        x_conv) after the last segment."""
        outs = []
        for s0 in range(0, x_BLD.shape[1], self.segment):
            x = x_BLD[:, s0:s0 + self.segment]
            h, x_conv = self.mem.read(x, {"mem": mem_y["mem"], "conv": x_conv})
            y = self._segment_attention(x, h)
            r, mem_y = self.mem(y, mem_y)
            outs.append(self.o_proj(self.y_norm(y) * torch.sigmoid(self.r_norm(r))))
        return torch.cat(outs, 1), mem_y, x_conv

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        _no_docs(ctx, "mac")
        if ctx.sp is not None and ctx.sp.size > 1:
            return self._forward_sp(x_BLD, ctx)
        key = f"mac.{self.layer_idx}"
        st = ctx.state.get(key) if ctx.carry else None
        if st is None:
            st = {"x": self.mem.initial_state(x_BLD.shape[0], x_BLD.dtype), "y_conv": None}
        o, mem_y, x_conv = self._segments(x_BLD, {"mem": st["x"]["mem"], "conv": st["y_conv"]}, st["x"]["conv"])
        if ctx.carry:
            d = detach_state(mem_y)
            ctx.state[key] = {"x": {"mem": d["mem"], "conv": None if x_conv is None else x_conv.detach()},
                              "y_conv": d["conv"]}
        return o

    def _forward_sp(self, x_BLD: Tensor, ctx) -> Tensor:
        if ctx.carry:
            raise ValueError("mac: streaming with carried state runs on one rank: pass ctx.sp=None")
        B, L, _ = x_BLD.shape
        S, c = self.segment, self.mem.chunk
        # a segment split between ranks would attend across the split; one ending inside a chunk
        # would leave a partial chunk's state (grad_weights, offset) to hand on
        if L % S:
            raise ValueError(f"mac: a shard of {L} tokens is not a multiple of model.memory.segment={S} (a segment "
                             f"must not straddle two ranks): make data.seq_len a multiple of parallel.sp x {S}")
        if S % c:
            raise ValueError(f"mac: model.memory.segment={S} is not a multiple of model.memory.chunk={c}, which the "
                             f"hand-off between ranks needs: use segment {max(c, S // c * c)}")
        x_conv0 = x_BLD.new_zeros(B, self.mem.kernel - 1, self.mem.qkv_proj.out_features)

        def body(mem_y, extra):
            o, mem_y, x_conv = self._segments(x_BLD, mem_y, extra[0])
            return o, mem_y, [x_conv]

        return _hand_off_memory(self, x_BLD, ctx, [x_conv0], body)
