"""Tests for the lightning-attention Triton forward (run under TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

from longctx.kernels.lightning_triton import lightning_fwd_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def naive(q, k, v, decay, init=None, init_offset=1, cu_seqlens=None):
    """float64 oracle: direct double loop over t and j from the definition (vectorised over heads)."""
    q, k, v, decay = q.double(), k.double(), v.double(), decay.double()
    B, H, T, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        segs = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens]
        segs = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    lam = torch.exp(-decay)  # (H,)
    o = torch.zeros(B, H, T, V, dtype=torch.float64)
    final = torch.zeros(len(segs), H, K, V, dtype=torch.float64)
    for n, (b, s, e1) in enumerate(segs):
        ini = init[n].double() if init is not None else torch.zeros(H, K, V, dtype=torch.float64)
        for t in range(s, e1):
            acc = torch.zeros(H, V, dtype=torch.float64)
            for j in range(s, t + 1):
                w = lam ** (t - j) * (q[b, :, t] * k[b, :, j]).sum(-1)  # (H,)
                acc += w[:, None] * v[b, :, j]
            acc += (lam ** (t - s + init_offset))[:, None] * torch.einsum("hk,hkv->hv", q[b, :, t], ini)
            o[b, :, t] = acc
        e = e1 - 1
        fin = (lam ** (e - s + init_offset))[:, None, None] * ini
        for j in range(s, e1):
            fin = fin + (lam ** (e - j))[:, None, None] * k[b, :, j, :, None] * v[b, :, j, None, :]
        final[n] = fin
    return o, final


def make(B, H, T, K, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, K, generator=g) / K**0.5).to(dtype)
    k = torch.randn(B, H, T, K, generator=g).to(dtype)
    v = torch.randn(B, H, T, V, generator=g).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


DECAY = torch.tensor([0.0, 3.0])  # a 0 entry (no decay) and a large one


def _close(got, ref, tol):
    torch.testing.assert_close(got.detach().cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
def test_fwd_matches_naive(T):
    q, k, v = make(2, 2, T, 16, 16, seed=T)
    decay = torch.tensor([0.0, 0.3])
    o, final = lightning_fwd_triton(q, k, v, decay.to(DEV), block=16)
    assert final is None
    assert o.shape == (2, 2, T, 16) and o.dtype == torch.float32
    ref, _ = naive(q.cpu(), k.cpu(), v.cpu(), decay)
    _close(o, ref, 1e-4)


@pytest.mark.parametrize("init_offset", [0, 1])
def test_init_and_final(init_offset):
    T = 40
    q, k, v = make(2, 2, T, 16, 16, seed=1)
    init = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(7))
    o, final = lightning_fwd_triton(q, k, v, DECAY.to(DEV), init=init.to(DEV), init_offset=init_offset,
                                    want_final=True, block=16)
    ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), DECAY, init, init_offset)
    assert final.shape == (2, 2, 16, 16) and final.dtype == torch.float32
    _close(o, ref_o, 1e-4)
    _close(final, ref_f, 1e-4)


def test_init_offset_matters():
    # with a non-zero decay, init_offset 0 and 1 must give different outputs (guards against ignoring it)
    q, k, v = make(1, 2, 17, 16, 16, seed=3)
    init = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(8)).to(DEV)
    decay = torch.tensor([0.1, 0.1]).to(DEV)
    o0, f0 = lightning_fwd_triton(q, k, v, decay, init=init, init_offset=0, want_final=True, block=16)
    o1, f1 = lightning_fwd_triton(q, k, v, decay, init=init, init_offset=1, want_final=True, block=16)
    assert (o0 - o1).abs().max() > 1e-3 and (f0 - f1).abs().max() > 1e-3


def test_k_split_and_k_ne_v():
    # K=32 with V=16; also K=128 forces two K blocks (partial outputs summed)
    for K, V, T in ((32, 16, 17), (128, 16, 9)):
        q, k, v = make(2, 2, T, K, V, seed=K)
        init = torch.randn(2, 2, K, V, generator=torch.Generator().manual_seed(5))
        o, final = lightning_fwd_triton(q, k, v, DECAY.to(DEV), init=init.to(DEV), want_final=True, block=16)
        ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), DECAY, init)
        assert o.shape == (2, 2, T, V)
        _close(o, ref_o, 1e-4)
        _close(final, ref_f, 1e-4)


def test_v_split_non_pow2():
    # V=80 > 64 forces two V blocks; K=20 is not a power of two (masked)
    q, k, v = make(1, 2, 17, 20, 80, seed=11)
    o, final = lightning_fwd_triton(q, k, v, DECAY.to(DEV), want_final=True, block=16)
    ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), DECAY)
    _close(o, ref_o, 1e-4)
    _close(final, ref_f, 1e-4)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_cu_seqlens(idx_dtype):
    lens = [5, 16, 19]
    T = sum(lens)
    cu = torch.tensor([0, 5, 21, 40], dtype=idx_dtype)
    q, k, v = make(1, 2, T, 16, 16, seed=2)
    init = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(9))
    o, final = lightning_fwd_triton(q, k, v, DECAY.to(DEV), init=init.to(DEV), init_offset=0,
                                    cu_seqlens=cu.to(DEV), want_final=True, block=16)
    ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), DECAY, init, 0, cu)
    assert final.shape == (3, 2, 16, 16)
    _close(o, ref_o, 1e-4)
    _close(final, ref_f, 1e-4)
    # the recurrence must restart at segment starts: differs from treating it as one sequence
    whole, _ = naive(q.cpu(), k.cpu(), v.cpu(), DECAY)
    assert (ref_o - whole).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v = make(2, 2, 17, 16, 16, dtype=dtype, seed=4)
    init = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    decay = torch.tensor([0.0, 0.3])
    o, final = lightning_fwd_triton(q, k, v, decay.to(DEV), init=init.to(DEV), want_final=True, block=16)
    assert o.dtype == dtype and final.dtype == torch.float32
    ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), decay, init)
    for got, ref in ((o, ref_o), (final, ref_f)):
        got = got.cpu().double()
        rel = (got - ref).norm() / ref.norm()
        assert rel < 2e-2, rel
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def test_large_decay_no_overflow():
    # decay 50: lambda^n underflows; any lambda^(-n) would overflow to inf/nan
    q, k, v = make(1, 2, 40, 16, 16, seed=12)
    decay = torch.tensor([50.0, 0.0])
    init = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    o, final = lightning_fwd_triton(q, k, v, decay.to(DEV), init=init.to(DEV), init_offset=0, want_final=True,
                                    block=16)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    ref_o, ref_f = naive(q.cpu(), k.cpu(), v.cpu(), decay, init, 0)
    _close(o, ref_o, 1e-4)
    _close(final, ref_f, 1e-4)


def _args(**over):
    q, k, v = make(1, 2, 8, 16, 16)
    a = dict(q=q, k=k, v=v, decay=torch.tensor([0.1, 0.2]).to(DEV))
    a.update(over)
    return a


@pytest.mark.parametrize("name,over", [
    ("q", lambda a: dict(q=a["q"][0])),
    ("k", lambda a: dict(k=a["k"][:, :, :4])),
    ("v", lambda a: dict(v=a["v"][:, :1])),
    ("k", lambda a: dict(k=a["k"].double())),
    ("v", lambda a: dict(v=a["v"].half())),
    ("q", lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double())),
    ("decay", lambda a: dict(decay=torch.zeros(3, device=DEV))),
    ("decay", lambda a: dict(decay=torch.zeros(2, 1, device=DEV))),
    ("init", lambda a: dict(init=torch.zeros(1, 2, 16, 8, device=DEV))),
    ("init", lambda a: dict(init=torch.zeros(2, 2, 16, 16, device=DEV))),
    ("init", lambda a: dict(init=torch.zeros(1, 2, 16, 16, device=DEV, dtype=torch.float64))),
    ("init_offset", lambda a: dict(init_offset=2)),
    ("cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0, 3, 7], device=DEV))),
    ("cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0, 5, 5, 8], device=DEV))),
    ("cu_seqlens", lambda a: dict(cu_seqlens=torch.tensor([0.0, 8.0], device=DEV))),
    ("cu_seqlens", lambda a: dict(q=a["q"].expand(2, -1, -1, -1), k=a["k"].expand(2, -1, -1, -1),
                                  v=a["v"].expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8], device=DEV))),
    ("block", lambda a: dict(block=24)),
])
def test_validation(name, over):
    a = _args()
    a.update(over(a))
    with pytest.raises(ValueError, match=f"^{name}:"):
        lightning_fwd_triton(**a)


def test_device_mismatch():
    a = _args(decay=torch.tensor([0.1, 0.2], device="meta"))
    with pytest.raises(ValueError, match="^decay:"):
        lightning_fwd_triton(**a)


# --- the public function on the Triton backend against the torch path: forward and every gradient ---
@pytest.mark.parametrize("T, cu", [(1, None), (63, None), (64, None), (65, None), (70, [0, 5, 64, 70])])
def test_public_api_triton_matches_torch_path(T, cu):
    from longctx.kernels.lightning import lightning_attn
    g = torch.Generator().manual_seed(T)
    B = 1 if cu else 2
    q, k, v = (torch.randn(B, 2, T, d, generator=g) for d in (16, 16, 16))
    S = len(cu) - 1 if cu else B
    i0 = torch.randn(S, 2, 16, 16, generator=g)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    decay = torch.tensor([0.05, 1.0])
    res = {}
    for be in ("torch", "triton"):
        xs = [t.clone().requires_grad_() for t in (q, k, v, i0)]
        o, f = lightning_attn(*xs[:3], decay, 0.5, xs[3], True, cu_t, backend=be)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        gf = torch.randn(f.shape, generator=torch.Generator().manual_seed(2))
        res[be] = (o, f, torch.autograd.grad((o * go).sum() + (f * gf).sum(), xs))
    for a, b, name in zip((res["triton"][0], res["triton"][1], *res["triton"][2]),
                          (res["torch"][0], res["torch"][1], *res["torch"][2]), ["o", "final", "dq", "dk", "dv", "dinit"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
