"""Grouped-query softmax attention (torch SDPA) with RoPE on global positions."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.model.mixers import register_mixer
from longctx.model.rope import apply_rope, scaling_key
from longctx.parallel.ulysses import sp_attention


@register_mixer("softmax")
class SoftmaxAttention(nn.Module):
    """Causal multi-head attention with n_kv_heads <= n_heads (GQA). Projection names follow
    Hugging Face LLaMA (q_proj, k_proj, v_proj, o_proj) so weights import without renaming.

    Without sequence parallelism: torch SDPA. Under SP: Ulysses, ring or the hybrid
    (parallel/ulysses.py) over the flash kernel, masks from global positions."""
    supports_sp = True
    sp_layouts = ("contiguous", "zigzag")

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = scaling_key(cfg)  # hashable: a cache key
        d, hd = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def project(self, x_BLD: torch.Tensor, ctx):
        """q (B, H, L, D), k and v (B, Hkv, L, D), q and k rotated at ctx's positions with this
        layer's RoPE settings (scaling included). Shared by the attention mixers built on this one."""
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope(self.head_dim, self.rope_theta, x_BLD.dtype, self.rope_scaling)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, o_BHLD: torch.Tensor) -> torch.Tensor:
        """Heads back to (B, L, d_model) through o_proj."""
        B, H, L, D = o_BHLD.shape
        return self.o_proj(o_BHLD.transpose(1, 2).reshape(B, L, H * D))

    def forward(self, x_BLD: torch.Tensor, ctx) -> torch.Tensor:
        q, k, v = self.project(x_BLD, ctx)
        if ctx.sp is not None and ctx.sp.size > 1:
            pos, doc, meta = ctx.sp_meta()
            return self.merge(sp_attention(q, k, v, ctx.sp, pos, doc, causal=True, meta=meta))
        mask = ctx.causal_doc_mask()  # None when documents are not masked: plain causal path
        if self.n_kv_heads != self.n_heads:
            # SDPA's enable_gqa does not reach every CPU kernel; expanding K/V is exact and cheap here.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.merge(o)
