"""Building blocks shared by every model: RMSNorm and the SwiGLU MLP (optionally tiled over the
sequence, see `TiledSwiGLU`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in at least fp32 for stability (as LLaMA does).

    With gradients on, `_RMSNormFn` keeps only x and the per-token 1/rms for backward (autograd
    would keep an fp32 copy of x and the normalised x besides: 6 extra bytes per element in
    bf16, 4 in fp32, per norm; three norms per lightning block). Same forward arithmetic."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x_BLD.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x_BLD, self.weight, self.eps)
        x = x_BLD.to(torch.promote_types(x_BLD.dtype, torch.float32))  # fp32 at least, fp64 kept
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(x_BLD.dtype)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm saving x and r = 1/rms(x) only. With xf = x in (at least) fp32, x̂ = xf·r,
    g = dy·w: dx = r (g − x̂ mean(g x̂)), dw = Σ dy · x̂ (x̂ rounded to x's dtype, as in forward)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        cdt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(cdt)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, r = ctx.saved_tensors
        cdt = r.dtype
        xhat = x.to(cdt) * r
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.to(cdt) * xhat.to(x.dtype).to(cdt)).reshape(-1, x.shape[-1]).sum(0).to(w.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * w).to(cdt)
            dx = (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def llama_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's rule: 2/3 of 4*d, rounded up to a multiple (keeps matmuls aligned)."""
    h = int(2 * 4 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow Hugging Face LLaMA for weight import.

    tile: 0 runs the plain MLP (autograd keeps x and four (N, hidden) intermediates for
    backward). tile > 0 runs it `tile` tokens at a time (`TiledSwiGLU`): the (N, hidden)
    intermediates exist for one tile at a time, forward and backward, and only x (N, D) is kept
    for backward; the backward recomputes each tile (one more gate/up matmul pair). Exact: the
    same matmuls row by row; weight gradients are summed over tiles in at least fp32."""

    def __init__(self, d_model: int, hidden: int, tile: int = 0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.tile = int(tile)
        if self.tile:
            # ZeRO-3 gathers a module's own parameters before its forward; the tiled path uses
            # the three weights without calling the Linear modules, so gather them with this one.
            self._z3_leaf = True

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        if not self.tile or x_BLD.shape[:-1].numel() <= self.tile:
            return self.down_proj(F.silu(self.gate_proj(x_BLD)) * self.up_proj(x_BLD))
        w = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        x = x_BLD.reshape(-1, x_BLD.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in w)):
            y = TiledSwiGLU.apply(x, *w, self.tile)
        else:
            y = _swiglu_tiles(x, *w, self.tile)
        return y.view(*x_BLD.shape[:-1], y.shape[-1])


def _swiglu_tiles(x_ND, w_gate_FD, w_up_FD, w_down_DF, tile: int) -> torch.Tensor:
    """(N, D) output of the SwiGLU, `tile` rows at a time, without autograd."""
    y = x_ND.new_empty(x_ND.shape[0], w_down_DF.shape[0])
    for a in range(0, x_ND.shape[0], tile):
        x = x_ND[a:a + tile]
        g = F.linear(x, w_gate_FD)
        y[a:a + tile] = F.linear(F.silu(g, inplace=True).mul_(F.linear(x, w_up_FD)), w_down_DF)
    return y


class TiledSwiGLU(torch.autograd.Function):
    """SwiGLU over (N, D) rows, `tile` rows at a time, recomputing each tile in backward.

    Saved for backward: x (N, D) and the weights. Backward per tile, with g = x Wg^T,
    u = x Wu^T, s = sigmoid(g), a = g s, m = a u, y = m Wd^T:
        dm = dy Wd;  dWd += dy^T m;  du = dm a;  dg = dm u s (1 + g (1 - s))
        dx = dg Wg + du Wu;  dWg += dg^T x;  dWu += du^T x
    (silu'(g) = s (1 + g (1 - s)), the formula torch's silu backward uses)."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_FD, w_up_FD, w_down_DF, tile: int):
        ctx.save_for_backward(x_ND, w_gate_FD, w_up_FD, w_down_DF)
        ctx.tile = tile
        return _swiglu_tiles(x_ND, w_gate_FD, w_up_FD, w_down_DF, tile)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, wg, wu, wd = ctx.saved_tensors
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        acc = torch.promote_types(wg.dtype, torch.float32)  # weight gradients summed over tiles
        dx = torch.empty_like(x_ND) if need_x else None
        dwg = torch.zeros(wg.shape, dtype=acc, device=wg.device) if need_g else None
        dwu = torch.zeros(wu.shape, dtype=acc, device=wu.device) if need_u else None
        dwd = torch.zeros(wd.shape, dtype=acc, device=wd.device) if need_d else None
        dy_ND = dy_ND.contiguous()
        for a in range(0, x_ND.shape[0], ctx.tile):
            x, dy = x_ND[a:a + ctx.tile], dy_ND[a:a + ctx.tile]
            g, u = F.linear(x, wg), F.linear(x, wu)           # (t, F)
            s = torch.sigmoid(g)
            act = g * s                                       # silu(g)
            if need_d:
                dwd += (dy.t() @ (act * u)).to(acc)          # (D, F)
            dm = dy @ wd                                      # (t, F)
            du = dm * act
            del act
            dg = dm.mul_(u).mul_(s * (1 + g * (1 - s)))      # dm is not needed past here
            del g, u, s
            if need_x:
                dx[a:a + ctx.tile] = dg @ wg + du @ wu
            if need_g:
                dwg += (dg.t() @ x).to(acc)
            if need_u:
                dwu += (du.t() @ x).to(acc)
        cast = lambda d, w: None if d is None else d.to(w.dtype)  # noqa: E731
        return dx, cast(dwg, wg), cast(dwu, wu), cast(dwd, wd), None
