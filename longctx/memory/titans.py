"""Titans neural long-term memory (Behrouz et al., 2024): the chunk-parallel core and the
multi-head memory module. The mixers built on it (memory, mac, mag, mal) are in titans_mixers.py;
the float64 token loop that specifies it is titans_ref.py.

Memory per head (head dim d; row vectors, x is (1, d)):
  depth 1 (matrix memory):  M(x) = x W,                         W: (d, d)
  depth 2 (MLP, residual):  M(x) = x + silu(x W1) W2,           W1: (d, h), W2: (h, d), h = expansion * d
Associative loss ℓ(M; k, v) = ‖M(k) − v‖² (squared L2, no 1/2: the gradient carries the factor 2).

The exact definition this module computes (the paper's mini-batch gradient descent with momentum
and weight decay, §3.2). Tokens are split into chunks of b consecutive tokens (aligned to the
start of the stream: a chunk starts at every multiple of b). For token t in the chunk that starts
at t0, with M_{t0−1} the weights after the previous chunk:
  u_t = ∇_M ℓ(M_{t0−1}; k_t, v_t)           gradient at the CHUNK-START weights
  S_t = η_t S_{t−1} − θ_t u_t                 surprise with momentum (per token, per head)
  M_t = (1 − α_t) M_{t−1} + S_t               forgetting (per token, per head)
  y_t = M_t(q_t)                              retrieval reads the weights AFTER token t's own update
                                             (causal: M_t depends on tokens <= t only)
With b = 1 this is the fully sequential rule u_t = ∇ℓ(M_{t−1}; x_t). η_t, α_t ∈ (0, 1) and
θ_t ∈ (0, max_lr) are sigmoids of per-head linear projections of the token.

Closed form inside a chunk (local index i = 1..c, nothing of size c x weights is materialised):
with P_i = Π_{m<=i} η_m and G_i = Π_{m<=i} (1 − α_m),
  S_i = P_i S_0 − Σ_{j<=i} (P_i/P_j) θ_j u_j
  M_i = G_i M_0 + C_i S_0 − Σ_{j<=i} D_ij θ_j u_j,   C_i = Σ_{m<=i} (G_i/G_m) P_m,
                                                       D_ij = Σ_{j<=m<=i} (G_i/G_m)(P_m/P_j)
The (c x c) lower-triangular matrices G_i/G_m and P_m/P_j are built from cumulative sums of
log η and log(1 − α) (entries <= 1, no overflow), and D is their product. Every u_j is an outer
product: depth 1: u_j = 2 k_j^T e_j with e_j = k_j W − v_j; depth 2: ∂W2 = 2 a_j^T e_j,
∂W1 = 2 k_j^T δ_j with z_j = k_j W1, a_j = silu(z_j), e_j = k_j + a_j W2 − v_j,
δ_j = (e_j W2^T) ⊙ silu'(z_j). So applying M_i to a row r_i is the chunk-start term plus
Σ_j D_ij θ_j (r_i · k_j) (·) — batched (c x c) matmuls. Depth 2 applies this twice: first
to q_i through W1_i, then to silu(q_i W1_i) through W2_i. Across chunks the recurrence is a
loop (non-linear for depth 2); it is differentiable by ordinary autograd.

Carried state (`MemoryState`): weights, momentum, and — when a segment ends inside a chunk —
the chunk-start weights and the offset into that chunk, so a run split anywhere continues
exactly (memory_scan(x[:a]) then memory_scan(x[a:], state) == memory_scan(x)). Handing this
state from rank r to r+1 is the sequence-parallel hand-off.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.model.layers import RMSNorm

Tensor = torch.Tensor
Weights = Tuple[Tensor, ...]  # depth 1: (W,); depth 2: (W1, W2); each (B, H, in, out)


class Gates(NamedTuple):
    """Per-token, per-head gates, each (B, H, L): log η, θ, log(1 − α) (logs keep products stable)."""
    log_eta: Tensor
    theta: Tensor
    log_keep: Tensor


class MemoryState(NamedTuple):
    """Carried memory state. weights / momentum: tuples of (B, H, in, out). When a segment ended
    inside a chunk, offset (0 < offset < b) tokens of that chunk are done and grad_weights are
    the chunk-start weights the remaining tokens take their gradients at; else offset 0, None."""
    weights: Weights
    momentum: Weights
    grad_weights: Optional[Weights] = None
    offset: int = 0

    def detach(self) -> "MemoryState":
        d = lambda ws: None if ws is None else tuple(w.detach() for w in ws)  # noqa: E731
        return MemoryState(d(self.weights), d(self.momentum), d(self.grad_weights), self.offset)


class MemoryDiverged(RuntimeError):
    """The inner (test-time) update produced non-finite or too large memory weights."""


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_apply(weights: Weights, x: Tensor) -> Tensor:
    """M(x) for rows x (B, H, L, d) with fixed weights (retrieval without update)."""
    if len(weights) == 1:
        return x @ weights[0]
    w1, w2 = weights
    return x + F.silu(x @ w1) @ w2


# ---------------------------------------------------------------------------------------------
# Chunk coefficients: everything that depends on the gates only, for all chunks at once.

class _Coefs(NamedTuple):
    G: Tensor       # (B, H, n, c)      G_i: forgetting product up to i
    C: Tensor       # (B, H, n, c)      C_i: weight of the carried momentum S_0 in M_i
    coef: Tensor    # (B, H, n, c, c)   D_ij θ_j (lower triangular): weight of u_j in M_i
    G_end: Tensor   # (B, H, n)         the same four at the chunk's last real token
    C_end: Tensor
    P_end: Tensor
    wW: Tensor      # (B, H, n, c)      D_last,j θ_j
    wS: Tensor      # (B, H, n, c)      (P_last/P_j) θ_j: weight of u_j in the end momentum


def _decay_matrix(logcum: Tensor) -> Tensor:
    """(…, c) cumulative logs -> (…, c, c) with [i, m] = exp(l_i − l_m) for m <= i, else 0."""
    c = logcum.shape[-1]
    lower = torch.ones(c, c, dtype=torch.bool, device=logcum.device).tril()
    diff = logcum[..., :, None] - logcum[..., None, :]
    return diff.masked_fill(~lower, float("-inf")).exp()


def _chunk_coefs(g: Gates, last: Tensor) -> _Coefs:
    """Gates (B, H, n, c) -> coefficients; last: (n,) index of each chunk's last real token."""
    lp, lg = g.log_eta.cumsum(-1), g.log_keep.cumsum(-1)
    Gd, Pd = _decay_matrix(lg), _decay_matrix(lp)
    P = lp.exp()
    G = lg.exp()
    C = (Gd @ P[..., None]).squeeze(-1)
    coef = (Gd @ Pd) * g.theta[..., None, :]
    n = last.shape[0]
    ar = torch.arange(n, device=last.device)
    end = lambda t: t[:, :, ar, last]  # noqa: E731  row `last` of every chunk
    return _Coefs(G, C, coef, end(G), end(C), end(P), end(coef), end(Pd) * g.theta)


