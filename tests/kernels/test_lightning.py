"""Lightning attention, torch path: against the float64 O(T^2) formula, forward and every gradient."""
import pytest
import torch

from longctx.kernels.lightning import lightning_attn
from longctx.kernels.lightning_torch import decay_scan, lightning_naive

F64 = torch.float64


def make(B, H, T, K, V, S=None, init=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype).requires_grad_() for d in (K, K, V))
    i0 = torch.randn(S or B, H, K, V, generator=g, dtype=F64 if dtype == F64 else torch.float32).requires_grad_() \
        if init else None
    return q, k, v, i0


def grads_both(q, k, v, i0, decay, scale, cu, chunk=None):
    o, f = lightning_attn(q, k, v, decay, scale, i0, True, cu, backend="torch", chunk=chunk)
    g = torch.Generator().manual_seed(1)
    go, gf = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(f.shape, generator=g, dtype=f.dtype)
    leaves = [x for x in (q, k, v, i0) if x is not None]
    ga = torch.autograd.grad((o * go).sum() + (f * gf).sum(), leaves)
    on, fn = lightning_naive(q * scale, k, v, decay, i0, 1, cu)
    gb = torch.autograd.grad((on * go.double()).sum() + (fn * gf.double()).sum(), leaves)
    return (o, f, ga), (on, fn, gb)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
