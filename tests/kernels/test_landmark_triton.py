"""The fused Triton landmark kernel against the torch path (the specification): out, lse and every
gradient, directly and through `landmark_attn`'s autograd; GQA; lengths that end mid-group; query
tiles that straddle groups; bf16; bad input. Runs on CPU tensors under TRITON_INTERPRET=1 (set by
conftest), so every shape is tiny."""
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

from longctx.kernels import landmark_triton as lt  # noqa: E402
from longctx.kernels.flash_triton import Tiles  # noqa: E402
from longctx.kernels.landmark_torch import (landmark_attn, landmark_bwd_torch, landmark_fwd_torch,  # noqa: E402
                                            landmark_mask)

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# query tiles of 16 against groups of 17 or 33: every tile boundary falls inside a group, and
# different tilings per kernel
SMALL = lt.LandmarkConfig(Tiles(16, 0), Tiles(16, 0), Tiles(32, 0))


def make(B, H, Hkv, T, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    return [x.to(DEV, dtype) for x in (q, k, v)]


def _close(got, ref, name, tol=1e-5):
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# B, H, Hkv, T, D, Dv, block
CASES = [
    (2, 2, 1, 40, 16, 16, 16),   # MQA; ends mid-group (groups of 17: 17, 17, 6)
    (1, 4, 2, 68, 32, 16, 16),   # GQA, Dv != D; ends on a landmark (4 whole groups)
    (2, 4, 4, 70, 16, 32, 32),   # block 32: groups of 33, last one 4 long
    (1, 2, 2, 10, 16, 16, 16),   # shorter than one group: no landmark at all
]


@pytest.mark.parametrize("config", [SMALL, None], ids=["tiles16", "default-tiles"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}D{}Dv{}blk{}".format(*c))
def test_kernels_match_torch_path(case, config):
    B, H, Hkv, T, D, Dv, block = case
    q, k, v = make(B, H, Hkv, T, D, Dv, seed=T + block)
    scale = 0.41
    o, lse = lt.landmark_fwd_triton(q, k, v, block, scale, config)
    ro, rl = landmark_fwd_torch(q, k, v, block, scale, tile=32)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32 and torch.isfinite(lse).all()
    _close(o, ro, "o")
    _close(lse, rl, "lse")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    got = lt.landmark_bwd_triton(do, q, k, v, o, lse, block, scale, config)
    ref = landmark_bwd_torch(do, q, k, v, ro, rl, block, scale, tile=32)
    for n, a, b in zip(("dq", "dk", "dv"), got, ref):
        _close(a, b, n)
    assert (got[2][:, :, landmark_mask(T, block, DEV)] == 0).all()  # landmarks carry no value


def test_landmark_keys_get_gradient():
    """The landmark keys' dK comes only from the landmark scores of later groups' queries; it must
    be non-zero (a kernel that dropped dS_i,L would still pass a test whose dK there is ~0) and
    match the torch path."""
    q, k, v = make(1, 2, 1, 51, 16, 16, seed=7)
    o, lse = lt.landmark_fwd_triton(q, k, v, 16, 0.5, SMALL)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    dk = lt.landmark_bwd_triton(do, q, k, v, o, lse, 16, 0.5, SMALL)[1]
    ref = landmark_bwd_torch(do, q, k, v, o, lse, 16, 0.5)[1]
    lm = landmark_mask(51, 16, DEV)
    assert ref[:, :, lm][:, :, :2].abs().amax() > 1e-2  # landmarks of groups 0, 1 have later queries
    _close(dk[:, :, lm], ref[:, :, lm], "dk of landmarks")


def _loss_and_grads(q, k, v, block, backend, seed=5):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = landmark_attn(*xs, block, 0.3, tile=32, backend=backend)
    # bf16-representable, so a bf16 run and its fp32 reference get exactly the same dO
    go = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).bfloat16().to(DEV, o.dtype)
    return (o, *torch.autograd.grad((o.float() * go.float()).sum(), xs))


@pytest.mark.parametrize("H, Hkv", [(4, 2), (4, 1)])
def test_landmark_attn_autograd_triton_vs_torch(H, Hkv, monkeypatch):
    monkeypatch.setattr(lt, "pick_config", lambda *a: SMALL)
    q, k, v = make(2, H, Hkv, 57, 16, 16, seed=H * Hkv)
    got = _loss_and_grads(q, k, v, 16, "triton")
    ref = _loss_and_grads(q, k, v, 16, "torch")
    for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        _close(a, b, n)


def test_bf16_against_float32_reference(monkeypatch):
    """bf16 inputs against the torch path on the same (bf16-valued) inputs in fp32. Expected error:
    the kernel rounds p' and dS to bf16 (unit roundoff 2^-8 ~ 3.9e-3) before their products, and
    o, dq, dk, dv to bf16 on output; independent rounding errors add in quadrature, so o sits near
    one roundoff (measured 3.8e-3 norm-wise) and the gradients, whose dS = p'(dp' - Delta) minus the
    group correction cancels and is rounded before two products, near two (measured dq 7.2e-3,
    dk 7.2e-3, dv 5.7e-3). The bound 1.5e-2 leaves 2x margin over the largest; a wrong mask, group
    index or a missing landmark term gives errors of order 1e-1 and more."""
    monkeypatch.setattr(lt, "pick_config", lambda *a: SMALL)
    q, k, v = make(2, 4, 2, 45, 32, 32, dtype=torch.bfloat16, seed=11)
    got = _loss_and_grads(q, k, v, 16, "triton")
    ref = _loss_and_grads(q.float(), k.float(), v.float(), 16, "torch")
    assert got[0].dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in got[1:])
    for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        a, b = a.float(), b.float()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1.5e-2, (n, rel)
        assert (a - b).abs().max().item() < 4e-2 * b.abs().max().item(), n  # a few bf16 ulps of the scale


