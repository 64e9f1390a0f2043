"""The specification of the Titans memory scan: a token-by-token float64 loop written straight
from the equations, gradients by torch.autograd.grad (not the closed forms titans.py uses).

For token t in the chunk of b tokens that starts at t0 (chunks aligned to the stream start):
  u_t = ∇_M ‖M_{t0−1}(k_t) − v_t‖²;  S_t = η_t S_{t−1} − θ_t u_t;  M_t = (1 − α_t) M_{t−1} + S_t;
  y_t = M_t(q_t).
b = 1 is the sequential rule (gradient at M_{t−1}); b > 1 is the paper's mini-batch variant.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def ref_apply(weights, x: Tensor) -> Tensor:
    """M(x) for one row x (d,): depth 1 x W; depth 2 x + silu(x W1) W2."""
    if len(weights) == 1:
        return x @ weights[0]
    return x + F.silu(x @ weights[0]) @ weights[1]


def ref_grad(weights, k: Tensor, v: Tensor):
    """∇ of ‖M(k) − v‖² w.r.t. every weight tensor, by autograd."""
    ws = [w.detach().requires_grad_(True) for w in weights]
    loss = (ref_apply(ws, k) - v).pow(2).sum()
    return torch.autograd.grad(loss, ws)


def memory_scan_ref(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
                    weights, momentum, chunk: int = 1) -> Tuple[Tensor, tuple, tuple]:
    """q, k, v: (B, H, L, d); eta, theta, alpha: (B, H, L); weights / momentum: tuples of
    (B, H, in, out) at a chunk boundary. Returns y (B, H, L, d), final weights, final momentum
    (all float64)."""
    B, H, L, d = q.shape
    y = torch.zeros(B, H, L, d, dtype=torch.float64)
    W_out = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    S_out = [torch.zeros_like(w, dtype=torch.float64) for w in momentum]
    for b in range(B):
        for h in range(H):
            M = [w[b, h].double() for w in weights]
            S = [s[b, h].double() for s in momentum]
            start = M
            for t in range(L):
                if t % chunk == 0:
                    start = [m.clone() for m in M]
                u = ref_grad(start, k[b, h, t].double(), v[b, h, t].double())
                e, th, a = float(eta[b, h, t]), float(theta[b, h, t]), float(alpha[b, h, t])
                S = [e * s - th * g for s, g in zip(S, u)]
                M = [(1 - a) * m + s for m, s in zip(M, S)]
                y[b, h, t] = ref_apply(M, q[b, h, t].double())
            for i, m in enumerate(M):
                W_out[i][b, h] = m
            for i, s in enumerate(S):
                S_out[i][b, h] = s
    return y, tuple(W_out), tuple(S_out)
