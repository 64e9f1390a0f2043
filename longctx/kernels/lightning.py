"""`lightning_attn`: linear attention with per-head decay, forward and backward, one function
over two backends (Triton on CUDA, plain torch elsewhere).

    o_t = scale * sum_{j<=t} lam_h^(t-j) (q_t . k_j) v_j  (+ scale * lam_h^(t+1) q_t @ S0),
    lam_h = exp(-decay_h)

The backward needs no kernel of its own: with F(q, k, v, init, off) the forward primitive of
`lightning_torch.py`, and ' denoting time reversal,

    dq  = scale * F(dO, v, k, init=S0^T, off=1)
    dk' =         F(v', scale dO', q', init=dS_T^T, off=0)
    dv' =         F(k', scale q', dO', init=dS_T, off=0),      dS0 = lam * final of the dv' call

(scaling the key, not the value, leaves the init term alone).

(the dv' call's final state is sum_t lam^t scale q_t^T dO_t + lam^(T-1) dS_T). So the Triton
backend's correctness rests on its forward kernel alone, tested against the torch primitive.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from longctx.kernels.lightning_torch import lightning_fwd_torch

Tensor = torch.Tensor
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _primitive(backend: str):
    if backend == "triton":
        from longctx.kernels.lightning_triton import lightning_fwd_triton
        return lightning_fwd_triton
    return lightning_fwd_torch


def pick_backend(x: Tensor, backend: str) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'torch' or 'triton'")
    if backend == "auto":
        # CPU tensors take the torch path even under TRITON_INTERPRET (tests ask for triton by name)
        return "triton" if x.is_cuda and x.dtype != torch.float64 and _triton_available() else "torch"
    if backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' but triton is not installed (pip install triton; Linux x86-64)")
    return backend


def _flip_segments(x: Optional[Tensor], cu: Optional[Tensor]) -> Optional[Tensor]:
    """Per-segment tensors in reversed-time order: documents reverse, batch rows do not."""
    return x if x is None or cu is None else x.flip(0)


def _reverse_cu(cu: Optional[Tensor], T: int) -> Optional[Tensor]:
    return None if cu is None else (T - cu).flip(0)


def _call(backend: str, q, k, v, decay, init, off, cu, want_final, chunk=None, q_scale=1.0, k_scale=1.0,
          reverse=False):
    """The forward primitive with optional scaling of q / k and time reversal. The torch path
    does both a group of heads at a time (no full-size copies); for Triton they are done here."""
    if backend == "torch":
        kw = {"chunk": chunk} if chunk else {}
        return lightning_fwd_torch(q, k, v, decay, init, off, cu, want_final, q_scale=q_scale, k_scale=k_scale,
                                   reverse=reverse, **kw)
    F = _primitive(backend)
    T = q.shape[2]
    if reverse:
        q, k, v = q.flip(2), k.flip(2), v.flip(2)
        init = _flip_segments(init, cu)
        cu = _reverse_cu(cu, T)
    q = q * q_scale if q_scale != 1.0 else q
    k = k * k_scale if k_scale != 1.0 else k
    o, final = F(q.contiguous(), k.contiguous(), v.contiguous(), decay, init, off, cu, want_final)
    if reverse:
        o = o.flip(2)
        final = _flip_segments(final, cu)
    return o, final


class _Lightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, init, scale, cu, want_final, backend, chunk):
        o, final = _call(backend, q, k, v, decay, init, 1, cu, want_final, chunk, q_scale=scale)
        ctx.save_for_backward(q, k, v, decay, init, cu)
        ctx.scale, ctx.backend, ctx.chunk = scale, backend, chunk
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, decay, init, cu = ctx.saved_tensors
        be, ch, s = ctx.backend, ctx.chunk, ctx.scale
        do = do.contiguous()
        dq = dk = dv = dinit = None
        if ctx.needs_input_grad[0]:  # dq = scale * F(dO, v, k, S0^T)
            init_t = None if init is None else init.transpose(-1, -2).contiguous()
            dq = _call(be, do, v, k, decay, init_t, 1, cu, False, ch, q_scale=s)[0]
        if ctx.needs_input_grad[1]:  # dk' = F(v', scale dO', q', dS_T^T)
            init_t = None if dfinal is None else dfinal.transpose(-1, -2).contiguous()
            dk = _call(be, v, do, q, decay, init_t, 0, cu, False, ch, k_scale=s, reverse=True)[0]
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:  # dv' = F(k', scale q', dO', dS_T)
            dv, fin = _call(be, k, q, do, decay, dfinal, 0, cu, ctx.needs_input_grad[4], ch, k_scale=s,
                            reverse=True)
            if ctx.needs_input_grad[4]:  # dS0 = lam * final of the reversed dv call
                dinit = (fin * torch.exp(-decay.to(fin.dtype)).view(1, -1, 1, 1)).to(init.dtype)
            if not ctx.needs_input_grad[2]:
                dv = None
        return dq, dk, dv, None, dinit, None, None, None, None, None


def _check(q, k, v, decay, initial_state, cu_seqlens, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, dim), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if k.shape != q.shape:
        raise ValueError(f"k: shape {tuple(k.shape)} must equal q's {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: shape {tuple(v.shape)} must match q's (batch, heads, seq) {tuple(q.shape[:3])}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: devices differ ({q.device}, {k.device}, {v.device})")
    B, H, T, K = q.shape
    if T < 1:
        raise ValueError(f"q: sequence length {T}: must be >= 1")
    if not isinstance(decay, Tensor) or decay.shape != (H,):
        raise ValueError(f"decay: expected a tensor of shape ({H},) (one per head), got "
                         f"{tuple(decay.shape) if isinstance(decay, Tensor) else decay!r}")
    if decay.requires_grad:
        raise ValueError("decay: gradients with respect to the decay are not supported; pass it as a buffer "
                         "(requires_grad=False)")
    if not torch.isfinite(decay).all() or (decay < 0).any():
        raise ValueError(f"decay: every entry must be finite and >= 0 (lambda = exp(-decay) <= 1), got "
                         f"{decay.tolist()}")
    if not isinstance(scale, (int, float)) or not (scale == scale) or abs(scale) == float("inf"):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    S = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                   torch.int64):
            raise ValueError("cu_seqlens: expected a 1-D int32/int64 tensor of document offsets [0, ..., seq]")
        if B != 1:
            raise ValueError(f"cu_seqlens: packed documents need batch size 1, got {B}")
        c = cu_seqlens.tolist()
        if len(c) < 2 or c[0] != 0 or c[-1] != T:
            raise ValueError(f"cu_seqlens: must start at 0 and end at the sequence length {T}, got "
                             f"[{c[0]}, ..., {c[-1]}]" if c else "cu_seqlens: empty")
        if any(b <= a for a, b in zip(c, c[1:])):
            raise ValueError("cu_seqlens: offsets must be strictly increasing (no empty documents)")
        S = len(c) - 1
    if initial_state is not None:
        want = (S, H, K, v.shape[-1])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state: expected shape {want} (one state per "
                             f"{'document' if cu_seqlens is not None else 'batch row'}), got "
                             f"{tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state!r}")
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"initial_state: dtype {initial_state.dtype}: states are kept in float32 (or float64)")


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, scale: float = 1.0,
                   initial_state: Optional[Tensor] = None, return_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
                   chunk: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Lightning attention.

    q, k: (B, H, T, K); v: (B, H, T, V); decay: (H,) >= 0 (a buffer); initial_state:
    (B, H, K, V), or (N, H, K, V) with cu_seqlens (N+1 offsets of packed documents, B == 1;
    the state restarts at each document). Returns o (B, H, T, V) in v's dtype, and with
    return_state the final state per row/document, fp32 (fp64 for fp64 inputs).
    Gradients flow to q, k, v and initial_state (and through the returned state).
    """
    _check(q, k, v, decay, initial_state, cu_seqlens, scale)
    be = pick_backend(q, backend)
    if initial_state is not None and q.dtype != torch.float64:
        initial_state = initial_state.float()
    o, final = _Lightning.apply(q, k, v, decay.detach().to(q.device), initial_state, float(scale), cu_seqlens,
                                bool(return_state), be, chunk)
    return (o, final) if return_state else o


