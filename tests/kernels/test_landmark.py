"""Landmark grouped softmax: the tiled torch path against a direct transcription of the paper's
formula (float64), forward and every gradient; GQA; lengths that end mid-group; tiles that hold
several groups or fewer than one; bad input."""
import pytest
import torch

from longctx.kernels.landmark_torch import landmark_attn, landmark_dense_reference, landmark_mask


@pytest.mark.parametrize("T, block, tile, H, Hkv", [
    (23, 3, 8, 2, 1),     # ends mid-group; tiles of 2 groups
    (40, 4, 10, 4, 2),    # GQA, tiles of 2 groups of 5
    (17, 16, 8, 2, 2),    # a tile smaller than a group: one group per tile
    (31, 2, 256, 2, 1),   # everything in one tile
    (23, 3, 6, 2, 1),     # tiles start mid-group with earlier groups before them
    (14, 3, 1, 4, 2),     # one query row per tile, GQA
    (12, 1, 4, 1, 1),     # one regular token per landmark
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_paper_formula(T, block, tile, H, Hkv, backend):
    g = torch.Generator().manual_seed(T * 7 + block)
    q = torch.randn(2, H, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = landmark_dense_reference(q, k, v, block, 0.4)
    o = landmark_attn(q, k, v, block, 0.4, tile, backend=backend)
    assert torch.allclose(o, ref, atol=1e-12, rtol=0)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64)
    for a, b, name in zip(torch.autograd.grad((ref * go).sum(), (q, k, v)),
                          torch.autograd.grad((o * go).sum(), (q, k, v)), "qkv"):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), name


def test_landmarks_carry_no_value_and_retrieval_follows_the_landmark():
    """A landmark's value never reaches an output; a query that matches a block's landmark
    strongly reads that block (through its within-block softmax), not the others."""
    T, block = 16, 3
    q = torch.zeros(1, 1, T, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, T, 2, dtype=torch.float64)
    v = torch.randn(1, 1, T, 1, dtype=torch.float64)
    lm = landmark_mask(T, block)
    v2 = v.clone()
    v2[:, :, lm] += 100.0
    assert torch.allclose(landmark_attn(q, k, v, block), landmark_attn(q, k, v2, block))
    k[0, 0, 3] = torch.tensor([30.0, 0.0])  # landmark of group 0 (positions 0-2)
    q[0, 0, 15] = torch.tensor([1.0, 0.0])  # a query in group 3
    o = landmark_attn(q, k, v, block, scale=1.0)
    assert torch.allclose(o[0, 0, 15], v[0, 0, 0:3].mean(0), atol=1e-9)


def test_bad_input():
    x = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="block=0"):
        landmark_attn(x, x, x, 0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        landmark_attn(x, x[:, :, :5], x[:, :, :5], 3)


@pytest.mark.parametrize("T, block, tile, H, Hkv, dtype", [
    (528, 32, None, 4, 4, torch.float32),  # the passkey benchmark's training shape (batch 2 here)
    (300, 32, 64, 4, 2, torch.float32),    # ends mid-group, GQA, tiles start mid-group
    (77, 7, 20, 2, 1, torch.float64),
])
def test_cpu_helper_matches_torch_path(T, block, tile, H, Hkv, dtype):
    """The C helper's weights and gradients against the torch path (the specification) at
    training-like shapes: float32 within its rounding (the C exp is ~1 ulp), float64 to 1e-12."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, H, T, 32, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, Hkv, T, 32, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, Hkv, T, 16, generator=g, dtype=dtype, requires_grad=True)
    go = torch.randn(2, H, T, 16, generator=g, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    outs = {}
    for be in ("torch", "cpu"):
        o = landmark_attn(q, k, v, block, tile=tile, backend=be)
        outs[be] = (o,) + torch.autograd.grad((o * go).sum(), (q, k, v))
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs["torch"], outs["cpu"]):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (name, (a - b).abs().max().item())


def test_cpu_backend_bad_input_and_unavailable_helper(monkeypatch):
    """backend='cpu' names what it supports; 'auto' without the helper warns once and runs the
    torch path (same results)."""
    import longctx.kernels.landmark_cpu as lc
    import longctx.kernels.landmark_torch as lt
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="float32 / float64 CPU tensors"):
        landmark_attn(x.bfloat16(), x.bfloat16(), x.bfloat16(), 3, backend="cpu")
    with pytest.raises(ValueError, match="backend='gpu': use 'auto', 'torch', 'cpu' or 'triton'"):
        landmark_attn(x, x, x, 3, backend="gpu")
    monkeypatch.setattr(lc, "available", lambda: (False, "landmark CPU helper unavailable: no C compiler found"))
    monkeypatch.setattr(lt, "_warned", [])
    with pytest.warns(UserWarning, match="no C compiler found"):
        o = landmark_attn(x, x, x, 3)
    assert torch.equal(o, landmark_attn(x, x, x, 3, backend="torch"))
    with pytest.raises(ValueError, match="no C compiler found"):
        landmark_attn(x, x, x, 3, backend="cpu")
