"""The memory-lean step: tiled MLP, fused chunked loss in the model, offloaded checkpoints, and
peak memory linear in length (model.loss_chunk, model.mlp_tile, model.offload_activations)."""
import pytest
import torch
import torch.nn.functional as F

import longctx.model.transformer as tr
from longctx.config import ConfigError, load_config
from longctx.model.layers import SwiGLU
from longctx.model.transformer import DecoderLM
from longctx.train.metrics import peak_tensor_bytes

LEAN = ["model.loss_chunk=64", "model.mlp_tile=64", "model.activation_checkpointing=true",
        "model.offload_activations=true"]


def small_cfg(*ov):
    return load_config("configs/tiny-cpu.yaml", ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                                                 "model.n_layers=2", *ov]).model


def mlp_pair(D, H, tile, dtype):
    torch.manual_seed(0)
    plain, tiled = SwiGLU(D, H), SwiGLU(D, H, tile=tile)
    tiled.load_state_dict(plain.state_dict())
    return plain.to(dtype), tiled.to(dtype)


def fwd_bwd(mlp, x, dy):
    x = x.clone().requires_grad_()
    y = mlp(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("tile", [1, 5, 16, 47])
def test_tiled_mlp_float64_exact(tile):
    # B * L = 2 * 23 = 46 rows: no tile above divides it; 47 >= 46 takes the plain path
    plain, tiled = mlp_pair(12, 20, tile, torch.float64)
    x, dy = torch.randn(2, 23, 12, dtype=torch.float64), torch.randn(2, 23, 12, dtype=torch.float64)
    for name, r, g in zip(["y", "dx", "dWgate", "dWup", "dWdown"], fwd_bwd(plain, x, dy), fwd_bwd(tiled, x, dy)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)
    assert tiled._z3_leaf  # ZeRO-3 gathers the three weights on the SwiGLU's own forward
    with torch.no_grad():  # inference runs the tiles too
        torch.testing.assert_close(tiled(x), plain(x), rtol=1e-12, atol=1e-12)


def test_tiled_mlp_bf16_close_to_plain():
    plain, tiled = mlp_pair(32, 96, 40, torch.bfloat16)
    x, dy = torch.randn(3, 50, 32).bfloat16(), torch.randn(3, 50, 32).bfloat16()
    ref, got = fwd_bwd(plain, x, dy), fwd_bwd(tiled, x, dy)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)  # same matmuls row by row
    for r, g in zip(ref[1:], got[1:]):
        assert g.dtype == torch.bfloat16
        assert float((g.float() - r.float()).abs().max() / r.float().abs().max()) < 1e-2


def test_tiled_mlp_saves_only_its_input():
    _, tiled = mlp_pair(16, 64, 8, torch.float32)
    x = torch.randn(100, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tiled(x)
    act = [t for t in saved if not isinstance(t, torch.nn.Parameter)]
    assert sum(t.numel() for t in act) == 100 * 16  # x only: no (100, 64) intermediate


def grads_of(model, ids, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, n = model(ids, None, labels)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_lean_model_float64_equals_plain(tied):
    torch.manual_seed(1)
    t = f"model.tie_embeddings={str(tied).lower()}"
    plain = DecoderLM(small_cfg(t)).double()
    lean = DecoderLM(small_cfg(t, "model.loss_chunk=7", "model.mlp_tile=9")).double()
    lean.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 259, (2, 30))
    labels = ids.roll(-1, 1)
    labels[0, 3:20] = -100  # spans whole ignored chunks
    ref, got = grads_of(plain, ids, labels), grads_of(lean, ids, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    assert int(got[1]) == int(ref[1]) == 60 - 17
    assert ("head.weight" in got[2]) != tied
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-10, atol=1e-12, msg=k)
    with torch.no_grad():  # logits without labels are unchanged by the lean settings
        torch.testing.assert_close(lean(ids), plain(ids))


def test_offloaded_checkpoints_same_gradients_and_path(monkeypatch):
    torch.manual_seed(3)
    models = [DecoderLM(small_cfg(*ov)) for ov in
              ([], ["model.activation_checkpointing=true"],
               ["model.activation_checkpointing=true", "model.offload_activations=true"])]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    calls = []
    real = tr.offload_to_host
    monkeypatch.setattr(tr, "offload_to_host", lambda x: calls.append(x.shape) or real(x))
    ids = torch.randint(0, 259, (2, 16))
    ref, ck, off = (grads_of(m, ids, ids.roll(-1, 1)) for m in models)
    assert len(calls) == 2  # one host copy per block, only with offload on
    for k in ref[2]:
        torch.testing.assert_close(ck[2][k], ref[2][k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(off[2][k], ck[2][k], rtol=0, atol=0, msg=k)  # CPU: identical path
    x = torch.randn(3, 4, requires_grad=True)
    h = real(x)
    assert h.device.type == "cpu" and h.grad_fn is not None
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))


@pytest.mark.parametrize("ov,msg", [
    ("model.loss_chunk=-1", r"model\.loss_chunk=-1 must be >= 0: 0 for the plain path"),
    ("model.mlp_tile=-8", r"model\.mlp_tile=-8 must be >= 0"),
    ("model.offload_activations=true", r"model\.offload_activations=true needs model\.activation_checkpointing=true"),
])
def test_config_errors(ov, msg):
    with pytest.raises(ConfigError, match=msg):
        small_cfg(ov)


def step_peak(model, L):
    torch.manual_seed(L)
    ids = torch.randint(0, 259, (1, L))
    model.train()
    model.zero_grad(set_to_none=True)
    return peak_tensor_bytes(lambda: model(ids, None, ids.roll(-1, 1))[0].backward())[1]


def test_peak_memory_linear_in_length_and_below_plain():
    """Peak tensor bytes of forward + backward (torch's CPU allocator, profiler events) at three
    lengths: with the lean settings the increments per token agree within 2% and stay within the
    documented bytes/token (docs/training.md); the plain path costs several times more per token.

    The peak is the largest of a few phases, each a + b L: up to ~4K tokens it falls inside SDPA's
    backward (b = 3228 here since RMSNorm keeps only x and 1/rms; 3484 before); from 8K to 12K the
    slope is 3228 too: the documented 4·D·(n_layers + 10.5) + 32 = 3232 (docs/training.md)."""
    ov = ["model.max_seq_len=4096", "model.vocab_size=512"]
    torch.manual_seed(0)
    lean = DecoderLM(small_cfg(*ov, *LEAN))
    Ls = (1024, 2048, 3072)
    peaks = [step_peak(lean, L) for L in Ls]
    per_tok = [(b - a) / (Lb - La) for a, b, La, Lb in zip(peaks, peaks[1:], Ls, Ls[1:])]
    assert abs(per_tok[1] / per_tok[0] - 1) < 0.02, per_tok
    D, n_layers = 64, 2
    documented = 4 * D * (n_layers + 10.5) + 32  # fp32, softmax mixer (docs/training.md)
    assert 0.9 * documented < per_tok[1] < 1.01 * documented, (per_tok, documented)
    plain = DecoderLM(small_cfg(*ov))
    plain_per_tok = (step_peak(plain, 2048) - step_peak(plain, 1024)) / 1024
    assert per_tok[1] < plain_per_tok / 4, (per_tok, plain_per_tok)
