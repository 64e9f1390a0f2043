"""linear_cross_entropy against the plain F.cross_entropy(h @ W.T): loss and both gradients."""
import pytest
import torch
import torch.nn.functional as F

from longctx.kernels.linear_ce import linear_cross_entropy


def plain(h, w, y):
    logits = h @ w.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


def case(N, D, V, dtype, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    for a, b in ignore:
        y[a:b] = -100
    return h, w, y


def grads(fn, h, w, y, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(h, w, y)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_float64_loss_and_gradients(chunk):
    # N = 45 is not a multiple of any chunk above; rows 16..31 are one fully ignored chunk at 16
    h, w, y = case(45, 12, 37, torch.float64, ignore=[(16, 32), (40, 41)])
    ref = grads(plain, h, w, y, scale=0.37)
    got = grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk), h, w, y, scale=0.37)
    for r, g_ in zip(ref, got):
        torch.testing.assert_close(g_, r, rtol=1e-12, atol=1e-12)
    assert int(linear_cross_entropy(h, w, y, chunk)[1]) == 45 - 17
    assert got[1][16:32].abs().max() == 0  # ignored rows get exactly zero gradient


def test_all_ignored_and_batched_shapes():
    h, w, y = case(20, 8, 11, torch.float64, ignore=[(0, 20)])
    loss, gh, gw = grads(lambda h, w, y: linear_cross_entropy(h, w, y, 6), h, w, y)
    assert float(loss) == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0
    assert int(linear_cross_entropy(h, w, y, 6)[1]) == 0
    # (B, L, D) / (B, L) accepted, same as flattened
    h, w, y = case(24, 8, 11, torch.float64, ignore=[(3, 5)])
    a = grads(lambda h, w, y: linear_cross_entropy(h.view(2, 12, 8), w, y.view(2, 12), 5), h, w, y)
    b = grads(plain, h, w, y)
    for r, g_ in zip(b, a):
        torch.testing.assert_close(g_, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_matches_plain_path(dtype, tol):
    # Both paths take the matmuls in `dtype` and the softmax in fp32; compare to the plain path
    # (same precision) and, for the loss, to the float64 truth. Measured (max error / max |ref|):
    # fp32 <= 2.5e-7; bf16 loss and dh identical to the plain path, dW 4.1e-3 from it (each chunk's
    # dW is rounded to bf16 once before the fp32 sum; the plain path's own dW is 2.3e-3 from fp64).
    h, w, y = case(300, 32, 257, dtype, seed=1, ignore=[(50, 90)])
    ref = grads(plain, h, w, y)
    got = grads(lambda h, w, y: linear_cross_entropy(h, w, y, 64), h, w, y)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=0)
    for r, g_ in zip(ref[1:], got[1:]):
        err = (g_.double() - r.double()).abs().max() / r.double().abs().max()
        assert err < tol, (dtype, float(err))
    truth = plain(h.double(), w.double(), y)
    assert abs(float(got[0]) - float(truth)) / float(truth) < tol


def test_no_grad_and_frozen_weight():
    h, w, y = case(33, 8, 13, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, 10)[0], plain(h, w, y), rtol=1e-12, atol=1e-12)
    hg = h.clone().requires_grad_()
    linear_cross_entropy(hg, w, y, 10)[0].backward()  # weight without grad: only dh is formed
    href = h.clone().requires_grad_()
    plain(href, w, y).backward()
    torch.testing.assert_close(hg.grad, href.grad, rtol=1e-12, atol=1e-12)


def test_no_gradient_work_without_grad_mode():
    """Under no_grad (an evaluation loss) the dh / dW buffers are not formed even when the
    inputs require grad (autograd's needs_input_grad does not see grad mode)."""
    from longctx.train.metrics import peak_tensor_bytes
    N, D, V = 4096, 64, 50
    h, w, y = case(N, D, V, torch.float32)
    h.requires_grad_(), w.requires_grad_()
    with torch.no_grad():
        loss, peak = peak_tensor_bytes(lambda: linear_cross_entropy(h, w, y, 64)[0])
    torch.testing.assert_close(loss, plain(h.detach(), w.detach(), y), rtol=1e-5, atol=1e-4)
    assert peak < N * D * 4 / 8, peak  # a dh buffer alone would be N * D * 4 bytes


def test_bad_inputs_are_named():
    h, w, y = case(10, 8, 13, torch.float32)
    with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
        linear_cross_entropy(h, w, y, 0)
    with pytest.raises(ValueError, match=r"need \(V, 8\)"):
        linear_cross_entropy(h, w[:, :4], y, 4)
    y[3] = 13
    with pytest.raises(ValueError, match=r"label 13 is outside the vocabulary \[0, 13\)"):
        linear_cross_entropy(h, w, y, 4)


def test_saved_state_is_one_row_per_token():
    """What autograd keeps for backward: the (N, D) dh and the (V, D) dW, never (N, V)."""
    N, D, V = 512, 16, 300
    h, w, y = case(N, D, V, torch.float32)
    h.requires_grad_(), w.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        linear_cross_entropy(h, w, y, 64)
    assert sum(saved) == (N * D + V * D) * 4
