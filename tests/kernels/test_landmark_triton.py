"""The fused Triton landmark kernel against the torch path (the specification): out, lse and every
gradient, directly and through `landmark_attn`'s autograd; GQA; lengths that end mid-group; query
tiles that straddle groups; bf16; bad input. Runs on CPU tensors under TRITON_INTERPRET=1 (set by
conftest), so every shape is tiny."""
import math
import os
import pathlib

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
    """'auto' on CPU tensors is the CPU path (torch with the C helper) even under the interpreter
    (float64 works there); asked by name, triton is what runs (a sabotaged kernel changes the
    result)."""
    q, k, v = make(1, 2, 1, 20, 16, 16, dtype=torch.float64)
    assert torch.isfinite(landmark_attn(q, k, v, 16)).all()
    q, k, v = make(1, 2, 1, 20, 16, 16)
    ref = landmark_attn(q, k, v, 16, backend="torch")
    monkeypatch.setattr(lt, "landmark_fwd_triton", lambda *a, **kw: (torch.zeros_like(ref), None))
    assert (landmark_attn(q, k, v, 16, backend="triton") == 0).all()
    if DEV == "cpu":
        assert torch.equal(landmark_attn(q, k, v, 16, backend="auto"), landmark_attn(q, k, v, 16, backend="cpu"))
        assert torch.allclose(landmark_attn(q, k, v, 16, backend="auto"), ref, atol=1e-5, rtol=1e-5)


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
    o = landmark_attn(q, k, v, block, backend="auto")  # auto takes a path that supports it (torch / the C helper)
    assert torch.isfinite(o).all() and o.shape == (1, 2, 20, kw.get("Dv", 16))


def test_unknown_backend():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="backend='cuda'.*'auto', 'torch', 'cpu' or 'triton'"):
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


class _GuardedTorch:
    """Stands in for `torch` inside landmark_triton: every tensor the wrappers allocate (o, lse, dq,
    dk, dv, Delta, lse2) is a view into the middle of a larger buffer whose guard regions hold a
    sentinel, so that a store out of its tensor's extent shows up as a changed guard."""
    SENTINEL = -7680.0  # exact in fp16, bf16 and fp32

    def __init__(self):
        self.guards = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def _wrap(self, shape, dtype, device, pad=67):
        n = math.prod(shape)
        buf = torch.full((pad + n + pad,), self.SENTINEL, dtype=dtype, device=device)
        self.guards.append(buf)
        return buf[pad:pad + n].view(shape)

    def empty(self, *shape, dtype=None, device=None):
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return self._wrap(shape, dtype or torch.get_default_dtype(), device)

    def empty_like(self, x):
        return self._wrap(tuple(x.shape), x.dtype, x.device)

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def untouched(self):
        return all(bool((torch.cat([b[:67], b[-67:]]).float() == self.SENTINEL).all()) for b in self.guards)


def _guarded_inputs(xs, pad=131):
    """Each input as a contiguous view into a NaN-filled buffer (NaN on both sides): a load out of
    its tensor's extent reads NaN, which reaches the outputs."""
    bufs, views = [], []
    for x in xs:
        buf = torch.full((pad + x.numel() + pad,), float("nan"), dtype=x.dtype, device=x.device)
        view = buf[pad:pad + x.numel()].view(x.shape)
        view.copy_(x)
        bufs.append(buf)
        views.append(view)
    return bufs, views


# every candidate in bf16 (its own tiles), fp32 once, with lc32 and GQA (fp32 takes nothing else
# from a candidate; default's fp32 chunks of 16 landmarks are checked for values, not guards, in
# test_many_groups_cross_landmark_chunks); MHA and GQA alternate
GUARD_CASES = [(n, torch.bfloat16, 2, 2 - i % 2) for i, n in enumerate(sorted(lt.CANDIDATES))] + \
    [("lc32", torch.float32, 2, 1)]


