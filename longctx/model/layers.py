"""Building blocks shared by every model: RMSNorm and the SwiGLU MLP (optionally tiled over the
sequence, see `TiledSwiGLU`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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
    g = dy·w: dx = r (g − x̂ mean(g x̂)), dw = Σ dy · x̂ (x̂ rounded to x's dtype, as in forward).

    Both passes run over the rows (tokens) a chunk at a time (`_RMSNORM_CHUNK` elements), so
    the temporaries of a chunk stay in cache and each full-size tensor is read or written once
    (a pass over the whole tensor per elementwise op was memory-bound); the ops inside a chunk
    take operands of one dtype (mixed-dtype ops are several times slower on CPU), converting
    with copies. Per row the arithmetic and its roundings are those of the formulas above (y and
    dx are bitwise the unchunked ones); dw is summed per chunk, then over chunks, in the compute
    dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        cdt = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, fp64 kept
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        N, C, dev = x2.shape[0], max(1, _RMSNORM_CHUNK // D), x.device
        y2 = torch.empty((N, D), dtype=torch.promote_types(weight.dtype, x.dtype), device=dev)
        r2 = torch.empty((N, 1), dtype=cdt, device=dev)
        wy = weight.to(y2.dtype)  # exact; ops on mixed dtypes are several times slower on CPU
        low, same = x.dtype != cdt, y2.dtype == x.dtype
        n0 = min(C, N)
        # scratch for xf² (then x̂ where x is fp32 and y is not): y's chunk where it is in cdt
        sq_b = torch.empty((n0, D), dtype=cdt, device=dev) if y2.dtype != cdt else None
        xf_b = torch.empty((n0, D), dtype=cdt, device=dev) if low else None
        lo_b = torch.empty((n0, D), dtype=x.dtype, device=dev) if low and not same else None
        for a in range(0, N, C):
            xc, rc, yc = x2[a:a + C], r2[a:a + C], y2[a:a + C]
            n = xc.shape[0]
            xf = xf_b[:n].copy_(xc) if low else xc
            torch.mean(torch.mul(xf, xf, out=yc if sq_b is None else sq_b[:n]), -1, keepdim=True, out=rc)
            rc.add_(eps).rsqrt_()
            # y = w · (xf·r).to(x.dtype), the product in y's dtype
            if low:
                xh = xf.mul_(rc)
                yc.copy_(xh if same else lo_b[:n].copy_(xh)).mul_(wy)
            elif same:
                torch.mul(xc, rc, out=yc).mul_(wy)
            else:
                yc.copy_(torch.mul(xc, rc, out=sq_b[:n])).mul_(wy)
        ctx.save_for_backward(x, weight, r2.view(*x.shape[:-1], 1))
        return y2.view(*x.shape[:-1], D)

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: say so instead of a wrong answer
    def backward(ctx, dy):
        x, w, r = ctx.saved_tensors
        cdt = r.dtype
        D = x.shape[-1]
        x2, r2, dy2 = x.reshape(-1, D), r.reshape(-1, 1), dy.reshape(-1, D)
        N, C, dev = x2.shape[0], max(1, _RMSNORM_CHUNK // D), x.device
        need_x, need_w = ctx.needs_input_grad[:2]
        low = x.dtype != cdt
        # g = (dy·w).to(cdt), the product computed in gdt. With gdt no wider than cdt it runs in
        # cdt (w upcast exactly) and, where gdt is narrower (16-bit x and w), is rounded to gdt
        # and back: the product of two gdt numbers is exact in cdt, so this is gdt's product.
        gdt = torch.promote_types(dy.dtype, w.dtype)
        wide = torch.promote_types(gdt, cdt) != cdt                       # fp64 w, fp32 x: as is
        wc = w if wide else w.to(cdt)
        dx2 = torch.empty((N, D), dtype=x.dtype, device=dev) if need_x else None
        n0 = min(C, N)
        buf = lambda dt=cdt: torch.empty((n0, D), dtype=dt, device=dev)  # noqa: E731
        # Per-chunk scratch; dx's chunk, written last, serves as one where the dtype allows
        # (a single chunk then needs no more memory than before chunking).
        xh_b = buf()                                                      # x̂
        t_b = None if need_x and x.dtype == cdt else buf()                # dy·x̂, g·x̂
        dyf_b = buf() if dy.dtype != cdt else None                        # dy.to(cdt), then g
        g_b = buf() if need_x and dyf_b is None else None
        lo_b = buf(x.dtype) if need_w and low and not need_x else None    # x̂.to(x.dtype)
        rnd = need_x and not wide and gdt != cdt                          # g rounded to gdt
        glo_b = buf(gdt) if rnd and gdt != x.dtype else None
        dw = torch.zeros(D, dtype=cdt, device=dev) if need_w else None   # Σ over chunks
        dw_c = torch.empty(D, dtype=cdt, device=dev) if need_w else None
        m_b = torch.empty((n0, 1), dtype=cdt, device=dev)
        for a in range(0, N, C):
            xc, rc, dyc = x2[a:a + C], r2[a:a + C], dy2[a:a + C]
            n = xc.shape[0]
            dxc = dx2[a:a + C] if need_x else None
            t = dxc if t_b is None else t_b[:n]
            xh = xh_b[:n].copy_(xc).mul_(rc) if low else torch.mul(xc, rc, out=xh_b[:n])
            dyf = dyf_b[:n].copy_(dyc) if dyf_b is not None else dyc
            if need_w:  # dw += Σ_rows dy.to(cdt) · x̂.to(x.dtype).to(cdt)
                if low:
                    t.copy_((dxc if lo_b is None else lo_b[:n]).copy_(xh)).mul_(dyf)
                else:
                    torch.mul(xh, dyf, out=t)
                dw.add_(torch.sum(t, 0, out=dw_c))
            if need_x:
                g = torch.mul(dyc if wide else dyf, wc, out=(dyf_b if g_b is None else g_b)[:n])
                if rnd:
                    g.copy_((dxc if glo_b is None else glo_b[:n]).copy_(g))
                m = torch.mean(torch.mul(g, xh, out=t), -1, keepdim=True, out=m_b[:n])
                g.sub_(xh.mul_(m))
                if low:
                    dxc.copy_(g.mul_(rc))                                 # (r·(g − x̂ m)).to(x.dtype)
                else:
                    torch.mul(rc, g, out=dxc)
        dx = dx2.view(x.shape) if need_x else None
        return dx, (dw.to(w.dtype) if need_w else None), None


# Elements per chunk of `_RMSNormFn` (rows = this // D): 1024 rows at D = 256, each fp32 temporary
# 1 MiB (backward uses up to three besides dx's chunk). Forward + backward at (1, 131072, 256) bf16,
# 1 thread: 512 / 1024 / 2048 rows 106 / 91 / 85 ms (smaller chunks lose to per-op overhead); 2048
# is a little faster alone, 1024 leaves more of the shared L3 to the other rank.
_RMSNORM_CHUNK = 1 << 18


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