def test_forward_and_gradients_match_naive_float64(T):
    q, k, v, i0 = make(2, 3, T, 8, 6)
    decay = torch.tensor([0.0, 0.05, 2.0], dtype=F64)  # no decay, slow, fast
    (o, f, ga), (on, fn, gb) = grads_both(q, k, v, i0, decay, 0.5, None, chunk=64)
    torch.testing.assert_close(o, on, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, fn, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("q k v init".split(), ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("cu", [[0, 1000], [0, 5, 64, 65, 300, 1000], [0, 64, 128, 999, 1000]])
def test_packed_documents(cu):
    cu_t = torch.tensor(cu)
    q, k, v, i0 = make(1, 2, 1000, 4, 5, S=len(cu) - 1)
    decay = torch.tensor([0.01, 0.3], dtype=F64)
    (o, f, ga), (on, fn, gb) = grads_both(q, k, v, i0, decay, 1.0, cu_t, chunk=64)
    torch.testing.assert_close(o, on, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, fn, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("q k v init".split(), ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_documents_do_not_leak():
    """Changing document 0 leaves document 1's output untouched (the state restarts)."""
    q, k, v, _ = make(1, 1, 40, 4, 4, init=False)
    cu = torch.tensor([0, 17, 40])
    d = torch.tensor([0.0], dtype=F64)
    o1 = lightning_attn(q, k, v, d, cu_seqlens=cu)
    k2 = k.detach().clone()
    k2[:, :, :17] += 1.0
    o2 = lightning_attn(q, k2, v, d, cu_seqlens=cu)
    torch.testing.assert_close(o1[:, :, 17:], o2[:, :, 17:], rtol=0, atol=0)
    assert not torch.allclose(o1[:, :, :17], o2[:, :, :17])


def test_carried_state_equals_one_long_segment():
    q, k, v, i0 = make(2, 2, 300, 4, 4)
    d = torch.tensor([0.02, 0.5], dtype=F64)
    o, f = lightning_attn(q, k, v, d, 1.0, i0, True)
    o1, f1 = lightning_attn(q[:, :, :123], k[:, :, :123], v[:, :, :123], d, 1.0, i0, True)
    o2, f2 = lightning_attn(q[:, :, 123:], k[:, :, 123:], v[:, :, 123:], d, 1.0, f1, True)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f2, f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64, 256])
def test_chunk_size_does_not_change_result(chunk):
    # batch 2 with initial states and (for small chunks) more than 64 chunks: the scan's two levels
    q, k, v, i0 = make(2, 2, 300, 4, 3)
    d = torch.tensor([0.1, 1.0], dtype=F64)
    o, f = lightning_attn(q, k, v, d, 1.0, i0, True, chunk=chunk)
    on, fn = lightning_naive(q, k, v, d, i0)
    torch.testing.assert_close(o, on, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, fn, rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_close_to_float64():
    q, k, v, i0 = make(1, 2, 500, 16, 16)
    d = torch.tensor([0.01, 0.2], dtype=F64)
    ref = lightning_naive(q, k, v, d, i0)[0]
    for dt, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        o = lightning_attn(q.detach().to(dt), k.detach().to(dt), v.detach().to(dt), d.float(), 1.0, i0.detach().float())
        assert o.dtype == dt
        rel = (o.double() - ref).norm() / ref.norm()
        assert rel < tol, (dt, float(rel))


def test_huge_decay_underflows_to_zero_not_nan():
    q, k, v, i0 = make(1, 1, 100, 4, 4)
    o, f = lightning_attn(q, k, v, torch.tensor([1e4], dtype=F64), 1.0, i0, True)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    # each token sees only itself: o_t = (q_t . k_t) v_t
    torch.testing.assert_close(o, (q * k).sum(-1, keepdim=True) * v, rtol=1e-12, atol=1e-12)


def test_decay_scan_matches_loop():
    g = torch.Generator().manual_seed(3)
    B, H, N, F = 2, 3, 300, 5
    rate = torch.rand(1, H, generator=g, dtype=F64)
    pos = torch.randint(0, 4, (N,), generator=g).cumsum(0)
    R = (torch.rand(B, N, generator=g) < 0.05).long().cumsum(-1)
    X = torch.randn(B, H, N, F, generator=g, dtype=F64)
    Y = decay_scan(rate, pos, R, X, block=8)
    ref = torch.zeros_like(X)
    for n in range(N):
        for i in range(n + 1):
            same = (R[:, n] == R[:, i]).to(F64)[:, None, None]
            ref[:, :, n] += same * torch.exp(-rate[0] * (pos[n] - pos[i]))[None, :, None] * X[:, :, i]
    torch.testing.assert_close(Y, ref, rtol=1e-12, atol=1e-12)


def test_decay_scan_float32_stays_exact_at_long_positions():
    """Weights come from int64 position differences: no cancellation at a million tokens."""
    N, C = 16384, 64
    rate = torch.tensor([[0.1, 0.01]], dtype=F64)
    pos = C * torch.arange(N)
    R = torch.zeros(1, N, dtype=torch.long)
    X = torch.randn(1, 2, N, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = decay_scan(rate, pos, R, X)
    got = decay_scan(rate.float(), pos, R, X.float()).double()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()  # worst position, as a vector
    assert rel < 1e-5, float(rel)


def _qkv(T=10, B=1):
    return torch.randn(B, 2, T, 4), torch.randn(B, 2, T, 4), torch.randn(B, 2, T, 3)


@pytest.mark.parametrize("bad, word", [
    (dict(k=torch.randn(1, 2, 9, 4)), "k:"),
    (dict(v=torch.randn(1, 3, 10, 3)), "v:"),
    (dict(q=torch.randn(2, 10, 4)), "q:"),
    (dict(decay=torch.tensor([0.1, -0.1])), "decay:"),
    (dict(decay=torch.tensor([0.1])), "decay:"),
    (dict(decay=torch.tensor([0.1, float("nan")])), "decay:"),
    (dict(q=torch.randn(1, 2, 10, 4, dtype=torch.float64)), "dtypes differ"),
    (dict(q=torch.randint(0, 3, (1, 2, 10, 4))), "q:"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), "cu_seqlens:"),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 10])), "cu_seqlens:"),
    (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "cu_seqlens:"),
    (dict(initial_state=torch.zeros(1, 2, 3, 4)), "initial_state:"),
    (dict(decay=torch.tensor([0.1, 0.2], requires_grad=True)), "decay:"),
])
def test_bad_input_names_argument(bad, word):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, decay=torch.tensor([0.1, 0.2]))
    args.update(bad)
    with pytest.raises(ValueError, match=word):
        lightning_attn(**args)


def test_cu_seqlens_needs_batch_one():
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="batch size 1"):
        lightning_attn(q, k, v, torch.tensor([0.1, 0.2]), cu_seqlens=torch.tensor([0, 10]))