@pytest.mark.parametrize("name, dtype, H, Hkv", GUARD_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_guard_regions_untouched_every_candidate(name, dtype, H, Hkv, monkeypatch):
    """No kernel reads or writes outside its tensors: inputs (q, k, v, dO, o, lse) sit between NaN
    guards and every tensor the wrappers allocate between sentinel guards, for each candidate launch
    shape at block 16 over 34 groups (landmark chunks of 16 and 32, a partial last group, a last
    query block past T). The outputs must hold no NaN (a read past an input would bring one in),
    match the torch path (fp32), and leave every guard and input as it was.
    (The H100 'illegal memory access' in the dK/dV kernel of a9eca27 was not an out-of-bounds
    global access: this test passes on that kernel; see _dkdv_blocks and
    test_dkdv_operand_layouts_sm90.)"""
    monkeypatch.setenv(lt.CONFIG_ENV, name)
    block, T = 16, 17 * 33 + 9
    q, k, v = make(1, H, Hkv, T, 16, 16, dtype=dtype, seed=H + Hkv)
    do = torch.randn(1, H, T, 16, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    g = _GuardedTorch()
    monkeypatch.setattr(lt, "torch", g)
    bufs, (gq, gk, gv, gdo) = _guarded_inputs((q, k, v, do))
    o, lse = lt.landmark_fwd_triton(gq, gk, gv, block, 0.3)
    bufs2, (go, glse) = _guarded_inputs((o, lse))
    got = lt.landmark_bwd_triton(gdo, gq, gk, gv, go, glse, block, 0.3)
    monkeypatch.setattr(lt, "torch", torch)
    assert g.untouched(), "a kernel wrote outside its output tensor"
    for buf, x in zip(bufs + bufs2, (q, k, v, do, o, lse)):
        assert torch.isnan(buf[:131]).all() and torch.isnan(buf[-131:]).all()  # inputs' guards kept
        assert torch.equal(buf[131:-131].view(x.shape), x)  # inputs not written
    for n, a in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *got)):
        assert not torch.isnan(a).any(), f"{n}: NaN from a guard region"
    if dtype == torch.float32:
        ro, rl = landmark_fwd_torch(q, k, v, block, 0.3, tile=64)
        ref = landmark_bwd_torch(do, q, k, v, ro, rl, block, 0.3, tile=64)
        for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *got), (ro, rl, *ref)):
            _close(a, b, n)


_LAYOUT_SCRIPT = r"""
import re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from longctx.kernels import landmark_triton as lt
f32, bf = "*fp32", "*bf16"
sig = dict(Q=bf, K=bf, V=bf, DO=bf, LSE2=f32, DELTA=f32, DK=bf, DV_=bf, qk_scale="fp32", scale="fp32", H="i32",
           G="i32", T="i32", W="i32")
fn = lt._bwd_dkdv_kernel
for name in ("default", "dkdv64w4"):
    t = lt.CANDIDATES[name].dkdv
    consts = dict(D=128, DV=128, BM=t.bm, BN=64, LC=16, PREC=None, UPCAST=False)
    s = {k: ("constexpr" if k in consts else v) for k, v in {**sig, **consts}.items()}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in s.items() if v.startswith("*")}
    src = ASTSource(fn, s, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": t.warps, "num_stages": t.stages})
    print(name, sorted(set(re.findall(r"swizzlingByteWidth = (\d+)", k.asm["ttgir"]))))
"""


def test_dkdv_operand_layouts_sm90(tmp_path):
    """The cause of the H100 'illegal memory access' (bf16 backward at T=16K MHA, and at T=4K GQA
    with dkdv64w4): the dK/dV kernel's landmark product took dS_L as a (BM, 16) register operand,
    which Triton 3.6 stored N-major with a 32-byte swizzle for sm_90's wgmma; the kernel faulted
    although every global access is in bounds. Compiled offline for sm_90 (no GPU needed), every
    shared-memory operand of the dK/dV kernel must use the 128-byte swizzle, as those of the forward
    kernel (which ran clean at 16K) do. Skipped where Triton cannot compile for sm_90 here."""
    import subprocess
    import sys
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT, root], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1:] }")
    lines = dict(ln.split(" ", 1) for ln in r.stdout.strip().splitlines())
    assert set(lines) == {"default", "dkdv64w4"}, r.stdout
    for name, widths in lines.items():
        assert widths == "['128']", f"{name}: shared-memory swizzle widths {widths} (32 faulted on an H100)"
