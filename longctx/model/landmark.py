"""Landmark attention mixer: grouped softmax over blocks, each closed by a landmark token
(kernels/landmark_torch.py). Same projections as softmax attention (weights import alike).

The sequence must follow the landmark layout from position 0: a landmark at every position p
with p % (block + 1) == block (the data pipeline inserts them: train/data.py). Under sequence
parallelism it runs Ulysses (each rank sees whole sequences for its heads), contiguous layout.
"""
from __future__ import annotations

import torch

from longctx.kernels.landmark_torch import landmark_attn
from longctx.model.mixers import register_mixer
from longctx.model.rope import apply_rope
from longctx.model.softmax import SoftmaxAttention


@register_mixer("landmark")
class LandmarkAttention(SoftmaxAttention):
    supports_sp = True
    sp_layouts = ("contiguous",)
    ring_ok = False  # Ulysses only

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.block = cfg.landmark_block

    def forward(self, x_BLD: torch.Tensor, ctx) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope(self.head_dim, self.rope_theta, x_BLD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = lambda q_, k_, v_: landmark_attn(q_, k_, v_, self.block)  # noqa: E731
        if ctx.sp is not None and ctx.sp.size > 1:
            from longctx.parallel.ulysses import ulysses_apply
            o = ulysses_apply(q, k, v, ctx.sp, attn)
        else:
            o = attn(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
