"""Sliding-window attention (mixer `swa`) sequence-parallel by a halo exchange: every rank gets
the previous rank's last window - 1 keys/values at once (no chain). Outputs, input gradients and
(summed over ranks) parameter gradients equal one process's, with documents masked and GQA; the
bytes each rank receives are the halo's size. The Titans memory with model.memory.recompute
(pieces checkpointed) under the rank-to-rank hand-off is exact too."""
import pytest
import torch
import torch.distributed as dist

from mp import run_world

from longctx.config import load_config
from longctx.model.transformer import SeqContext
from longctx.parallel.comm import COMM
from longctx.parallel.groups import SPHandle

T_PER_RANK, B, D = 12, 2, 32


def mixer(kind, window, recompute=0):
    from longctx.model.mixers import MIXERS
    cfg = load_config("configs/tiny-cpu.yaml", ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                                                 f"model.mixers=[{kind}]", f"model.swa_window={window}",
                                                 "model.memory.chunk=4", "model.memory.max_lr=0.05",
                                                 f"model.memory.recompute={recompute}"])
    torch.manual_seed(0)
    m = MIXERS[kind](cfg.model, 0).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(T):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    go = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    doc = torch.tensor([[0] * 10 + [1] * (T - 10), [0] * (T - 3) + [1] * 3])  # boundaries inside shards
    return x, go, doc


def worker(rank, world, kind, window, docs, recompute):
    m = mixer(kind, window, recompute)
    x, go, doc = inputs(world * T_PER_RANK)
    sl = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    xl = x[:, sl].clone().requires_grad_()
    ctx = SeqContext(positions=torch.arange(sl.start, sl.stop)[None].expand(B, -1),
                     doc_ids=doc[:, sl] if docs else None, sp=SPHandle(dist.group.WORLD, rank, world))
    COMM.reset()
    y = m(xl, ctx)
    (y * go[:, sl]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return y.detach(), xl.grad, grads, dict(COMM.bytes)


@pytest.mark.parametrize("kind, window, docs, recompute", [
    ("swa", 5, True, 0), ("swa", 13, False, 0),  # 13 - 1 = a whole shard travels
    ("swa", 1, True, 0),  # window 1: itself only, nothing exchanged
    ("memory", 0, False, 8),  # memory pieces of 8 tokens (shards of 12: a piece ends mid-chunk)
], ids=["swa5docs", "swa13", "swa1", "memory_recompute"])
@pytest.mark.parametrize("world", [2, 3])
def test_sp_exact(world, kind, window, docs, recompute):
    window = window or 4
    m = mixer(kind, window, recompute)
    x, go, doc = inputs(world * T_PER_RANK)
    x.requires_grad_()
    y = m(x, SeqContext(positions=torch.arange(x.shape[1])[None].expand(B, -1), doc_ids=doc if docs else None))
    (y * go).sum().backward()
    halo = 2 * B * 2 * (window - 1) * (D // 4) * 8  # k and v, B rows, 2 KV heads, fp64
    for r, (yl, gx, grads, comm) in enumerate(run_world(world, worker, kind, window, docs, recompute)):
        sl = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        assert torch.allclose(yl, y[:, sl].detach(), atol=1e-10, rtol=0), r
        assert torch.allclose(gx, x.grad[:, sl], atol=1e-10, rtol=0), r
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), (r, n)
        if kind == "swa" and window > 1:
            assert comm.get("swa_halo", 0) == (halo if r > 0 else 0), comm
            assert comm.get("swa_halo_grad", 0) == (halo if r < world - 1 else 0), comm
