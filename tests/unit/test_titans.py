"""Titans neural memory: the chunk-parallel scan against the float64 token loop (the
specification), gradients, carried state, the four mixers, divergence and config checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from longctx.config import ConfigError, load_config
from longctx.memory.titans import Gates, MemoryDiverged, MemoryState, NeuralMemory, memory_apply, memory_scan
from longctx.memory.titans_ref import memory_scan_ref
from longctx.model.transformer import DecoderLM, SeqContext

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: a second intra-op thread only waits on a shared 2-core machine (seconds of
    spinning per test under load); restored afterwards for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(B=2, H=2, L=11, d=4, depth=1, seed=0, theta_max=0.4):
    """Random normalised q/k, values, gates in range and a random start state (not zero, so
    the carried momentum and weights are exercised)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=D64)  # noqa: E731
    q, k = F.normalize(r(B, H, L, d), dim=-1), F.normalize(r(B, H, L, d), dim=-1)
    v = r(B, H, L, d)
    eta, alpha, theta = 0.05 + 0.9 * u(B, H, L), 0.3 * u(B, H, L), theta_max * u(B, H, L)
    if depth == 1:
        W = (0.3 * r(B, H, d, d),)
    else:
        W = (0.5 * r(B, H, d, 2 * d), 0.3 * r(B, H, 2 * d, d))
    S = tuple(0.1 * r(*w.shape) for w in W)
    return q, k, v, eta, theta, alpha, W, S


def gates(eta, theta, alpha):
    return Gates(eta.log(), theta, torch.log1p(-alpha))


def sl(t, a, b):
    return t[:, :, a:b]


def assert_state(st, W, S):
    for x, y in zip(st.weights, W):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for x, y in zip(st.momentum, S):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_1_equals_token_loop(depth):
    q, k, v, eta, theta, alpha, W, S = inputs(depth=depth)
    y_ref, W_ref, S_ref = memory_scan_ref(q, k, v, eta, theta, alpha, W, S, chunk=1)
    y, st = memory_scan(q, k, v, gates(eta, theta, alpha), MemoryState(W, S), chunk=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert_state(st, W_ref, S_ref)
    assert st.offset == 0 and st.grad_weights is None


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_chunk_b_equals_minibatch_definition(depth, chunk):
    """L = 11 is not a multiple of 3 or 4, and 16 > L (one partial chunk)."""
    q, k, v, eta, theta, alpha, W, S = inputs(depth=depth, seed=1)
    y_ref, W_ref, S_ref = memory_scan_ref(q, k, v, eta, theta, alpha, W, S, chunk=chunk)
    y, st = memory_scan(q, k, v, gates(eta, theta, alpha), MemoryState(W, S), chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert_state(st, W_ref, S_ref)
    assert st.offset == 11 % chunk
    # the mini-batch definition is a different function from the sequential one: the test above
    # would not notice gradients taken at the wrong weights if the two coincided
    y1, _, _ = memory_scan_ref(q, k, v, eta, theta, alpha, W, S, chunk=1)
    assert (y_ref - y1).abs().max() > 1e-3


@pytest.mark.parametrize("depth", [1, 2])
def test_gradcheck_through_the_scan(depth):
    q, k, v, eta, theta, alpha, W, S = inputs(B=1, H=1, L=5, d=3, depth=depth, seed=2)
    le, lk = eta.log(), torch.log1p(-alpha)
    args = [t.clone().requires_grad_(True) for t in (q, k, v, le, theta, lk, *W, *S)]
    nW = len(W)

    def f(q, k, v, le, th, lk, *ws):
        y, st = memory_scan(q, k, v, Gates(le, th, lk), MemoryState(tuple(ws[:nW]), tuple(ws[nW:])), chunk=2)
        return y, *st.weights, *st.momentum

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_module_inputs_and_gate_projections():
    """Through NeuralMemory: w.r.t. the input x and the η/θ/α projection (weights and biases)."""
    torch.manual_seed(3)
    mem = NeuralMemory(8, heads=2, depth=2, chunk=2, max_lr=0.4, expansion=2).double()
    x = torch.randn(1, 5, 8, dtype=D64, requires_grad=True)
    w = mem.gate_proj.weight.detach().clone().requires_grad_(True)
    b = mem.gate_bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        y, _ = torch.func.functional_call(mem, {"gate_proj.weight": w, "gate_bias": b}, (x,))
        return y

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_state_handoff_any_split_equals_one_run(depth):
    """memory_scan(x[:a]) then memory_scan(x[a:], state) == memory_scan(x), splits inside and
    on chunk boundaries and several pieces; the one long run is the reference itself."""
    q, k, v, eta, theta, alpha, W, S = inputs(depth=depth, L=13, seed=4)
    y_ref, W_ref, S_ref = memory_scan_ref(q, k, v, eta, theta, alpha, W, S, chunk=4)
    g = gates(eta, theta, alpha)
    for cuts in ([3], [4], [8], [1, 2, 3, 9], [5, 6, 7, 12]):
        st, ys = MemoryState(W, S), []
        for a, b in zip([0] + cuts, cuts + [13]):
            y, st = memory_scan(sl(q, a, b), sl(k, a, b), sl(v, a, b), Gates(*(t[..., a:b] for t in g)), st, 4)
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 2), y_ref, rtol=1e-12, atol=1e-12)
        assert_state(st, W_ref, S_ref)