# ---------------------------------------------------------------------------------------------
# One chunk: outputs and end state, closed form.

def _chunk_depth1(q, k, v, cf, weights, momentum, gw):
    """q, k, v: (B, H, c, d) of one chunk; cf: that chunk's coefficients (the chunk axis taken
    out); weights/momentum/gw: (W,). Returns y, new W, new S."""
    (W,), (S,), (Wg,) = weights, momentum, gw
    e = k @ Wg - v                                                     # (B, H, c, d) errors at chunk start
    G, C = cf.G[..., None], cf.C[..., None]
    qk = (q @ k.transpose(-1, -2)) * cf.coef                           # (B, H, c, c)
    y = G * (q @ W) + C * (q @ S) - 2 * (qk @ e)
    kT = k.transpose(-1, -2)
    S_new = _add_matmul(cf.P_end[..., None, None] * S, kT, cf.wS[..., None] * e)
    W_new = _add_matmul(torch.addcmul(cf.G_end[..., None, None] * W, cf.C_end[..., None, None], S),
                        kT, cf.wW[..., None] * e)
    return y, (W_new,), (S_new,)


def _chunk_depth2(q, k, v, cf, weights, momentum, gw):
    """Depth-2 chunk: M(x) = x + silu(x W1) W2. Gradients at the chunk-start weights gw."""
    (W1, W2), (S1, S2), (W1g, W2g) = weights, momentum, gw
    zk = k @ W1g                                                       # (B, H, c, h)
    ak = F.silu(zk)
    e = k + ak @ W2g - v                                               # (B, H, c, d)
    delta = (e @ W2g.transpose(-1, -2)) * silu_grad(zk)                # (B, H, c, h): ∂ℓ/∂z / 2
    G, C = cf.G[..., None], cf.C[..., None]
    coef = cf.coef
    zq = G * (q @ W1) + C * (q @ S1) - 2 * (((q @ k.transpose(-1, -2)) * coef) @ delta)  # q_i W1_i
    aq = F.silu(zq)
    y = q + G * (aq @ W2) + C * (aq @ S2) - 2 * (((aq @ ak.transpose(-1, -2)) * coef) @ e)
    kT, aT = k.transpose(-1, -2), ak.transpose(-1, -2)
    wS, wW = cf.wS[..., None], cf.wW[..., None]
    P, Ge, Ce = (t[..., None, None] for t in (cf.P_end, cf.G_end, cf.C_end))
    S1n = _add_matmul(P * S1, kT, wS * delta)
    S2n = _add_matmul(P * S2, aT, wS * e)
    W1n = _add_matmul(torch.addcmul(Ge * W1, Ce, S1), kT, wW * delta)
    W2n = _add_matmul(torch.addcmul(Ge * W2, Ce, S2), aT, wW * e)
    return y, (W1n, W2n), (S1n, S2n)


