"""The `lightning` mixer: TransNormerLLM's linear attention layer over `lightning_attn`.

q, k, v = SiLU(W x) per head; per-head decay = ALiBi slope_h * (1 - l/(L-1) + 1e-5) for layer
l of L (fixed buffers, as in TNL: lower layers decay faster, upper layers remember longer);
o = RMSNorm(lightning(q, k, v)) * sigmoid(W_g x); out = W_o o. No positional encoding: the
decay orders the tokens. Under sequence parallelism the state is passed between ranks
(parallel/state_passing.py); with `ctx.carry` the recurrent state is carried across segments
for streaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.kernels.lightning import lightning_attn_rows
from longctx.model.layers import RMSNorm
from longctx.model.mixers import register_mixer


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi slopes (Press et al.): 2^(-8 i / n) for n a power of two, interleaved otherwise."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        m = 2 ** math.floor(math.log2(n_heads))
        s = pow2(m) + pow2(2 * m)[0::2][: n_heads - m]
    return torch.tensor(s, dtype=torch.float32)


def tnl_decay(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """TransNormerLLM's per-layer decay rates s_h * (1 - l/(L-1) + 1e-5)."""
    depth = 1 - layer_idx / (n_layers - 1) + 1e-5 if n_layers > 1 else 1.0
    return alibi_slopes(n_heads) * depth


@register_mixer("lightning")
class LightningAttention(nn.Module):
    supports_sp = True  # by state passing: see parallel/state_passing.py
    carries_state = True  # ctx.carry streams segments (landmark retrieval inference relies on it)

    @staticmethod
    def mixer_fwd_flops(cfg, seq_len: int, chunk: int = 64):
        """q, k, v, gate, out projections; per token the chunked kernel's intra-chunk tiles
        (2 x 2*C*hd, full tiles), inter-chunk product and chunk state (2 x 2*hd*hd) per head."""
        d, H = cfg.d_model, cfg.n_heads
        hd = d // H
        return 5 * d * d, H * (4 * chunk * hd + 4 * hd * hd)

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        d, hd = cfg.d_model, self.n_heads * self.head_dim
        # q/k/v biases with model.attn_bias, as the softmax layers (a hybrid converted from Qwen2 keeps them)
        self.q_proj = nn.Linear(d, hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, hd, bias=cfg.attn_bias)
        self.g_proj = nn.Linear(d, hd, bias=False)
        self.o_proj = nn.Linear(hd, d, bias=False)
        self.norm = RMSNorm(hd, cfg.norm_eps)
        # derived from the config, so not saved in checkpoints
        self.register_buffer("decay", tnl_decay(self.n_heads, layer_idx, cfg.n_layers), persistent=False)

    def forward(self, x_BLD: torch.Tensor, ctx) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        heads = lambda t: t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731 (B, H, L, D)
        q, k, v = (heads(F.silu(p(x_BLD))) for p in (self.q_proj, self.k_proj, self.v_proj))
        key = f"lightning.{self.layer_idx}"
        if ctx.sp is not None and ctx.sp.size > 1:
            if ctx.carry:
                raise ValueError("streaming with carried state runs on one rank: pass ctx.sp=None")
            from longctx.parallel.state_passing import lightning_attn_sp
            o = lightning_attn_sp(q, k, v, self.decay, 1.0, ctx.sp, ctx.doc_ids)
        else:
            init = ctx.state.get(key) if ctx.carry else None
            o, final, _ = lightning_attn_rows(q, k, v, self.decay, 1.0, ctx.doc_ids, init)
            if ctx.carry:
                ctx.state[key] = final.detach()
        o = self.norm(o.transpose(1, 2).reshape(B, L, -1)) * torch.sigmoid(self.g_proj(x_BLD))
        return self.o_proj(o)
