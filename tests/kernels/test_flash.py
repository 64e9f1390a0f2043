"""flash_attn (torch path) against the float64 textbook formula: out, lse and every gradient."""
import math

import pytest
import torch

from longctx.kernels.flash import flash_attn

F64 = torch.float64


def naive(q, k, v, causal, scale, window, q_pos, k_pos, q_doc, k_doc):
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, kk) * scale
    ok = torch.ones(Tq, k.shape[2], dtype=torch.bool)
    if causal:
        ok &= k_pos[None] <= q_pos[:, None]
    if window is not None:
        ok &= (q_pos[:, None] - k_pos[None]) < window
        if not causal:
            ok &= (k_pos[None] - q_pos[:, None]) < window
    ok = ok[None, None].expand(B, 1, -1, -1)
    if q_doc is not None:
        ok = ok & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return p @ vv, lse


CASES = [
    dict(Tq=77, Tk=77, H=4, Hkv=2, causal=True, window=None, docs=False),
    dict(Tq=64, Tk=64, H=2, Hkv=2, causal=True, window=None, docs=False),
    dict(Tq=65, Tk=65, H=6, Hkv=2, causal=False, window=None, docs=False),
    dict(Tq=100, Tk=100, H=4, Hkv=1, causal=True, window=17, docs=False),
    dict(Tq=90, Tk=90, H=2, Hkv=2, causal=False, window=9, docs=True),
    dict(Tq=70, Tk=70, H=4, Hkv=4, causal=True, window=None, docs=True),
    dict(Tq=40, Tk=56, H=2, Hkv=1, causal=True, window=None, docs=False, shift=True),  # a ring piece
]


@pytest.mark.parametrize("c", CASES)
def test_matches_naive_float64(c):
    g = torch.Generator().manual_seed(len(str(c)))
    B, D = 2, 8
    q = torch.randn(B, c["H"], c["Tq"], D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, c["Hkv"], c["Tk"], D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, c["Hkv"], c["Tk"], 5, generator=g, dtype=F64, requires_grad=True)
    q_pos = torch.arange(c["Tq"]) + (30 if c.get("shift") else 0)
    k_pos = torch.arange(c["Tk"]) + (60 if c.get("shift") else 0)  # keys partly after the queries
    docs = None
    if c["docs"]:
        starts = torch.zeros(B, c["Tq"], dtype=torch.long)
        starts[0, [10, 11, 40]] = 1
        starts[1, [64]] = 1
        docs = starts.cumsum(1)
    out, lse = flash_attn(q, k, v, c["causal"], 0.37, c["window"], docs, q_pos=q_pos, k_pos=k_pos, block=16)
    ref_o, ref_l = naive(q, k, v, c["causal"], 0.37, c["window"], q_pos, k_pos, docs, docs)
    torch.testing.assert_close(out, ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_l, rtol=1e-10, atol=1e-10)
    if c.get("shift"):
        assert torch.isinf(lse[:, :, :10]).all() and (out[:, :, :10] == 0).all()  # rows that see no key
    go = torch.randn(out.shape, generator=g, dtype=F64)
    gl = torch.randn(lse.shape, generator=g, dtype=F64).masked_fill(torch.isinf(ref_l), 0.0)
    ga = torch.autograd.grad((out * go).sum() + (torch.nan_to_num(lse, neginf=0.0) * gl).sum(), (q, k, v))
    gb = torch.autograd.grad((ref_o * go).sum() + (torch.nan_to_num(ref_l, neginf=0.0) * gl).sum(), (q, k, v))
    for name, a, b in zip("qkv", ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_float32_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g) for _ in range(3))
    out, _ = flash_attn(q, k, v, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    q = torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attn(q, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    with pytest.raises(ValueError, match="window"):
        flash_attn(q, q, q, window=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attn(q, q, q, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attn(q, q.double(), q)


BAND_CASES = [  # (Tq, halo keys in front, window, H, Hkv, docs)
    (100, 0, 17, 4, 2, False), (300, 0, 64, 2, 2, True), (77, 16, 17, 2, 1, False), (200, 63, 64, 2, 2, True),
    (5, 0, 300, 2, 2, False), (130, 255, 256, 2, 2, False), (40, 3, 1, 2, 2, False)]


@pytest.mark.parametrize("Tq, n, W, H, Hkv, docs", BAND_CASES)
@pytest.mark.parametrize("scores", [1 << 20, 50])  # one batch of chunks, or many
def test_sliding_window_band_path_float64(Tq, n, W, H, Hkv, docs, scores, monkeypatch):
    """The banded path of a causal window over contiguous positions (a shard, or a shard with
    its halo keys in front: SWA under SP) against the formula and against the tile loop:
    out, lse and every gradient (lse's included), sizes not multiples of the chunk."""
    from longctx.kernels import flash_torch as ft
    monkeypatch.setattr(ft, "BAND_SCORES", scores)
    g = torch.Generator().manual_seed(Tq + n + W)
    B, D = 2, 8
    q = torch.randn(B, H, Tq, D, generator=g, dtype=F64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Tq + n, D, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    kp = torch.arange(7, 7 + Tq + n)
    qp = kp[n:]
    assert ft.band_offset(qp, kp, True, W) == n
    assert ft.band_offset(qp, kp.flip(0), True, W) is None and ft.band_offset(qp, kp, False, W) is None
    docs_ = None
    if docs:
        kd = torch.randint(0, 3, (B, Tq + n), generator=g).sort(1).values
        docs_ = (kd[:, n:], kd)
    go = torch.randn(B, H, Tq, D, generator=g, dtype=F64)
    gl = torch.randn(B, H, Tq, generator=g, dtype=F64)

    def run(max_window):
        monkeypatch.setattr(ft, "BAND_MAX_WINDOW", max_window)
        o, lse = flash_attn(q, k, v, True, 0.37, W, docs_, q_pos=qp, k_pos=kp, block=16)
        return [o, lse, *torch.autograd.grad((o * go).sum() + (lse * gl).sum(), (q, k, v))]

    band, tiles = run(4096), run(0)
    ro, rl = naive(q, k, v, True, 0.37, W, qp, kp, *(docs_ or (None, None)))
    ref = [ro, rl, *torch.autograd.grad((ro * go).sum() + (rl * gl).sum(), (q, k, v))]
    for name, a, b, c in zip(["o", "lse", "dq", "dk", "dv"], band, ref, tiles):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sliding_window_band_path_low_precision(dtype, tol, monkeypatch):
    """The banded path on fp32 / bf16 inputs (computed in fp32 like the tile loop) against the
    tile loop: out, lse and every gradient, with halo keys in front and documents."""
    from longctx.kernels import flash_torch as ft
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, Tq, n, W, D = 1, 4, 2, 150, 20, 33, 16
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, Tq + n, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    kp = torch.arange(Tq + n)
    kd = torch.randint(0, 2, (B, Tq + n), generator=g).sort(1).values
    go = torch.randn(B, H, Tq, D, generator=g).to(dtype)

    def run(max_window):
        monkeypatch.setattr(ft, "BAND_MAX_WINDOW", max_window)
        o, lse = flash_attn(q, k, v, True, None, W, (kd[:, n:], kd), q_pos=kp[n:], k_pos=kp)
        return [o, lse, *torch.autograd.grad((o.float() * go.float()).sum() + lse.sum(), (q, k, v))]

    for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], run(4096), run(0)):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)