def _add_matmul(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """base − 2 a @ b as one fused baddbmm: base (B, H, m, p), a (B, H, m, c), b (B, H, c, p).
    The state updates are weight-sized; written as `base - 2 * a @ b` they cost three passes over
    the weights forward and more backward, which on the CPU took about a third of the scan."""
    B, H, m, p = base.shape
    out = torch.baddbmm(base.reshape(B * H, m, p), a.reshape(B * H, m, -1), b.reshape(B * H, -1, p), alpha=-2.0)
    return out.view(B, H, m, p)


def _max_norm(ws: Weights) -> Tensor:
    """Largest Frobenius norm over batch, heads and tensors (detached, a 0-d tensor)."""
    return torch.stack([w.detach().flatten(2).norm(dim=-1).amax() for w in ws]).amax()


# ---------------------------------------------------------------------------------------------
# The scan.

def _scan_group(q, k, v, g: Gates, c: int, weights, momentum, first_gw, norms: List[Tensor]):
    """Tokens (B, H, T, d) in consecutive chunks of c (the last may be shorter), starting at a
    chunk boundary, except that the first chunk takes its gradients at first_gw when given.
    Returns y (B, H, T, d), end weights, end momentum, and the last chunk's start weights."""
    B, H, T, d = q.shape
    n = -(-T // c)
    pad = n * c - T
    if pad:  # padded tokens sit after every real one, so they never reach a real output;
        # zeros (θ = 0, gates 1) keep them finite, and the end state is read at the last real row.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = Gates(*(F.pad(t, (0, pad)) for t in g))
    split = lambda t: t.reshape(B, H, n, c, *t.shape[3:])  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    last = torch.full((n,), c - 1, dtype=torch.long, device=q.device)
    last[-1] = c - 1 - pad
    cf = _chunk_coefs(Gates(*(split(t) for t in g)), last)
    step = _chunk_depth1 if len(weights) == 1 else _chunk_depth2
    # One unbind per tensor, not an index per chunk: the backward of x[:, :, i] is a zero tensor of
    # x's full size, so indexing chunk by chunk costs O(n) per chunk, O(n^2) per scan (the
    # backward of a 16K-token scan took 3x its 8K one); unbind's backward stacks, O(n) in all.
    qs, ks, vs = q.unbind(2), k.unbind(2), v.unbind(2)
    cfs = [_Coefs(*t) for t in zip(*(f.unbind(2) for f in cf))]
    ys = []
    gw = weights
    for i in range(n):
        gw = first_gw if (i == 0 and first_gw is not None) else weights
        y, weights, momentum = step(qs[i], ks[i], vs[i], cfs[i], weights, momentum, gw)
        ys.append(y)
        norms.append(torch.maximum(_max_norm(weights), _max_norm(momentum)))
    y = torch.cat(ys, 2)[:, :, :T]
    return y, weights, momentum, gw


def memory_scan(q: Tensor, k: Tensor, v: Tensor, gates: Gates, state: MemoryState, chunk: int,
                max_norm: float = 1e4, where: str = "titans memory", max_lr=None) -> Tuple[Tensor, MemoryState]:
    """The neural memory over a segment: (outputs y (B, H, L, d), state after the segment).

    q, k, v: (B, H, L, d); gates: each (B, H, L); state: the state before the segment (see
    `init_state`). Running a sequence in pieces with the state handed on equals one run.
    Raises MemoryDiverged (naming `where`, the chunk and max_lr) when a chunk's weights or
    momentum become non-finite or exceed `max_norm` in Frobenius norm."""
    L = q.shape[2]
    off = state.offset
    weights, momentum = state.weights, state.momentum
    norms: List[Tensor] = []
    ys = []
    pos = 0
    if off:  # finish the chunk the previous segment ended in
        head = min(L, chunk - off)
        sl = lambda t: t[:, :, :head]  # noqa: E731
        y, weights, momentum, gw = _scan_group(sl(q), sl(k), sl(v), Gates(*(sl(t) for t in gates)), head,
                                               weights, momentum, state.grad_weights, norms)
        ys.append(y)
        pos = head
    out_gw, out_off = None, 0
    if off and off + pos < chunk:  # still inside the same chunk
        out_gw, out_off = state.grad_weights, off + pos
    if pos < L:
        sl = lambda t: t[:, :, pos:]  # noqa: E731
        y, weights, momentum, gw = _scan_group(sl(q), sl(k), sl(v), Gates(*(sl(t) for t in gates)), chunk,
                                               weights, momentum, None, norms)
        ys.append(y)
        r = (L - pos) % chunk
        out_gw, out_off = (gw, r) if r else (None, 0)
    _check(norms, max_norm, where, chunk, off, max_lr)
    return torch.cat(ys, 2), MemoryState(weights, momentum, out_gw, out_off)


def _check(norms: List[Tensor], bound: float, where: str, chunk: int, off: int, max_lr) -> None:
    if not norms:
        return
    nv = torch.stack(norms)
    bad = ~torch.isfinite(nv) | (nv > bound)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        # chunk numbering within this segment; the first is partial when the segment began mid-chunk
        first_tok = 0 if i == 0 else (i - (1 if off else 0)) * chunk + ((chunk - off) if off else 0)
        lr = f"model.memory.max_lr={max_lr}" if max_lr is not None else "the inner learning rate θ"
        raise MemoryDiverged(
            f"{where}: inner memory update diverged in chunk {i} of the segment (from token {first_tok}): "
            f"weight/momentum norm {float(nv[i]):.3g} is {'non-finite' if not math.isfinite(float(nv[i])) else 'above'} "
            f"the bound model.memory.max_state_norm={bound:g}; lower {lr} (keep it below 1 with "
            f"l2-normalised keys) or the momentum, or raise the bound")


def causal_conv(ext: Tensor, w: Tensor, L: int) -> Tensor:
    """Depthwise causal conv along dim -2: ext (..., K−1+L, C) = the K−1 rows before the L
    outputs' rows, then those rows; w (..., C, K) broadcastable. Returns (..., L, C):
    out[t] = Σ_j ext[t + j] ⊙ w[..., j] (the same sum as F.conv1d with groups=C)."""
    return _CausalConv.apply(ext, w, L)


class _CausalConv(torch.autograd.Function):
    """K shifted multiply-adds into one buffer, forward and backward. On the CPU several times
    faster than F.conv1d's depthwise kernel, and than the same sum left to autograd: there each
    tap's slice ext[j:j+L] has a backward that fills a zero tensor of ext's size, and each
    product and partial sum is a fresh tensor; here the taps are contiguous rows (w moved to
    (K, ..., C)) accumulated in place, and the backward writes one gradient buffer.
    Backward: d_ext[t + j] += g[t] ⊙ w_j;  dw_j = Σ_t ext[t + j] ⊙ g[t] (summed to w_j's shape)."""

    @staticmethod
    def forward(ctx, ext, w, L: int):
        wt = w.movedim(-1, 0).contiguous()                                  # (K, ..., C)
        out = ext[..., 0:L, :] * wt[0]
        for j in range(1, wt.shape[0]):
            out.addcmul_(ext[..., j:j + L, :], wt[j])
        ctx.save_for_backward(ext, w)
        ctx.L = L
        return out

    @staticmethod
    def backward(ctx, g):
        ext, w = ctx.saved_tensors
        L, K = ctx.L, w.shape[-1]
        wt = w.movedim(-1, 0).contiguous()
        d_ext = dw = None
        if ctx.needs_input_grad[0]:
            d_ext = torch.zeros_like(ext)
            for j in range(K):
                d_ext[..., j:j + L, :].addcmul_(g, wt[j])
        if ctx.needs_input_grad[1]:
            shape = w.shape[:-1]
            dw = torch.stack([(ext[..., j:j + L, :] * g).sum_to_size(shape) for j in range(K)], -1)
        return d_ext, dw, None


def init_state(weights: Weights, batch: int) -> MemoryState:
    """Start state: the (learned) initial weights (H, in, out) expanded over the batch; zero momentum."""
    ws = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in weights)
    return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws))


