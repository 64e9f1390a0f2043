"""The Triton flash kernel against the torch path (the specification): out, lse and every gradient,
directly and through `flash_attn`'s autograd. Runs on CPU tensors under TRITON_INTERPRET=1 (set
by conftest), so every shape is tiny; tiles of 16 make several blocks and partial last blocks."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

from longctx.kernels import flash_triton as ft  # noqa: E402
from longctx.kernels.flash import flash_attn  # noqa: E402
from longctx.kernels.flash_torch import flash_bwd_torch, flash_fwd_torch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SMALL = ft.FlashConfig(ft.Tiles(16, 16), ft.Tiles(16, 32), ft.Tiles(32, 16))  # three different tilings
TINY = ft.FlashConfig(ft.Tiles(16, 16), ft.Tiles(16, 16), ft.Tiles(16, 16))


def zigzag(T: int, ranks: int, rank: int) -> torch.Tensor:
    """Global positions a rank holds in a zigzag layout: chunks r and 2 * ranks - 1 - r."""
    c = T // (2 * ranks)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * ranks - 1 - rank) * c,
                                                                            (2 * ranks - rank) * c)])


def docs(B: int, T: int, starts) -> torch.Tensor:
    """(B, T) document ids from per-row lists of document start offsets."""
    s = torch.zeros(B, T, dtype=torch.long)
    for b, st in enumerate(starts):
        s[b, st] = 1
    return s.cumsum(1)


# name, B, H, Hkv, D, Dv, causal, window, q_pos, k_pos, documents (q_doc, k_doc) or None
CASES = [
    ("causal-gqa", 2, 4, 2, 16, 16, True, None, torch.arange(37), torch.arange(37), None),
    ("full-mqa-dv", 1, 4, 1, 32, 16, False, None, torch.arange(37), torch.arange(37), None),
    ("causal-window", 1, 2, 2, 16, 32, True, 9, torch.arange(45), torch.arange(45), None),
    ("two-sided-window", 1, 2, 1, 16, 16, False, 6, torch.arange(40), torch.arange(40), None),
    ("causal-docs-gqa", 2, 4, 2, 16, 16, True, None, torch.arange(50), torch.arange(50),
     (docs(2, 50, [[7, 8, 33], [20]]),) * 2),
    ("docs-window", 2, 2, 1, 16, 16, False, 5, torch.arange(41), torch.arange(41),
     (docs(2, 41, [[16, 30], [3]]),) * 2),
    # a ring piece: keys after some queries, Tq != Tk (rows 0..9 of the queries see no key)
    ("shifted", 2, 2, 1, 16, 16, True, None, torch.arange(40) + 30, torch.arange(56) + 40, None),
    # zigzag shards (chunks of 12 cross the 16-tiles): queries of rank 0, keys of ranks 1 and 2
    ("zigzag", 1, 4, 2, 16, 16, True, None, zigzag(96, 4, 0), torch.cat([zigzag(96, 4, 1), zigzag(96, 4, 2)]),
     None),
    # arbitrary order, a window and per-side documents
    ("permuted", 2, 2, 2, 16, 16, True, 20, torch.randperm(33, generator=torch.Generator().manual_seed(1)),
     torch.randperm(47, generator=torch.Generator().manual_seed(2)),
     (docs(2, 33, [[10], [5, 20]]), docs(2, 47, [[12], [30]]))),
    ("tiny", 1, 2, 1, 16, 16, True, None, torch.arange(5) + 2, torch.arange(3), None),
]


def make(B, H, Hkv, Tq, Tk, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    return [x.to(DEV, dtype) for x in (q, k, v)]


def _dev(*xs):
    return [None if x is None else x.to(DEV) for x in xs]


def _close(got, ref, name, tol=1e-5):
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_torch_path(case):
    name, B, H, Hkv, D, Dv, causal, window, q_pos, k_pos, dd = case
    q_doc, k_doc = (None, None) if dd is None else dd
    q_pos, k_pos, q_doc, k_doc = _dev(q_pos, k_pos, q_doc, k_doc)
    Tq, Tk = len(q_pos), len(k_pos)
    q, k, v = make(B, H, Hkv, Tq, Tk, D, Dv, seed=len(name))
    scale = 0.37
    args = (causal, scale, window, q_pos, k_pos, q_doc, k_doc)
    o, lse = ft.flash_fwd_triton(q, k, v, *args, config=SMALL)
    ro, rl = flash_fwd_torch(q, k, v, *args, block=16)
    _close(o, ro, "o")
    _close(lse, rl, "lse")
    g = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=g).to(DEV)
    dlse = torch.randn(lse.shape, generator=g).to(DEV).masked_fill(torch.isinf(rl), 0.0)
    got = ft.flash_bwd_triton(do, q, k, v, o, lse, *args, dlse=dlse, config=SMALL)
    ref = flash_bwd_torch(do, q, k, v, ro, rl, *args, block=16, dlse=dlse)
    for n, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), n
        _close(a, b, n)
    empty = torch.isinf(rl)
    if name in ("shifted", "zigzag"):  # these layouts leave some rows without any key
        assert empty.any()
    assert (lse[empty] == -math.inf).all()
    assert (o[empty[..., None].expand_as(o)] == 0).all()
    assert (got[0][empty[..., None].expand_as(got[0])] == 0).all()


def _loss_and_grads(q, k, v, backend, seed=5, **kw):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = flash_attn(*xs, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    # bf16-representable, so a bf16 run and its fp32 reference get exactly the same dO
    go = torch.randn(o.shape, generator=g).bfloat16().to(DEV, o.dtype)
    gl = torch.randn(lse.shape, generator=g).to(DEV)
    # the lse term gives the backward a non-zero dlse (rows without keys contribute nothing)
    loss = (o.float() * go.float()).sum() + (torch.nan_to_num(lse, neginf=0.0) * gl).sum()
    return (o, lse, *torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("config", [TINY, None], ids=["tiles16", "default-tiles"])
@pytest.mark.parametrize("kw", [
    dict(causal=True),
    dict(causal=True, window=7, q_pos=torch.arange(29) + 20, k_pos=torch.arange(43)),
    dict(causal=False, doc_ids=docs(2, 29, [[3, 17], [9]])),
], ids=["causal", "window-shift", "docs"])
def test_flash_attn_autograd_triton_vs_torch(kw, config, monkeypatch):
    if config is not None:
        monkeypatch.setattr(ft, "pick_config", lambda *a: config)
    kw = {k_: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for k_, x in kw.items()}
    Tq = len(kw["q_pos"]) if "q_pos" in kw else 29
    Tk = len(kw["k_pos"]) if "k_pos" in kw else 29
    q, k, v = make(2, 4, 2, Tq, Tk, 32, 16, seed=Tk)
    res_t = _loss_and_grads(q, k, v, "triton", **kw)
    res_r = _loss_and_grads(q, k, v, "torch", block=16, **kw)
    for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), res_t, res_r):
        _close(a, b, n)
    if "q_pos" in kw:  # queries at 20..48 with keys 0..42 and window 7: every row sees keys
        assert torch.isfinite(res_t[1]).all()


def test_bf16_against_float32_reference(monkeypatch):
    """bf16 inputs against the torch path on the same (bf16-valued) inputs in fp32. Expected error:
    the kernel rounds p and dS to bf16 (unit roundoff 2^-8 ~ 3.9e-3) before their products, and
    o, dq, dk, dv to bf16 on output; rounding errors of independent terms add in quadrature, so
    the norm-wise relative error stays near 4e-3. The bound 1.5e-2 leaves ~4x margin; a wrong
    mask or index gives errors of order 1."""
    q_pos, k_pos = torch.arange(37), torch.arange(37)
    dd = docs(2, 37, [[9], [25]])
    q, k, v = make(2, 4, 2, 37, 37, 32, 32, dtype=torch.bfloat16, seed=11)
    kw = dict(causal=True, window=20, doc_ids=dd.to(DEV), q_pos=q_pos.to(DEV), k_pos=k_pos.to(DEV))
    monkeypatch.setattr(ft, "pick_config", lambda *a: SMALL)
    got = _loss_and_grads(q, k, v, "triton", **kw)
    ref = _loss_and_grads(q.float(), k.float(), v.float(), "torch", block=16, **kw)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
        a, b = a.float(), b.float()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1.5e-2, (n, rel)
        # elementwise: a few bf16 ulps of the tensor's scale
        assert (a - b).abs().max().item() < 4e-2 * b.abs().max().item(), n


def _element_mask(q_pos, k_pos, q_doc, k_doc, causal, window):
    """(Bm, Tq, Tk) allowed pairs, straight from the definition."""
    ok = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    d = q_pos[:, None] - k_pos[None, :]
    if causal:
        ok &= d >= 0
    if window is not None:
        ok &= d < window
        if not causal:
            ok &= -d < window
    ok = ok[None]
    if q_doc is not None:
        ok = ok & (q_doc[:, :, None] == k_doc[:, None, :])
    return ok


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bm, bn", [(16, 16), (16, 32), (32, 16)])
def test_tile_bounds_cover_every_visible_tile(case, bm, bn):
    """[lo, hi) holds every tile with an allowed pair; [flo, fhi) only tiles where every pair is
    allowed and in bounds (they skip the mask). Checked against element masks for both loop
    orders (queries outer for fwd / dq, keys outer for dk / dv)."""
    _, B, _, _, _, _, causal, window, q_pos, k_pos, dd = case
    q_doc, k_doc = (None, None) if dd is None else dd
    ok = _element_mask(q_pos, k_pos, q_doc, k_doc, causal, window)
    Tq, Tk = len(q_pos), len(k_pos)
    nq, nk = -(-Tq // bm), -(-Tk // bn)
    pad = torch.zeros(ok.shape[0], nq * bm, nk * bn, dtype=torch.bool)
    pad[:, :Tq, :Tk] = ok
    inb = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    inb[:Tq, :Tk] = True
    tiles = pad.view(-1, nq, bm, nk, bn)
    any_ok = tiles.any(4).any(2)  # (Bm, nq, nk)
    all_ok = tiles.all(4).all(2) & inb.view(nq, bm, nk, bn).all(3).all(1)
    for by_keys in (False, True):
        bnd = ft._bounds(q_pos, k_pos, q_doc, k_doc, bm, bn, causal, window, by_keys)
        a, f = (any_ok.transpose(1, 2), all_ok.transpose(1, 2)) if by_keys else (any_ok, all_ok)
        assert bnd.shape == (a.shape[0], a.shape[1], 4) and bnd.dtype == torch.int32
        for b in range(a.shape[0]):
            for r in range(a.shape[1]):
                lo, flo, fhi, hi = bnd[b, r].tolist()
                assert 0 <= lo <= flo <= fhi <= hi <= a.shape[2]
                vis = a[b, r].nonzero().flatten().tolist()
                assert all(lo <= c < hi for c in vis), (by_keys, b, r, vis, (lo, hi))
                assert f[b, r, flo:fhi].all(), (by_keys, b, r, (flo, fhi))


def test_tile_bounds_are_tight_for_contiguous_causal():
    # 0..T-1 causal: query block i needs key blocks 0..i exactly, 0..i-1 without the mask (block
    # 0 has no full tile: its empty run sits at hi)
    bnd = ft._bounds(torch.arange(64), torch.arange(64), None, None, 16, 16, True, None, by_keys=False)
    assert bnd[0].tolist() == [[0, 1, 1, 1]] + [[0, 0, i, i + 1] for i in range(1, 4)]
    bnd = ft._bounds(torch.arange(64), torch.arange(64), None, None, 16, 16, True, None, by_keys=True)
    assert bnd[0].tolist() == [[i, i + 1, 4, 4] for i in range(4)]


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=torch.float64), r"float64.*float16, bfloat16 or float32"),
    (dict(D=8), r"D=8.*16, 32, 64, 128"),
    (dict(Dv=48), r"Dv=48.*16, 32, 64, 128"),
])
def test_bad_input_names_value_and_what_is_valid(kw, match):
    D, Dv = kw.get("D", 16), kw.get("Dv", 16)
    q, k, v = make(1, 2, 1, 8, 8, D, Dv, dtype=kw.get("dtype", torch.float32))
    with pytest.raises(ValueError, match=match):
        flash_attn(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=match):
        ft.flash_fwd_triton(q, k, v, True, 0.1, None, torch.arange(8), torch.arange(8), None, None)
    o, lse = flash_attn(q, k, v, backend="auto")  # auto falls back to the torch path
    assert torch.isfinite(o).all() and o.shape == (1, 2, 8, Dv)


def test_unknown_backend():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="backend='cuda'.*'auto', 'torch' or 'triton'"):
        flash_attn(q, q, q, backend="cuda")