def test_auto_takes_torch_on_cpu_and_triton_for_cuda(monkeypatch):
    """'auto' on CPU tensors is the torch path even under the interpreter (float64 works there);
    asked by name, triton is what runs (a sabotaged kernel changes the result)."""
    q, k, v = make(1, 2, 1, 20, 16, 16, dtype=torch.float64)
    assert torch.isfinite(landmark_attn(q, k, v, 16)).all()
    q, k, v = make(1, 2, 1, 20, 16, 16)
    ref = landmark_attn(q, k, v, 16, backend="torch")
    monkeypatch.setattr(lt, "landmark_fwd_triton", lambda *a, **kw: (torch.zeros_like(ref), None))
    assert (landmark_attn(q, k, v, 16, backend="triton") == 0).all()
    if DEV == "cpu":
        assert torch.equal(landmark_attn(q, k, v, 16, backend="auto"), ref)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=torch.float64), r"float64.*float16, bfloat16 or float32.*backend='torch'"),
    (dict(block=12), r"block=12.*16, 32, 64, 128.*backend='torch'"),
    (dict(block=256), r"block=256.*16, 32, 64, 128"),
    (dict(D=8), r"D=8.*16, 32, 64, 128"),
    (dict(Dv=48), r"Dv=48.*16, 32, 64, 128"),
])
def test_bad_input_names_value_and_what_is_valid(kw, match):
    block = kw.get("block", 16)
    q, k, v = make(1, 2, 1, 20, kw.get("D", 16), kw.get("Dv", 16), dtype=kw.get("dtype", torch.float32))
    with pytest.raises(ValueError, match=match):
        landmark_attn(q, k, v, block, backend="triton")
    with pytest.raises(ValueError, match=match):
        lt.landmark_fwd_triton(q, k, v, block, 0.25)
    o = landmark_attn(q, k, v, block, backend="auto")  # auto falls back to the torch path
    assert torch.isfinite(o).all() and o.shape == (1, 2, 20, kw.get("Dv", 16))


def test_unknown_backend():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="backend='cuda'.*'auto', 'torch' or 'triton'"):
        landmark_attn(q, q, q, 4, backend="cuda")


