"""Lightning attention sequence-parallel by state passing: P gloo processes against one."""
import pytest
import torch
import torch.distributed as dist

from mp import run_world

from longctx.kernels.lightning import lightning_attn_rows
from longctx.parallel.comm import COMM
from longctx.parallel.groups import SPHandle
from longctx.parallel.state_passing import lightning_attn_sp

B, H, K, V = 2, 3, 4, 5
DECAY = torch.tensor([0.0, 0.05, 1.5], dtype=torch.float64)


def case_inputs(T, docs, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    doc_ids = None
    if docs:  # document boundaries, some exactly on shard edges
        starts = torch.zeros(B, T, dtype=torch.long)
        for b, pos in enumerate(docs):
            for p in pos:
                starts[b, p] = 1
        doc_ids = starts.cumsum(1)
    go = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    return q, k, v, doc_ids, go


CASES = [(24, None), (36, [[12, 13], [5]]), (48, [[24], [1, 2, 3, 40]])]


def reference(T, docs, seed):
    q, k, v, doc_ids, go = case_inputs(T, docs, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = lightning_attn_rows(q, k, v, DECAY, 0.8, doc_ids)[0]
    grads = torch.autograd.grad((o * go).sum(), (q, k, v))
    return o.detach(), grads


def worker(rank, world, mode="allgather"):
    out = []
    group = dist.group.WORLD
    for i, (T, docs) in enumerate(CASES):
        q, k, v, doc_ids, go = case_inputs(T, docs, i)
        n = T // world
        sl = slice(rank * n, (rank + 1) * n)
        ql, kl, vl = (x[:, :, sl].clone().requires_grad_() for x in (q, k, v))
        COMM.reset()
        o = lightning_attn_sp(ql, kl, vl, DECAY, 0.8, SPHandle(group, rank, world),
                              None if doc_ids is None else doc_ids[:, sl], mode=mode)
        grads = torch.autograd.grad((o * go[:, :, sl]).sum(), (ql, kl, vl))
        out.append((o.detach(), grads, dict(COMM.bytes)))
    return out


@pytest.mark.parametrize("world, mode", [(1, "allgather"), (2, "allgather"), (3, "allgather"), (4, "allgather"),
                                         (3, "ring"), (4, "ring")])
def test_state_passing_exact(world, mode):
    results = run_world(world, worker, mode)
    for i, (T, docs) in enumerate(CASES):
        o_ref, g_ref = reference(T, docs, i)
        o = torch.cat([r[i][0] for r in results], dim=2)
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        for j, name in enumerate("qkv"):
            g = torch.cat([r[i][1][j] for r in results], dim=2)
            torch.testing.assert_close(g, g_ref[j], rtol=1e-12, atol=1e-12, msg=f"d{name} case {i}")
        # communication: one all-gather of P states each way, independent of the length T
        state_bytes = (world - 1) * B * H * K * V * 8
        for rk, r in enumerate(results):
            comm = r[i][2]
            if world == 1:
                assert comm == {}
            elif mode == "ring":  # one state per hop received, each way (rank 0 receives none forward)
                hop = B * H * K * V * 8
                assert comm.get("lightning_state_ring", 0) == (hop if rk > 0 else 0)
                assert comm.get("lightning_state_ring_grad", 0) == (hop if rk < world - 1 else 0)
            else:
                assert comm["lightning_state"] == state_bytes and comm["lightning_state_grad"] == state_bytes
                assert comm["lightning_doc_ids"] == (world - 1) * B * 2 * 8


@pytest.mark.parametrize("step", [5, 16384])
def test_state_correction_gradcheck(step, monkeypatch):
    """The incoming state's correction (scale * lam^(t+1) q_t S_in on each row's first document),
    computed `step` tokens at a time with its own backward: gradcheck in float64 against
    finite differences, and equal to the one-shot formula."""
    from longctx.parallel.state_passing import _Correction
    monkeypatch.setattr(_Correction, "step", step)
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 13, 4
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    S = torch.randn(B, H, D, D, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    first = torch.tensor([T, 6])
    assert torch.autograd.gradcheck(lambda a, b: _Correction.apply(a, b, decay, first, 0.7), (q, S))
    t = torch.arange(T)
    w = torch.exp(-decay[None, :, None] * (t + 1)) * (t[None, :] < first[:, None])[:, None]
    ref = torch.einsum("bhtk,bhkv->bhtv", q * (0.7 * w)[..., None], S)
    torch.testing.assert_close(_Correction.apply(q, S, decay, first, 0.7), ref, rtol=1e-12, atol=1e-12)
