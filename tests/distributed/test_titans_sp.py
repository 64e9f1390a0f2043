"""The Titans memory mixer sequence-parallel: the memory state (weights, momentum, conv tail)
handed from rank r to r+1 gives one process's outputs, input gradients and (summed over ranks)
parameter gradients, depth 1 and 2, at world sizes 2-4; the bytes handed match the state size.
The same for mag / mal (plus the window's keys/values) and mac (plus both conv tails)."""
import pytest
import torch
import torch.distributed as dist

from mp import run_world

from longctx.config import load_config
from longctx.model.transformer import SeqContext
from longctx.parallel.comm import COMM
from longctx.parallel.groups import SPHandle

T_PER_RANK, B = 8, 2


def mixer(depth, kind="memory", window=5, chunk=4, segment=4):
    from longctx.model.mixers import MIXERS
    cfg = load_config("configs/tiny-cpu.yaml", ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2",
                                                 f"model.mixers=[{kind}]", f"model.memory.depth={depth}",
                                                 f"model.memory.chunk={chunk}", "model.memory.max_lr=0.2",
                                                 f"model.memory.window={window}", f"model.memory.segment={segment}"])
    torch.manual_seed(0)
    m = MIXERS[kind](cfg.model, 0).double()
    with torch.no_grad():  # non-trivial start: conv and initial weights non-zero
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(T):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, 32, generator=g, dtype=torch.float64), torch.randn(B, T, 32, generator=g, dtype=torch.float64)


def worker(rank, world, depth, kind="memory", window=5, chunk=4, segment=4):
    m = mixer(depth, kind, window, chunk, segment)
    x, go = inputs(world * T_PER_RANK)
    sl = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    xl = x[:, sl].clone().requires_grad_()
    ctx = SeqContext(positions=torch.arange(sl.start, sl.stop)[None].expand(B, -1),
                     sp=SPHandle(dist.group.WORLD, rank, world))
    COMM.reset()
    y = m(xl, ctx)
    (y * go[:, sl]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}  # rank > 0: exact zeros for init_w
    for g in grads.values():
        dist.all_reduce(g)
    return y.detach(), xl.grad, grads, dict(COMM.bytes)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_memory_hand_off_exact(world, depth):
    m = mixer(depth)
    x, go = inputs(world * T_PER_RANK)
    x.requires_grad_()
    ctx = SeqContext(positions=torch.arange(x.shape[1])[None].expand(B, -1))
    y = m(x, ctx)
    (y * go).sum().backward()
    state_bytes = 8 * (2 * sum(p.numel() for p in m.mem.init_w) * B + B * 3 * 32 * (m.mem.kernel - 1))
    for r, (yl, gx, grads, comm) in enumerate(run_world(world, worker, depth)):
        sl = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        assert torch.allclose(yl, y[:, sl].detach(), atol=1e-10, rtol=0), r
        assert torch.allclose(gx, x.grad[:, sl], atol=1e-10, rtol=0), r
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), (r, n)
        assert comm.get("memory_state", 0) == (state_bytes if r > 0 else 0)
        assert comm.get("memory_state_grad", 0) == (state_bytes if r < world - 1 else 0)


@pytest.mark.parametrize("kind, window", [("mag", 5), ("mal", 5), ("mag", 1), ("mal", 9)])
@pytest.mark.parametrize("world", [2, 3])
def test_mag_mal_hand_off_exact(world, kind, window):
    """mag / mal: the memory state and the sliding window's last window-1 keys/values travel to
    the next rank (window 9 > a shard of 8 is refused; smaller windows are exact)."""
    m = mixer(2, kind, window)
    x, go = inputs(world * T_PER_RANK)
    x.requires_grad_()
    y = m(x, SeqContext(positions=torch.arange(x.shape[1])[None].expand(B, -1)))
    (y * go).sum().backward()
    if window - 1 > T_PER_RANK:
        with pytest.raises(Exception, match="at least model.memory.window - 1"):
            run_world(world, worker, 2, kind, window)
        return
    for r, (yl, gx, grads, _) in enumerate(run_world(world, worker, 2, kind, window)):
        sl = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        assert torch.allclose(yl, y[:, sl].detach(), atol=1e-10, rtol=0), r
        assert torch.allclose(gx, x.grad[:, sl], atol=1e-10, rtol=0), r
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), (r, n)


@pytest.mark.parametrize("world, depth, chunk", [(2, 1, 4), (2, 2, 4), (3, 2, 4), (4, 2, 4), (3, 2, 2)])
def test_mac_hand_off_exact(world, depth, chunk):
    """mac with shards of two segments of 4: the memory state, the retrieval's x-side conv tail and
    the update's y-side conv tail travel to the next rank; segments of one chunk (and once of two)."""
    m = mixer(depth, "mac", chunk=chunk, segment=4)
    x, go = inputs(world * T_PER_RANK)
    x.requires_grad_()
    y = m(x, SeqContext(positions=torch.arange(x.shape[1])[None].expand(B, -1)))
    (y * go).sum().backward()
    conv = B * 3 * 32 * (m.mem.kernel - 1)
    state_bytes = 8 * (2 * sum(p.numel() for p in m.mem.init_w) * B + 2 * conv)  # weights, momentum, 2 tails
    for r, (yl, gx, grads, comm) in enumerate(run_world(world, worker, depth, "mac", 5, chunk, 4)):
        sl = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        assert torch.allclose(yl, y[:, sl].detach(), atol=1e-10, rtol=0), r
        assert torch.allclose(gx, x.grad[:, sl], atol=1e-10, rtol=0), r
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), (r, n)
        assert comm.get("mac_state", 0) == (state_bytes if r > 0 else 0)
        assert comm.get("mac_state_grad", 0) == (state_bytes if r < world - 1 else 0)


@pytest.mark.parametrize("segment, ov, msg", [
    (16, {}, r"mac: a shard of 8 tokens is not a multiple of model\.memory\.segment=16 .* parallel\.sp x 16"),
    (4, {"carry": True}, r"mac: streaming with carried state runs on one rank"),
])
def test_mac_sp_refusals(segment, ov, msg):
    """Refused before anything is sent (so no process group is needed)."""
    m = mixer(1, "mac", segment=segment)
    ctx = SeqContext(positions=torch.arange(T_PER_RANK)[None].expand(B, -1), sp=SPHandle(None, 0, 2), **ov)
    with pytest.raises(ValueError, match=msg):
        m(inputs(T_PER_RANK)[0], ctx)