def model_cfg(*ov):
    return load_config("configs/tiny-cpu.yaml", [
        "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2", "model.memory.chunk=4",
        "model.memory.segment=8", "model.memory.window=5", "model.memory.n_persistent=2", *ov]).model


def ctx_at(a, b, B=2, state=None):
    return SeqContext(positions=torch.arange(a, b).expand(B, b - a), state={} if state is None else state, carry=True)


@pytest.mark.parametrize("mixer,split", [("memory", 14), ("mag", 13), ("mal", 14), ("mac", 16)])
def test_streaming_with_carried_state_equals_one_pass(mixer, split):
    """Two segments with ctx.carry == one pass (mac: split on a segment boundary)."""
    torch.manual_seed(5)
    model = DecoderLM(model_cfg(f"model.mixers=[{mixer}]")).double()
    ids = torch.randint(0, 259, (2, 27))
    full = model(ids)
    c1 = ctx_at(0, split)
    a = model(ids[:, :split], c1)
    b = model(ids[:, split:], ctx_at(split, 27, state=c1.state))
    assert set(c1.state) == {f"{mixer}.0", f"{mixer}.1"}
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", ["memory", "mag", "mal", "mac"])
@pytest.mark.parametrize("depth", [1, 2])
def test_mixer_trains_and_is_causal(mixer, depth):
    torch.manual_seed(6)
    model = DecoderLM(model_cfg(f"model.mixers=[{mixer}]", f"model.memory.depth={depth}")).double()
    ids = torch.randint(0, 259, (2, 21))
    out = model(ids)
    ids2 = ids.clone()
    ids2[:, 13] = (ids2[:, 13] + 1) % 259
    out2 = model(ids2)
    torch.testing.assert_close(out2[:, :13], out[:, :13], rtol=0, atol=0)  # the past never sees the future
    assert (out2[:, 13:] - out[:, 13:]).abs().max() > 1e-6  # and the change does reach later tokens
    loss, n = model(ids, None, ids.roll(-1, 1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def mixer_and_input(mixer, *ov, L=12):
    torch.manual_seed(7)
    m = DecoderLM(model_cfg(f"model.mixers=[{mixer}]", *ov)).double().layers[0].mixer
    x = torch.randn(2, L, 32, dtype=D64)
    return m, x, SeqContext(positions=torch.arange(L).expand(2, L))


def gqa_values(attn, x):
    """Window-1 attention returns each token's own value, repeated over the query heads of its group."""
    B, L, _ = x.shape
    v = attn.v_proj(x).view(B, L, attn.n_kv, attn.head_dim)
    return v.repeat_interleave(attn.n_heads // attn.n_kv, dim=2).reshape(B, L, -1)


def test_mag_window_1_is_the_gated_value():
    m, x, ctx = mixer_and_input("mag", "model.memory.window=1")
    mem, _ = m.mem(x)
    expected = m.o_proj(m.attn_norm(gqa_values(m.attn, x)) * torch.sigmoid(m.mem_norm(mem)))
    torch.testing.assert_close(m(x, ctx), expected, rtol=1e-12, atol=1e-12)


def test_mal_window_1_is_the_value_of_the_memory_output():
    m, x, ctx = mixer_and_input("mal", "model.memory.window=1")
    mem, _ = m.mem(x)
    torch.testing.assert_close(m(x, ctx), m.o_proj(gqa_values(m.attn, mem)), rtol=1e-12, atol=1e-12)


def test_mac_one_segment_matches_explicit_masked_attention():
    """One segment, naive softmax over [persistent ‖ h ‖ x] with the mask written out: x_i sees
    every persistent token, h_j and x_j for j <= i; RoPE positions 0 (persistent), j (h_j, x_j)."""
    m, x, ctx = mixer_and_input("mac", "model.memory.segment=16", L=12)
    at, B, L, Np = m.attn, 2, 12, 2
    h = m.mem.read(x, m.mem.initial_state(B, D64))[0]
    seq = torch.cat([m.persistent.expand(B, Np, 32), h, x], 1)
    rope_pos = torch.cat([torch.zeros(Np, dtype=torch.long), torch.arange(L), torch.arange(L)])
    cq, sq = at.rope(torch.arange(L), D64)
    ck, sk = at.rope(rope_pos, D64)
    from longctx.model.rope import apply_rope
    q = apply_rope(at.heads(at.q_proj(x), 4), cq, sq)
    k = apply_rope(at.heads(at.k_proj(seq), 2), ck, sk).repeat_interleave(2, 1)
    v = at.heads(at.v_proj(seq), 2).repeat_interleave(2, 1)
    i = torch.arange(L)[:, None]
    j = torch.cat([torch.full((Np,), -1), torch.arange(L), torch.arange(L)])[None]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(at.head_dim)
    p = s.masked_fill(j > i, float("-inf")).softmax(-1)
    y = m.attn_out((p @ v).transpose(1, 2).reshape(B, L, 32))
    r, _ = m.mem(y)
    expected = m.o_proj(m.y_norm(y) * torch.sigmoid(m.r_norm(r)))
    torch.testing.assert_close(m(x, ctx), expected, rtol=1e-10, atol=1e-10)


def test_matrix_memory_reads_its_own_write():
    """Depth 1, θ = 1/2, no momentum or forgetting, zero start: one write stores v exactly
    (W = k^T v for unit k), and y_t = M_t(q_t) reads the weights after token t's own update."""
    d = 4
    k = F.normalize(torch.randn(1, 1, 1, d, dtype=D64), dim=-1)
    v = torch.randn(1, 1, 1, d, dtype=D64)
    z = torch.zeros(1, 1, 1, dtype=D64)
    W0 = (torch.zeros(1, 1, d, d, dtype=D64),)
    y, st = memory_scan(k, k, v, Gates(torch.full_like(z, -1e9), z + 0.5, z), MemoryState(W0, W0), chunk=1)
    torch.testing.assert_close(y, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(memory_apply(st.weights, k), v, rtol=1e-12, atol=1e-12)


def test_divergence_raises_a_clear_error():
    q, k, v, eta, theta, alpha, W, S = inputs(L=40, seed=8)
    with pytest.raises(MemoryDiverged, match=r"chunk \d+ .*max_state_norm=10000.*lower"):
        memory_scan(q, k, v, gates(eta, theta * 20, alpha), MemoryState(W, S), chunk=4)
    torch.manual_seed(9)
    model = DecoderLM(model_cfg("model.mixers=[memory]", "model.memory.max_lr=50")).double()
    with pytest.raises(MemoryDiverged, match=r"memory mixer \(layer 0\).*model\.memory\.max_lr=50"):
        model(torch.randint(0, 259, (1, 64)))


@pytest.mark.parametrize("override,message", [
    ("model.memory.depth=3", "model.memory.depth=3 is not supported"),
    ("model.memory.chunk=0", "model.memory.chunk=0 must be >= 1"),
    ("model.memory.segment=10", "model.memory.segment=10 is not a multiple of model.memory.chunk=4"),
    ("model.memory.heads=3", "model.memory.heads=3 does not divide model.d_model=32"),
    ("model.memory.max_lr=0", "model.memory.max_lr=0.0 must be > 0"),
    ("model.memory.n_persistent=-1", "model.memory.n_persistent=-1 must be >= 0"),
    ("model.memory.dpeth=2", "did you mean 'model.memory.depth'"),
])
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        model_cfg(override)


@pytest.mark.parametrize("ext_shape, w_shape", [((2, 9, 6), (6, 4)), ((2, 3, 7, 6), (3, 1, 6, 4)), ((1, 5, 3), (3, 1))])
def test_causal_conv_formula_and_gradcheck(ext_shape, w_shape):
    """The depthwise causal conv (one buffer, taps in place, own backward) equals the sum of
    shifted products, and its gradients match finite differences (float64)."""
    from longctx.memory.titans import causal_conv
    g = torch.Generator().manual_seed(0)
    ext = torch.randn(*ext_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    K = w_shape[-1]
    L = ext_shape[-2] - (K - 1)
    ref = sum(ext[..., j:j + L, :] * w[..., j] for j in range(K))
    assert torch.allclose(causal_conv(ext, w, L), ref, atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(lambda e, w: causal_conv(e, w, L), (ext, w))
