import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from longctx.config import load_config
from longctx.model.layers import RMSNorm, _RMSNormFn
from longctx.model.mixers import layer_mixers
from longctx.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from longctx.model.transformer import DecoderLM, SeqContext, count_params, default_context, flops_per_token


def small_cfg(*ov):
    return load_config("configs/tiny-cpu.yaml", ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                                                 "model.n_layers=2", *ov]).model


def test_rmsnorm_formula_float64():
    torch.manual_seed(0)
    n = RMSNorm(16, eps=1e-6).double()
    n.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_lean_backward_equals_autograd(dtype):
    """RMSNorm's own backward (it keeps only x and 1/rms) against autograd through the formula:
    gradcheck in float64, and equal gradients to autograd's in float32 / bfloat16."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(16, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))
    n = RMSNorm(16, eps=1e-6).to(dtype)
    n.weight.data.uniform_(0.5, 1.5)
    xs = torch.randn(4, 7, 16).to(dtype).requires_grad_()
    dy = torch.randn(4, 7, 16).to(dtype)
    got = torch.autograd.grad(n(xs), (xs, n.weight), dy)
    xr = xs.detach().float().requires_grad_()
    wr = n.weight.detach().float().requires_grad_()
    ref_y = wr.to(dtype).float() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()
    ref = torch.autograd.grad(ref_y, (xr, wr), dy.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rmsnorm_chunks_equal_unchunked(monkeypatch, dtype):
    """`_RMSNormFn` runs over the rows a chunk at a time: with 3-row chunks over 10 rows (the last
    chunk short), forward and both gradients equal the unchunked formula (autograd, float64), and
    in every dtype y and dx are bitwise those of one chunk (dw is summed per chunk: close)."""
    import longctx.model.layers as layers
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64).to(dtype)
    w = (torch.rand(16, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(2, 5, 16, dtype=torch.float64).to(dtype)

    def run(rows):
        monkeypatch.setattr(layers, "_RMSNORM_CHUNK", rows * 16)  # elements per chunk
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _RMSNormFn.apply(xa, wa, 1e-6)
        return (y, *torch.autograd.grad(y, (xa, wa), dy))

    y, dx, dw = run(3)
    y1, dx1, dw1 = run(10)
    assert torch.equal(y, y1) and torch.equal(dx, dx1)
    torch.testing.assert_close(dw, dw1)
    if dtype == torch.float64:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref_y = wr * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
        ref = (ref_y, *torch.autograd.grad(ref_y, (xr, wr), dy))
        for a, b in zip((y, dx, dw), ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        monkeypatch.setattr(layers, "_RMSNORM_CHUNK", 3 * 16)
        assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6),
                                        (x.clone().requires_grad_(), w.clone().requires_grad_()))


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    D = 16
    inv = rope_inv_freq(D, 10000.0).double()
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def score(i, j):
        pos = torch.tensor([[i, j]])
        cos, sin = rope_cos_sin(pos, inv, torch.float64)
        x = torch.stack([q, k])[None, None]  # (1, 1, 2, D)
        r = apply_rope(x, cos, sin)[0, 0]
        return float(r[0] @ r[1])

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
    # position 0 is the identity
    cos, sin = rope_cos_sin(torch.zeros(1, 1, dtype=torch.long), inv, torch.float64)
    torch.testing.assert_close(apply_rope(q[None, None, None], cos, sin)[0, 0, 0], q)


def naive_attention(x, attn, positions, doc_ids=None):
    """Float64 textbook attention with GQA and RoPE, written out with explicit loops over heads."""
    B, L, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, L, H, D)
    k = (x @ attn.k_proj.weight.T).view(B, L, Hkv, D)
    v = (x @ attn.v_proj.weight.T).view(B, L, Hkv, D)
    inv = rope_inv_freq(D, attn.rope_theta).double()
    ang = positions.double()[..., None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # (B, L, D)

    def rot(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos[:, :, None] + torch.cat([-t2, t1], -1) * sin[:, :, None]

    q, k = rot(q), rot(k)
    out = torch.zeros(B, L, H, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hkv)
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / math.sqrt(D)
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, g])
    return out.reshape(B, L, H * D) @ attn.o_proj.weight.T


@pytest.mark.parametrize("docs", [False, True])
def test_softmax_attention_matches_naive_float64(docs):
    torch.manual_seed(1)
    model = DecoderLM(small_cfg()).double()
    attn = model.layers[0].mixer
    B, L = 2, 13
    x = torch.randn(B, L, 64, dtype=torch.float64)
    positions = torch.arange(L).expand(B, L) + torch.tensor([[0], [5]])  # global offsets, as in a shard
    doc_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 2 + [1] * 9 + [2] * 2]) if docs else None
    got = attn(x, SeqContext(positions=positions, doc_ids=doc_ids))
    torch.testing.assert_close(got, naive_attention(x, attn, positions, doc_ids), rtol=1e-10, atol=1e-10)


def test_loss_sum_and_count_match_cross_entropy():
    torch.manual_seed(2)
    model = DecoderLM(small_cfg())
    ids = torch.randint(0, 259, (2, 17))
    labels = ids.roll(-1, 1)
    labels[0, :5] = -100
    loss_sum, n = model(ids, None, labels)
    logits = model(ids)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert int(n) == 2 * 17 - 5
    torch.testing.assert_close(loss_sum, ref)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(3)
    a = DecoderLM(small_cfg())
    b = DecoderLM(small_cfg("model.activation_checkpointing=true"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 259, (2, 16))
    for m in (a, b):
        m.train()
        m(ids, None, ids.roll(-1, 1))[0].backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_tied_embeddings_share_storage_and_count():
    tied = DecoderLM(small_cfg("model.tie_embeddings=true"))
    untied = DecoderLM(small_cfg("model.tie_embeddings=false"))
    assert tied.head is None and tied.head_weight is tied.embed.weight
    V, D = tied.embed.weight.shape
    assert count_params(untied)["total"] - count_params(tied)["total"] == V * D
    assert count_params(untied)["matmul"] == count_params(tied)["matmul"]


def test_mixer_pattern_repeats():
    assert layer_mixers(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    model = DecoderLM(small_cfg("model.n_layers=3", "model.mixers=[softmax]"))
    assert [blk.mixer_name for blk in model.layers] == ["softmax"] * 3


def test_flops_per_token_matches_flop_counter():
    """Our accounting (causal attention = half the square) against torch's counter run on the
    math attention path, which computes the full square: the difference is exactly that half."""
    cfg = small_cfg("model.n_layers=3")
    model = DecoderLM(cfg)
    L = 32
    ids = torch.randint(0, 259, (1, L))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids, default_context(ids), ids)[0].backward()
    full_attn_extra = 3 * cfg.n_layers * 2 * L * cfg.d_model  # the masked half of QK^T and AV, fwd + bwd
    assert fc.get_total_flops() == pytest.approx(flops_per_token(cfg, L) * L + full_attn_extra * L, rel=1e-9)