def lightning_attn_rows(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, scale: float = 1.0,
                        doc_ids: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
                        backend: str = "auto"):
    """Lightning attention over a batch of rows that may each hold several packed documents.

    q, k: (B, H, T, K); v: (B, H, T, V); doc_ids: (B, T) document index per token (or None:
    one document per row); initial_state: (B, H, K, V) entering the *first* document of each
    row (streaming: the state a previous segment of that row left). Returns
    (o (B, H, T, V), final (B, H, K, V): the state after each row's last token, i.e. of its last
    document, first_len (B,): tokens of each row's first document).
    Rows with documents are packed into one sequence with cu_seqlens (each row starts a new
    document), so one kernel call serves the whole batch.
    """
    B, H, T, K = q.shape
    if doc_ids is None:
        o, final = lightning_attn(q, k, v, decay, scale, initial_state, True, backend=backend)
        return o, final, torch.full((B,), T, dtype=torch.long, device=q.device)
    if doc_ids.shape != (B, T):
        raise ValueError(f"doc_ids: expected shape {(B, T)}, got {tuple(doc_ids.shape)}")
    starts = torch.ones(B, T, dtype=torch.bool, device=q.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([flat_starts, flat_starts.new_tensor([B * T])])
    seg_of_row_start = starts.sum(1).cumsum(0) - starts.sum(1)  # (B,) index of each row's first document
    n_seg = cu.numel() - 1
    init = None
    if initial_state is not None:
        init = initial_state.new_zeros((n_seg,) + tuple(initial_state.shape[1:]))
        init = init.index_copy(0, seg_of_row_start, initial_state)
    pack = lambda x: x.transpose(0, 1).reshape(1, H, B * T, x.shape[-1])  # noqa: E731
    o, finals = lightning_attn(pack(q), pack(k), pack(v), decay, scale, init, True, cu, backend=backend)
    o = o.reshape(H, B, T, v.shape[-1]).transpose(0, 1)
    last_seg = starts.sum(1).cumsum(0) - 1  # (B,)
    first_len = torch.where(starts[:, 1:].any(1), starts[:, 1:].float().argmax(1) + 1, torch.full_like(last_seg, T))
    return o, finals[last_seg], first_len
