"""`linear_cross_entropy`: the LM head and its cross-entropy fused over chunks of tokens, so
that the (N, V) logits never exist at once (forward or backward).

Reference (the specification):

    logits = (h_ND @ weight_VD.T).to(promote(dtype, fp32))     # bf16 matmul, fp32 loss
    loss_sum = F.cross_entropy(logits, labels_N, ignore_index=-100, reduction="sum")

How: the forward walks the target tokens `chunk` at a time. For each chunk it forms the (c, V)
logits, their log-sum-exp and the loss, and, when a gradient is needed, turns the logits into
softmax - onehot in place and takes the two gradient matmuls right there:

    dh_c = (p - y) @ weight          (c, D), written into the (N, D) buffer dh
    dW  += (p - y).T @ h_c           (V, D), accumulated in at least fp32

The backward only scales the saved dh and dW by the incoming scalar gradient. Extra memory is
O(chunk * V) for the chunk's logits plus the (N, D) and (V, D) gradient buffers that a plain
backward would produce anyway; the saved state replaces the (N, D) input a plain F.linear
would save, so bytes kept for backward per token are D * itemsize (4 for fp16: its gradient is
kept in fp32, where loss scaling cannot underflow it). Rows whose label is `ignore_index` are
skipped entirely (no matmul; their dh rows are 0): a loss over a few answer tokens (passkey)
costs those tokens only. Same matmul count as the plain path (1 forward + 2 backward).

The torch path is the only backend: every chunk is three large matmuls, which the BLAS / cuBLAS
library already runs at full rate; a Triton kernel would only save the (c, V) logits traffic.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the saved dh: the input's, but fp32 for fp16 (its range is too small for
    unscaled gradients)."""
    return torch.float32 if dtype == torch.float16 else dtype


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, chunk: int, ignore_index: int,
                grad_enabled: bool = True):
        N, D = h_ND.shape
        V = weight_VD.shape[0]
        acc = torch.promote_types(h_ND.dtype, torch.float32)  # logits, log-sum-exp and loss
        # needs_input_grad ignores no_grad / inference_mode: without grad mode, no dh / dW work
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[0]), (grad_enabled and ctx.needs_input_grad[1])
        valid = labels_N != ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # (n,) target rows
        n = N if rows is None else rows.numel()
        loss = torch.zeros((), dtype=acc, device=h_ND.device)
        dh = torch.zeros(N, D, dtype=_grad_dtype(h_ND.dtype), device=h_ND.device) if need_h else None
        dw = torch.zeros(V, D, dtype=torch.promote_types(weight_VD.dtype, torch.float32),
                         device=h_ND.device) if need_w else None
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            if rows is None:
                h_c, y_c = h_ND[a:b], labels_N[a:b]
            else:
                idx = rows[a:b]
                h_c, y_c = h_ND.index_select(0, idx), labels_N.index_select(0, idx)
            logits = (h_c @ weight_VD.t()).to(acc)               # (c, V)
            lse = torch.logsumexp(logits, 1)                     # (c,)
            loss += (lse - logits.gather(1, y_c[:, None]).squeeze(1)).sum()
            if not (need_h or need_w):
                continue
            p = logits.sub_(lse[:, None]).exp_()                 # softmax, in place
            p.scatter_add_(1, y_c[:, None], torch.full((b - a, 1), -1.0, dtype=acc, device=p.device))
            g = p.to(h_ND.dtype)                                 # dlogits as the plain path's matmuls see it
            del logits, p
            if need_h:
                dh_c = g @ weight_VD                             # (c, D)
                if rows is None:
                    dh[a:b] = dh_c
                else:
                    dh.index_copy_(0, idx, dh_c.to(dh.dtype))
            if need_w:
                if g.dtype == dw.dtype:
                    dw.addmm_(g.t(), h_c)
                else:
                    dw += g.t() @ h_c                            # (V, D) in the input dtype, summed in fp32
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if dh is None else (dh * grad_loss.to(dh.dtype)).to(h_dtype)
        gw = None if dw is None else (dw * grad_loss.to(dw.dtype)).to(w_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(h_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, chunk: int = 4096,
                         ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """(sum of token cross-entropies of `h_ND @ weight_VD.T` against `labels_N`, number of target
    tokens), labels equal to `ignore_index` left out; exact against the plain formula (see the
    module docstring) in value and in the gradients w.r.t. h and weight.

    h_ND: (N, D) or (B, L, D) hidden states; weight_VD: (V, D) head (or tied embedding) weight;
    labels_N: (N,) or (B, L) int64 targets in [0, V) or ignore_index; chunk: target tokens per
    chunk (peak extra memory ~ chunk * V * (itemsize + 4) bytes). The loss is in
    promote(dtype, fp32); the count is an int64 scalar tensor.
    """
    if int(chunk) < 1:
        raise ValueError(f"linear_cross_entropy: chunk={chunk} must be >= 1 (tokens per chunk)")
    D = h_ND.shape[-1]
    if weight_VD.dim() != 2 or weight_VD.shape[1] != D:
        raise ValueError(f"linear_cross_entropy: weight has shape {tuple(weight_VD.shape)}, need (V, {D}) "
                         f"for hidden states of width {D}")
    h = h_ND.reshape(-1, D)
    y = labels_N.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"linear_cross_entropy: {y.numel()} labels for {h.shape[0]} hidden rows "
                         f"(shapes {tuple(labels_N.shape)} and {tuple(h_ND.shape)})")
    valid = y != ignore_index
    n_tokens = valid.sum()
    if n_tokens.item() and (y[valid].min() < 0 or y[valid].max() >= weight_VD.shape[0]):
        bad = y[valid & ((y < 0) | (y >= weight_VD.shape[0]))][0].item()
        raise ValueError(f"linear_cross_entropy: label {bad} is outside the vocabulary [0, {weight_VD.shape[0]}) "
                         f"(and is not ignore_index={ignore_index})")
    loss = _LinearCE.apply(h, weight_VD, y, int(chunk), int(ignore_index), torch.is_grad_enabled())
    return loss, n_tokens