# ---------------------------------------------------------------------------------------------
# The multi-head memory module.

class NeuralMemory(nn.Module):
    """Projections -> depthwise causal conv -> SiLU (q, k, v) -> ℓ2-normalised q, k -> the memory
    scan -> RMSNorm -> output gate sigmoid(W_g x) -> W_o.

    The conv is residual (x + conv(x)) so it starts near identity whatever the model's init does
    to its weights. Initial memory weights are learned (the outer loop learns where the inner
    loop starts); momentum starts at zero. Gate biases are 1-D parameters (the model's init
    leaves them alone): η ≈ sigmoid(2) = 0.88, α ≈ sigmoid(−4) = 0.018, θ ≈ max_lr / 2.
    """

    def __init__(self, d_model: int, heads: int, depth: int, chunk: int, max_lr: float, expansion: int = 2,
                 conv: int = 4, max_state_norm: float = 1e4, norm_eps: float = 1e-5, name: str = "titans memory",
                 recompute: int = 0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"{name}: d_model={d_model} is not divisible by heads={heads}")
        self.name, self.heads, self.depth, self.chunk = name, heads, depth, chunk
        # recompute > 0: in training, the module runs `recompute` tokens at a time, each piece
        # checkpointed with the state entering it (see forward)
        self.recompute = int(recompute)
        self.max_lr, self.max_state_norm, self.kernel = max_lr, max_state_norm, conv
        self.head_dim = hd = d_model // heads
        inner = heads * hd
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.zeros(3 * inner, conv))  # (channels, kernel), residual
        self.gate_proj = nn.Linear(d_model, 3 * heads, bias=False)       # η, θ, α logits per head
        self.gate_bias = nn.Parameter(torch.tensor([2.0, 0.0, -4.0]).repeat_interleave(heads))
        if depth == 1:
            self.init_w = nn.ParameterList([nn.Parameter(torch.zeros(heads, hd, hd))])
        elif depth == 2:
            h = expansion * hd
            self.init_w = nn.ParameterList([nn.Parameter(torch.randn(heads, hd, h) / math.sqrt(hd)),
                                            nn.Parameter(torch.zeros(heads, h, hd))])
        else:
            raise ValueError(f"{name}: depth={depth} is not supported; use 1 (matrix) or 2 (MLP)")
        self.norm = RMSNorm(inner, norm_eps)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    # -- pieces -------------------------------------------------------------------------------
    def project(self, x_BLD: Tensor, tail: Optional[Tensor]):
        """q, k, v (B, H, L, d) and the conv tail (B, kernel−1, 3·inner) to carry on."""
        B, L, _ = x_BLD.shape
        p = self.qkv_proj(x_BLD)                                           # (B, L, 3·inner)
        K = self.kernel
        if tail is None:
            tail = p.new_zeros(B, K - 1, p.shape[-1])
        ext = torch.cat([tail.to(p.dtype), p], 1)                           # (B, K−1+L, C)
        h = F.silu(p + causal_conv(ext, self.conv_weight.to(p.dtype), L))
        new_tail = ext[:, ext.shape[1] - (K - 1):]
        q, k, v = h.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, new_tail

    def gates(self, x_BLD: Tensor) -> Gates:
        z = (self.gate_proj(x_BLD) + self.gate_bias).transpose(1, 2)        # (B, 3H, L)
        ze, zt, za = z.split(self.heads, 1)
        return Gates(F.logsigmoid(ze), self.max_lr * torch.sigmoid(zt), F.logsigmoid(-za))

    def output(self, y_BHLd: Tensor, x_BLD: Tensor) -> Tensor:
        B, H, L, d = y_BHLd.shape
        o = self.norm(y_BHLd.transpose(1, 2).reshape(B, L, H * d))
        return self.o_proj(o * torch.sigmoid(self.g_proj(x_BLD)))

    def initial_state(self, batch: int, dtype=None) -> dict:
        ws = tuple(w if dtype is None else w.to(dtype) for w in self.init_w)
        return {"mem": init_state(ws, batch), "conv": None}

    def scan(self, q, k, v, g, mem: MemoryState):
        return memory_scan(q, k, v, g, mem, self.chunk, self.max_state_norm, self.name, self.max_lr)

    def read(self, x_BLD: Tensor, state: dict) -> Tuple[Tensor, Optional[Tensor]]:
        """Retrieval M*(q) with the state's current weights, no update: (y_BLD, conv tail)."""
        q, _, _, tail = self.project(x_BLD, state["conv"])
        return self.output(memory_apply(state["mem"].weights, q), x_BLD), tail

    def forward(self, x_BLD: Tensor, state: Optional[dict] = None) -> Tuple[Tensor, dict]:
        """(y_BLD, state after the segment); state: {"mem": MemoryState, "conv": tail or None}.

        With `recompute` > 0, in training (gradients on) and on sequences longer than that, the
        sequence runs in pieces of `recompute` tokens, the state handed from piece to piece (exact:
        the carried state continues a run at any split), each piece under a non-reentrant
        checkpoint: what stays between forward and backward is the piece inputs (views of x) and
        the state entering each piece; a piece's projections, chunk coefficients and per-chunk
        weights exist only while it is (re)computed. Costs one more forward of the module."""
        if state is None:
            state = self.initial_state(x_BLD.shape[0], x_BLD.dtype)
        if self.recompute and torch.is_grad_enabled() and x_BLD.shape[1] > self.recompute:
            return self._forward_pieces(x_BLD, state)
        return self._forward_one(x_BLD, state)

    def _forward_one(self, x_BLD: Tensor, state: dict) -> Tuple[Tensor, dict]:
        q, k, v, tail = self.project(x_BLD, state["conv"])
        y, mem = self.scan(q, k, v, self.gates(x_BLD), state["mem"])
        return self.output(y, x_BLD), {"mem": mem, "conv": tail}

    def _forward_pieces(self, x_BLD: Tensor, state: dict) -> Tuple[Tensor, dict]:
        from torch.utils.checkpoint import checkpoint
        B, L, _ = x_BLD.shape
        mem, tail = state["mem"], state["conv"]
        if tail is None:
            tail = x_BLD.new_zeros(B, self.kernel - 1, self.qkv_proj.out_features)
        ys = []
        # split, not x[:, a:a+R] per piece: a slice's backward is a zero tensor of x's full size,
        # O(pieces) full-size fills and adds in all; split's backward concatenates once
        for a, x_piece in zip(range(0, L, self.recompute), x_BLD.split(self.recompute, 1)):
            n = len(mem.weights)
            has_gw = mem.grad_weights is not None
            flat = [*mem.weights, *mem.momentum, *(mem.grad_weights if has_gw else ()), tail]

            def piece(x, *fl, n=n, has_gw=has_gw, off=mem.offset):
                gw = tuple(fl[2 * n:3 * n]) if has_gw else None
                st = {"mem": MemoryState(tuple(fl[:n]), tuple(fl[n:2 * n]), gw, off), "conv": fl[-1]}
                y, out = self._forward_one(x, st)
                m = out["mem"]
                # the offset is a plain int, known before the piece runs: (a + piece length) mod chunk
                return (y, *m.weights, *m.momentum, *(m.grad_weights or ()), out["conv"])

            nxt_off = (mem.offset + min(self.recompute, L - a)) % self.chunk
            res = checkpoint(piece, x_piece, *flat, use_reentrant=False)
            ys.append(res[0])
            w, mo = tuple(res[1:1 + n]), tuple(res[1 + n:1 + 2 * n])
            gw = tuple(res[1 + 2 * n:1 + 3 * n]) if nxt_off else None
            mem, tail = MemoryState(w, mo, gw, nxt_off), res[-1]
        return torch.cat(ys, 1), {"mem": mem, "conv": tail}


def detach_state(state: dict) -> dict:
    return {"mem": state["mem"].detach(), "conv": None if state["conv"] is None else state["conv"].detach()}
