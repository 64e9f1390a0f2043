"""Rotary position embedding, driven by global position ids so that sequence shards agree.

Convention: the "rotate half" layout of Hugging Face LLaMA (first half of the head dim pairs
with the second half), so imported weights need no permutation. Scaling methods (PI / NTK /
YaRN / llama3) plug in through `inv_freq` later.
"""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies theta^(-2i/d), in fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)).float()


def rope_cos_sin(positions_BL: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, L, head_dim) for the given global positions.

    Angles are formed in fp32 from integer positions (exact up to 2^24 tokens) so that a
    sharded sequence gets exactly the angles of the unsharded one.
    """
    ang = positions_BL.to(torch.float32)[..., None] * inv_freq.to(positions_BL.device)  # (B, L, D/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHLD * cos + _rotate_half(x_BHLD) * sin
