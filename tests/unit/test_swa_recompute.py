"""Pieces the million-token configuration relies on: the `swa` mixer (sliding-window softmax
attention) against a dense masked softmax in float64, the flash torch path's key-block search at
a length where the old all-pairs test was the cost, and the Titans memory recomputed piece by
piece (model.memory.recompute) equal to the plain module, carried state included."""
import pytest
import torch

from longctx.config import ConfigError, load_config
from longctx.kernels.flash_torch import _visible_blocks, flash_fwd_torch
from longctx.memory.titans import NeuralMemory
from longctx.model.transformer import DecoderLM, SeqContext


def cfg(*ov):
    return load_config("configs/tiny-cpu.yaml", ["model.d_model=48", "model.n_heads=4", "model.n_kv_heads=2",
                                                 "model.n_layers=2", *ov])


@pytest.mark.parametrize("window", [1, 4, 9, 40])
def test_swa_equals_dense_masked_softmax(window):
    torch.manual_seed(0)
    m = DecoderLM(cfg("model.mixers=[swa]", f"model.swa_window={window}").model).double()
    sw = m.layers[0].mixer
    B, L = 2, 33
    x = torch.randn(B, L, 48, dtype=torch.float64)
    doc = torch.tensor([[0] * 20 + [1] * 13, [0] * 5 + [1] * 28])
    ctx = SeqContext(positions=torch.arange(L).expand(B, L), doc_ids=doc)
    y = sw(x, ctx)
    q, k, v = sw.project(x, ctx)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    i = torch.arange(L)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    allowed = allowed[None] & (doc[:, :, None] == doc[:, None, :])
    s = (q @ k.transpose(-1, -2) / (12 ** 0.5)).masked_fill(~allowed[:, None], float("-inf"))
    torch.testing.assert_close(y, sw.merge(torch.softmax(s, -1) @ v), rtol=1e-12, atol=1e-12)


def test_visible_blocks_search_matches_all_pairs():
    """The bisection over ordered key blocks gives the blocks the pairwise test gives (causal,
    window, both sides; shifted and unordered key positions)."""
    from longctx.kernels.flash_torch import _blocks, _visible
    g = torch.Generator().manual_seed(0)
    cases = [(torch.arange(1000), torch.arange(1000)), (torch.arange(500, 1500), torch.arange(-37, 1463)),
             (torch.arange(300), torch.randperm(700, generator=g))]
    for qp, kp in cases:
        for causal in (True, False):
            for window in (None, 1, 100, 257, 5000):
                got = _visible_blocks(qp, kp, len(qp), len(kp), 64, causal, window)
                for (qs, qe), kbs in got:
                    want = [(ks, ke) for ks, ke in _blocks(len(kp), 64)
                            if _visible(qp[qs:qe], kp[ks:ke], causal, window)]
                    assert kbs == want, (qs, causal, window)


def test_flash_window_long_sequence_visits_window_only():
    """64K query positions against 64K keys with a window of 256: a few blocks per query block
    (the previous all-pairs scan made 65K Python tests per call here)."""
    T = 1 << 16
    pos = torch.arange(T)
    vis = _visible_blocks(pos, pos, T, T, 256, True, 256)
    assert len(vis) == 256 and all(len(kbs) <= 2 for _, kbs in vis)
    q = torch.randn(1, 1, 600, 8, dtype=torch.float64)
    o, _ = flash_fwd_torch(q, q, q, True, 1.0, 50, torch.arange(600), torch.arange(600), None, None, 64)
    s = (q @ q.transpose(-1, -2))[0, 0]
    i = torch.arange(600)
    s = s.masked_fill(~((i[None] <= i[:, None]) & (i[:, None] - i[None] < 50)), float("-inf"))
    torch.testing.assert_close(o[0, 0], torch.softmax(s, -1) @ q[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_recompute_equals_plain(depth):
    torch.manual_seed(0)
    a = NeuralMemory(8, heads=2, depth=depth, chunk=4, max_lr=0.1, expansion=2).double()
    b = NeuralMemory(8, heads=2, depth=depth, chunk=4, max_lr=0.1, expansion=2, recompute=8).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 37, 8, dtype=torch.float64)
    outs = []
    for m in (a, b):
        xx = x.clone().requires_grad_()
        y1, st = m(xx[:, :6])  # ends inside a chunk: the second call starts mid-chunk
        y2, st2 = m(xx[:, 6:], st)
        ((y1 ** 2).sum() + (y2 ** 3).sum() + st2["mem"].weights[0].sum() + st2["conv"].sum()).backward()
        outs.append([y2.detach(), st2["mem"].weights[0].detach(), xx.grad] + [p.grad.clone() for p in m.parameters()])
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # without gradients the module runs in one piece
        torch.testing.assert_close(b(x)[0], a(x)[0])


def test_memory_recompute_block_not_checkpointed_again():
    c = cfg("model.mixers=[memory,lightning]", "model.memory.recompute=64", "model.activation_checkpointing=true")
    m = DecoderLM(c.model)
    assert [l.checkpointed for l in m.layers] == [False, True]


@pytest.mark.parametrize("ov, msg", [
    (["model.memory.recompute=100"], r"model\.memory\.recompute=100 must be 0 \(off\) or a positive multiple"),
    (["model.swa_window=0"], r"model\.swa_window=0 must be >= 1"),
    (["model.mixers=[swa]", "model.swa_window=40", "parallel.sp=2", "data.seq_len=64"],
     r"each rank's 32 tokens are fewer than model\.swa_window - 1 = 39"),
    (["model.mixers=[memory]", "parallel.sp=2", "model.activation_checkpointing=true", "model.memory.chunk=8"],
     r"set model\.memory\.recompute"),
])
def test_config_errors(ov, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(*ov)


def test_sp_memory_with_recompute_and_checkpointing_accepted():
    c = cfg("model.mixers=[memory,swa,lightning]", "parallel.sp=2", "model.activation_checkpointing=true",
            "model.memory.chunk=8", "model.memory.recompute=16", "data.seq_len=64", "model.swa_window=16")
    assert c.model.memory.recompute == 16