def test_many_groups_cross_landmark_chunks():
    """The forward and dQ kernels take the landmark keys 16 groups (or lc) at a time: 34 groups
    of 17 (chunks of 16, 16, 2 or of 32, 2; the sequence ends mid-group) with query tiles of 32
    (straddling groups) and of 64, lc 16 and 32, against the torch path."""
    B, H, Hkv, T, D, Dv, block = 1, 1, 1, 17 * 33 + 5, 16, 16, 16
    q, k, v = make(B, H, Hkv, T, D, Dv, seed=21)
    do = torch.randn(B, H, T, Dv, generator=torch.Generator().manual_seed(22)).to(DEV)
    ro, rl = landmark_fwd_torch(q, k, v, block, 0.37, tile=64)
    ref = landmark_bwd_torch(do, q, k, v, ro, rl, block, 0.37, tile=64)
    for cfg in (lt.LandmarkConfig(Tiles(32, 0), Tiles(32, 0), Tiles(64, 0)),
                lt.LandmarkConfig(Tiles(64, 0), Tiles(64, 0), Tiles(32, 0), lc=32)):
        o, lse = lt.landmark_fwd_triton(q, k, v, block, 0.37, cfg)
        _close(o, ro, "o")
        _close(lse, rl, "lse")
        got = lt.landmark_bwd_triton(do, q, k, v, o, lse, block, 0.37, cfg)
        for n, a, b in zip(("dq", "dk", "dv"), got, ref):
            _close(a, b, n)


@pytest.mark.parametrize("name", sorted(lt.CANDIDATES))
def test_sweep_candidates_match_torch_path(name, monkeypatch):
    """Every launch shape the GPU sweep may pick (LONGCTX_LANDMARK_CFG=<name>), at the block it is
    sized for (64): fp32 through the kernels with the candidate's tiles (128- or 64-row query tiles
    over several groups, GQA, a length ending mid-group), and bf16 through landmark_attn, where
    the variable selects it, against the fp32 torch path with test_bf16_against_float32_reference's
    bounds."""
    monkeypatch.setenv(lt.CONFIG_ENV, name)
    cand = lt.CANDIDATES[name]
    cfg = lt.pick_config(64, 16, torch.bfloat16)
    assert [(t.bm, t.warps, t.stages) for t in (cfg.fwd, cfg.dkdv, cfg.dq)] == \
        [(t.bm, t.warps, t.stages) for t in (cand.fwd, cand.dkdv, cand.dq)] and cfg.lc == cand.lc
    assert lt.pick_config(64, 16, torch.float32).lc == cand.lc
    B, H, Hkv, T, D, Dv, block = 1, 2, 1, 65 * 4 + 40, 16, 16, 64
    q, k, v = make(B, H, Hkv, T, D, Dv, seed=31)
    do = torch.randn(B, H, T, Dv, generator=torch.Generator().manual_seed(32)).to(DEV)
    o, lse = lt.landmark_fwd_triton(q, k, v, block, 0.3, cfg)
    ro, rl = landmark_fwd_torch(q, k, v, block, 0.3, tile=128)
    _close(o, ro, "o")
    _close(lse, rl, "lse")
    got = lt.landmark_bwd_triton(do, q, k, v, o, lse, block, 0.3, cfg)
    ref = landmark_bwd_torch(do, q, k, v, ro, rl, block, 0.3, tile=128)
    for n, a, b in zip(("dq", "dk", "dv"), got, ref):
        _close(a, b, n)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    got = _loss_and_grads(qb, kb, vb, block, "triton")
    ref = _loss_and_grads(qb.float(), kb.float(), vb.float(), block, "torch")
    for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        a, b = a.float(), b.float()
        assert ((a - b).norm() / b.norm()).item() < 1.5e-2, n
        assert (a - b).abs().max().item() < 4e-2 * b.abs().max().item(), n


def test_unknown_config_name(monkeypatch):
    monkeypatch.setenv(lt.CONFIG_ENV, "fastest")
    with pytest.raises(ValueError, match="LONGCTX_LANDMARK_CFG='fastest'.*known: default"):
        lt.pick_config(64, 128, torch.bfloat16)
