"""Building blocks shared by every model: RMSNorm and the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in at least fp32 for stability (as LLaMA does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x = x_BLD.to(torch.promote_types(x_BLD.dtype, torch.float32))  # fp32 at least, fp64 kept
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(x_BLD.dtype)


def llama_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's rule: 2/3 of 4*d, rounded up to a multiple (keeps matmuls aligned)."""
    h = int(2 * 4 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow Hugging Face LLaMA for weight import."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BLD)) * self.up_proj(x_BLD))
