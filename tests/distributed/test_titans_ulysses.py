"""The Titans memory mixer sequence-parallel by Ulysses over memory heads
(model.memory.sp_mode=ulysses): outputs, input gradients and (summed over ranks) parameter
gradients equal one process, depth 1 and 2, world sizes 2-4, with and without piecewise
recomputation (pieces not dividing the sequence), shards not a multiple of the chunk; bytes
moved match the all-to-all formula; refusals."""
import pytest
import torch
import torch.distributed as dist

from mp import run_world

from longctx.config import load_config
from longctx.model.transformer import SeqContext
from longctx.parallel.comm import COMM
from longctx.parallel.groups import SPHandle

D, HEADS, B = 48, 12, 2   # 12 memory heads split over 2, 3 or 4 ranks


def mixer(depth, recompute=0, chunk=4):
    from longctx.model.mixers import MIXERS
    cfg = load_config("configs/tiny-cpu.yaml", [f"model.d_model={D}", "model.n_heads=2", "model.n_kv_heads=2",
                                                 "model.mixers=[memory]", f"model.memory.depth={depth}",
                                                 f"model.memory.heads={HEADS}", f"model.memory.chunk={chunk}",
                                                 "model.memory.max_lr=0.2", f"model.memory.recompute={recompute}",
                                                 "model.memory.sp_mode=ulysses"])
    torch.manual_seed(0)
    m = MIXERS["memory"](cfg.model, 0).double()
    with torch.no_grad():  # non-trivial start: conv, gates and initial weights non-zero
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(T):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, T, D, generator=g, dtype=torch.float64))


def worker(rank, world, depth, t_rank, recompute, chunk):
    m = mixer(depth, recompute, chunk)
    x, go = inputs(world * t_rank)
    sl = slice(rank * t_rank, (rank + 1) * t_rank)
    xl = x[:, sl].clone().requires_grad_()
    ctx = SeqContext(positions=torch.arange(sl.start, sl.stop)[None].expand(B, -1),
                     sp=SPHandle(dist.group.WORLD, rank, world))
    COMM.reset()
    y = m(xl, ctx)
    (y * go[:, sl]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return y.detach(), xl.grad, grads, dict(COMM.bytes)


def reference(depth, T, chunk):
    m = mixer(depth, 0, chunk)
    x, go = inputs(T)
    x.requires_grad_()
    y = m(x, SeqContext(positions=torch.arange(T)[None].expand(B, -1)))
    (y * go).sum().backward()
    return m, x, y


@pytest.mark.parametrize("world, t_rank, recompute, chunk, depth", [
    (2, 8, 0, 4, 1),  # shards on chunk boundaries, matrix memory
    (2, 8, 0, 4, 2),
    (3, 6, 8, 4, 2),  # shard of 6 with chunk 4: chunks straddle ranks; pieces of 8 over 18 tokens
    (4, 5, 4, 2, 2),  # pieces of 4 over 20 gathered tokens, odd shards
])
def test_memory_ulysses_exact(world, t_rank, recompute, chunk, depth):
    m, x, y = reference(depth, world * t_rank, chunk)
    bpv = 8  # float64
    H, d = HEADS, D // HEADS
    # forward all-to-alls: qkv (3·H·d) + gates (3·H) per token out, outputs (H·d) back; the backward the
    # same with "_grad": each moves (P-1)/P of the local tensor
    fwd = (world - 1) * t_rank * B * (3 * H * d + 3 * H) // world * bpv + (world - 1) * t_rank * B * H * d // world * bpv
    for r, (yl, gx, grads, comm) in enumerate(run_world(world, worker, depth, t_rank, recompute, chunk)):
        sl = slice(r * t_rank, (r + 1) * t_rank)
        assert torch.allclose(yl, y[:, sl].detach(), atol=1e-10, rtol=0), r
        assert torch.allclose(gx, x.grad[:, sl], atol=1e-10, rtol=0), r
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), (r, n)
        assert comm.get("memory_ulysses", 0) == fwd, (r, comm)
        assert comm.get("memory_ulysses_grad", 0) == fwd, (r, comm)
        assert "memory_state" not in comm  # no hand-off chain


def test_ulysses_config_refusals():
    with pytest.raises(ValueError, match="memory heads .* not divisible by parallel.sp=3"):
        load_config("configs/tiny-cpu.yaml", ["model.mixers=[memory]", "model.memory.heads=4", "parallel.sp=3",
                                              "data.seq_len=96", "model.memory.sp_mode=ulysses"], world_size=3)
    with pytest.raises(ValueError, match="sp_mode='ring' is not one of"):
        load_config("configs/tiny-cpu.yaml", ["model.memory.sp_mode=ring"])
    # Ulysses needs neither chunk-aligned shards nor self-recompute under activation checkpointing
    load_config("configs/tiny-cpu.yaml", ["model.mixers=[memory]", "model.memory.heads=4", "parallel.sp=2",
                                          "model.memory.chunk=16", "data.seq_len=72", "model.memory.sp_mode=ulysses",
                                          "model.activation_checkpointing=true"], world_size=2)
