import pytest
import torch

from longctx.config import load_config
from longctx.model.lightning import alibi_slopes, tnl_decay
from longctx.model.transformer import DecoderLM, SeqContext


def cfg(*ov):
    return load_config("configs/tiny-cpu.yaml", ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                                                 "model.n_layers=3", *ov]).model


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    s6 = alibi_slopes(6)  # not a power of two: the 4-head slopes, then every other 8-head slope
    torch.testing.assert_close(s6, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    # TNL's depth scaling: the first layer keeps the slopes, the last barely decays
    torch.testing.assert_close(tnl_decay(8, 0, 4), alibi_slopes(8) * (1 + 1e-5))
    assert float(tnl_decay(8, 3, 4).max()) < 1e-5


def test_streaming_with_carried_state_equals_one_pass():
    torch.manual_seed(0)
    model = DecoderLM(cfg("model.mixers=[lightning]")).double()
    ids = torch.randint(0, 259, (2, 50))
    full = model(ids)
    ctx1 = SeqContext(positions=torch.arange(20).expand(2, 20), carry=True)
    a = model(ids[:, :20], ctx1)
    ctx2 = SeqContext(positions=torch.arange(20, 50).expand(2, 30), state=ctx1.state, carry=True)
    b = model(ids[:, 20:], ctx2)
    assert set(ctx1.state) == {f"lightning.{i}" for i in range(3)}
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)


def test_hybrid_pattern_and_document_isolation():
    torch.manual_seed(1)
    model = DecoderLM(cfg("model.mixers=[lightning,lightning,softmax]")).double()
    assert [b.mixer_name for b in model.layers] == ["lightning", "lightning", "softmax"]
    ids = torch.randint(0, 259, (1, 40))
    doc_ids = torch.tensor([[0] * 15 + [1] * 25])
    ctx = lambda: SeqContext(positions=torch.arange(40)[None], doc_ids=doc_ids)  # noqa: E731
    out = model(ids, ctx())
    ids2 = ids.clone()
    ids2[0, :15] = (ids2[0, :15] + 7) % 259
    out2 = model(ids2, ctx())
    torch.testing.assert_close(out[:, 15:], out2[:, 15:], rtol=0, atol=1e-12)  # document 1 never sees document 0
    loss, n = model(ids, ctx(), ids.roll(-1, 1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sp_hybrid_lightning_softmax_accepted():
    # softmax layers run Ulysses / ring under SP since issue 4; lightning keeps the contiguous layout
    from longctx.config import sp_layout
    c = load_config("configs/tiny-cpu.yaml", ["parallel.sp=2", "model.mixers=[lightning,softmax]"])
    assert c.parallel.sp == 2 and sp_layout(c) == "contiguous"


def test_flops_per_token_counts_lightning_layers():
    """6 x the model's matmul parameters (q, k, v, gate, out per lightning layer, MLPs, head)
    plus 3 x the kernel's forward mixing FLOPs; a hybrid adds softmax's causal term."""
    from longctx.model.lightning import LightningAttention
    from longctx.model.transformer import count_params, flops_per_token, softmax_fwd_flops
    c = cfg("model.mixers=[lightning]")
    L = 64
    mixing = 3 * c.n_layers * LightningAttention.mixer_fwd_flops(c, L)[1]
    assert flops_per_token(c, L) == 6 * count_params(DecoderLM(c))["matmul"] + mixing
    h = cfg("model.mixers=[lightning,lightning,softmax]")
    expected = 6 * count_params(DecoderLM(h))["matmul"] + 3 * (2 * LightningAttention.mixer_fwd_flops(h, L)[1]
                                                                + softmax_fwd_flops(h, L)[1])
    assert flops_per_token(h, L) == expected
